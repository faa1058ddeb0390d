"""The `claims` selector: only the rows the signal bars and claims rest on, merged into the table manifests without
dropping the rows an earlier run listed."""

from __future__ import annotations

from pathlib import Path

from repro.pipeline.plan import plan_tables
from repro.report.tables import read_manifest, write_manifests
from repro.spec.claims import claim_rows


def test_claims_plans_only_claim_rows_and_full_tables_stay_full() -> None:
    rows = claim_rows()
    plans = plan_tables(["claims"], "tiny")
    assert {p.spec.id for p in plans} == {t for t, _ in rows}
    assert plans[0].spec.id == "suite/signal"  # signal bars first
    for p in plans:
        assert {r.row.label for r in p.rows} == {label for t, label in rows if t == p.spec.id}
        assert p.partial == (len(p.rows) < len(p.spec.rows))
    both = {p.spec.id: p for p in plan_tables(["claims", "lomar/t2"], "tiny")}
    assert not both["lomar/t2"].partial and len(both["lomar/t2"].rows) == len(both["lomar/t2"].spec.rows)


def test_partial_run_keeps_other_rows_of_the_manifest(tmp_path: Path) -> None:
    full = plan_tables(["lomar/t2"], "tiny")
    write_manifests(full, tmp_path, "tiny")
    before = read_manifest(tmp_path, "tiny", "lomar/t2")
    assert before is not None
    part = [p for p in plan_tables(["claims"], "tiny") if p.spec.id == "lomar/t2"]
    assert part and part[0].partial
    write_manifests(part, tmp_path, "tiny")
    after = read_manifest(tmp_path, "tiny", "lomar/t2")
    assert after is not None
    assert [r["label"] for r in after["rows"]] == [r["label"] for r in before["rows"]]  # all rows, spec order
    assert {r["label"]: r for r in after["rows"]} == {r["label"]: r for r in before["rows"]}  # the same stages
