"""The report renders only what was recorded: seeds aggregated with the suite's one noise verdict, old and new
manifest forms, a partial run leaving the other tables intact, no planning at render time, valid claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from repro.config import ConfigError
from repro.kinds import KINDS
from repro.report import claims as claims_mod
from repro.report.claims import Comparison, outcome
from repro.report.tables import manifest, manifest_path, render_all

TABLE = "extrema/t2"  # reference row (first trainable, no text column): "75% x1"; measures ft (finetune), lin


def _result(runs: Path, name: str, top1: float, seed: int, kind: str = "finetune") -> str:
    d = runs / "tiny" / kind / name
    d.mkdir(parents=True)
    metric = "top1" if kind == "finetune" else "linear_top1"
    r = {"status": "done", "kind": kind, "scale": "tiny", "key": name, "inputs": {}, "substitutes": [],
         "config": {"seed": seed, "kind": kind, "data": {"num_classes": 10, "dataset": "synthetic"}},
         "metrics": {metric: top1}, "accounting": {"device_hours": 0.001},
         "provenance": {"results_version": {kind: KINDS[kind].results_version}, "commit": "0" * 40}}
    (d / "result.json").write_text(json.dumps(r))
    return str(d)


def _manifest(runs: Path, table: str, rows: dict[str, Any], scale: str = "tiny") -> None:
    p = manifest_path(runs, scale, table)
    p.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"label": label, "status": "trainable", "reason": "", "stages": {"finetune": dirs}}
               for label, dirs in rows.items()]
    p.write_text(json.dumps({"table": table, "scale": scale, "overrides": [], "rows": entries}))


def _seeded(runs: Path, prefix: str, values: list[float]) -> list[str]:
    return [_result(runs, f"{prefix}-s{i}", v, i) for i, v in enumerate(values)]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    _manifest(runs, TABLE, {
        "75% x1": _seeded(runs, "ref", [10.0, 11.0, 12.0]),  # mean 11, std 1
        "75% x2": _seeded(runs, "far", [20.0, 21.0, 22.0]),  # +10 > 2 * sqrt(1/3 + 1/3) = 1.63: resolved
        "75% x4": _seeded(runs, "near", [11.5, 12.5, 10.5]),  # +0.5: within noise
        "80% x1": _result(runs, "one", 30.0, 0),  # the old manifest form: one folder, not a list
    })
    return runs


def _md_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| row"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_seeds_are_aggregated_with_the_noise_verdict(runs: Path, tmp_path: Path) -> None:
    render_all(runs, tmp_path / "repo", [TABLE])
    md = tmp_path / "repo" / "tables" / "extrema" / "t2.md"
    rows = _md_rows(md)
    # row | paper ft. | ours ft. | vs ref ft. | paper lin. | ours lin. | vs ref lin.
    assert rows["75% x1"][2:4] == ["11.0 ± 1.0 (n=3)", "reference"]
    assert rows["75% x2"][2:4] == ["21.0 ± 1.0 (n=3)", "**+10.0** (resolved, ±1.6)"]
    assert rows["75% x4"][3] == "+0.5 (within noise, ±1.6)"
    assert rows["80% x1"][2:4] == ["30.0 (n=1)", "+19.0 (n=1, no verdict)"]
    assert rows["75% x1"][5] == "not run" and rows["90% x1"][2] == "not run"  # no linear stage; not in the manifest
    text = md.read_text()
    assert "chance level: 10.0% (10 classes)" in text and "Speed-up" not in text
    csv = (md.with_suffix(".csv")).read_text().splitlines()
    header = csv[0].split(",")
    far = dict(zip(header, next(line for line in csv if line.startswith("tiny,75% x2,")).split(",")))
    assert far["ft values"] == "20.0000;21.0000;22.0000" and far["seeds"] == "0;1;2" and far["ft verdict"] == "resolved"
    assert far["stages"] == "finetune:far-s0;finetune:far-s1;finetune:far-s2"


def test_a_partial_run_leaves_the_other_tables_intact(runs: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import repro.pipeline.plan as plan

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the report planned a table")

    monkeypatch.setattr(plan, "plan_tables", refuse)
    other = "extrema/t1"
    _manifest(runs, other, {"50%": _result(runs, "t1-a", 40.0, 0), "70%": _result(runs, "t1-b", 41.0, 0)})
    first = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in render_all(runs, tmp_path / "a", [TABLE, other])}
    # `repro run extrema/t1` again: a new manifest for t1 only, its old stages gone; t2's stages and manifest stay
    for name in ("t1-a", "t1-b"):
        for f in (runs / "tiny" / "finetune" / name).iterdir():
            f.unlink()
        (runs / "tiny" / "finetune" / name).rmdir()
    _manifest(runs, other, {"50%": _result(runs, "t1-c", 50.0, 0)})
    second = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in render_all(runs, tmp_path / "b", [TABLE, other])}
    t2 = [k for k in first if k.parts[-2:] in (("extrema", "t2.md"), ("extrema", "t2.csv"), ("extrema", "t2.tex"))]
    assert len(t2) == 3 and all(first[k] == second[k] for k in t2)
    t1 = Path("tables/extrema/t1.md")
    assert first[t1] != second[t1] and "50.0 (n=1)" in second[t1].decode() and "40.0" not in second[t1].decode()
    # a table no run wrote a manifest for: "not run" with the paper's values, never planned afresh
    render_all(runs, tmp_path / "c", ["extrema/t5"])
    t5 = (tmp_path / "c" / "tables" / "extrema" / "t5.md").read_text()
    assert "_Not run:" in t5 and "| row | ft. | lin. | ours |" in t5 and not (tmp_path / "c" / "plots").exists()


def test_rendering_imports_no_planner(runs: Path, tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from repro.report.tables import render_all; "
            f"render_all(Path({str(runs)!r}), Path({str(tmp_path / 'r')!r}), ['{TABLE}', 'extrema/t5']); "
            "bad = [m for m in ('repro.pipeline.plan', 'repro.resolve') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifest_lists_every_seed_seed_zero_first(tmp_path: Path) -> None:
    def stage(kind: str, name: str) -> SimpleNamespace:
        return SimpleNamespace(kind=kind, dir=lambda root, n=name, k=kind: Path(root) / "tiny" / k / n)

    pre = stage("pretrain", "p0")
    seed0 = SimpleNamespace(row=SimpleNamespace(label="r"), status="trainable", reason="",
                            stages=[pre, stage("finetune", "f0")],
                            replicas=[SimpleNamespace(stages=[pre, stage("finetune", f"f{i}")]) for i in (1, 2)])
    old = SimpleNamespace(row=SimpleNamespace(label="o"), status="trainable", reason="", stages=[stage("knn", "k")])
    m = manifest(SimpleNamespace(spec=SimpleNamespace(id="x/y"), rows=[seed0, old]), tmp_path, "tiny")
    assert m["rows"][0]["stages"] == {"pretrain": [str(tmp_path / "tiny/pretrain/p0")],
                                      "finetune": [str(tmp_path / f"tiny/finetune/f{i}") for i in range(3)]}
    assert m["rows"][1]["stages"] == {"knn": [str(tmp_path / "tiny/knn/k")]}  # no replicas attribute: one seed


def test_claims_reference_existing_tables_rows_and_measures() -> None:
    from repro.spec import get_spec

    claims, signal = claims_mod.load()
    assert {c.paper for c in claims} == {"lomar", "localmim", "extrema"} and signal
    for c in (*claims, *signal):
        spec = get_spec(c.table)
        assert spec.column(c.measure).measure and all(spec.row(r) for r in c.rows)
    good = {"id": "x", "paper": "lomar", "text": "t", "table": "lomar/t2", "rows": ["MAE", "LoMaR"],
            "measure": "top1", "paper_direction": "higher"}
    claims_mod.parse({"claims": [good]})
    (noted,), _ = claims_mod.parse({"claims": [{**good, "tiny_note": "why  tiny\n cannot"}]})
    assert noted.tiny_note == "why tiny cannot"
    with pytest.raises(ConfigError, match="unknown key 'if_missed'"):  # signal bars' key, not a claim's
        claims_mod.parse({"claims": [{**good, "if_missed": "x"}]})
    for bad, msg in (({"rows": ["MAE", "Nope"]}, "has no row 'Nope'"), ({"table": "lomar/zz"}, "unknown table"),
                     ({"measure": "epochs"}, "not a measured column"), ({"paper_direction": "up"}, "paper_direction"),
                     ({"paper": "extrema"}, "is lomar's")):
        with pytest.raises(ConfigError, match=msg) as e:
            claims_mod.parse({"claims": [{**good, **bad}]})
        assert "\n" not in str(e.value)


def test_claims_section_prints_the_tiny_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"id": "x", "paper": "lomar", "text": "t", "table": "lomar/t2", "rows": ["MAE", "LoMaR"],
            "measure": "top1", "paper_direction": "higher"}
    parsed = claims_mod.parse({"claims": [good, {**good, "id": "y", "tiny_note": "HOG at 32 px is flat"}]})
    monkeypatch.setattr(claims_mod, "load", lambda: parsed)
    text = "\n".join(claims_mod.claims_section(tmp_path, {}))
    assert "What limits some claims at this scale (measured):" in text and "- y: HOG at 32 px is flat" in text
    assert "- x:" not in text
    monkeypatch.setattr(claims_mod, "load", lambda: claims_mod.parse({"claims": [good]}))
    assert "What limits" not in "\n".join(claims_mod.claims_section(tmp_path, {}))


def test_signal_aims_parse_and_verdicts() -> None:
    from repro.report.tables import compare_values

    bar = {"id": "s", "text": "t", "table": "suite/signal", "rows": ["random init", "MAE"], "measure": "lin"}
    _, (b,) = claims_mod.parse({"signal": [{**bar, "aim": {"std_above": 3}, "if_missed": "why  it\n misses"}]})
    assert b.aim == ("std_above", 3.0) and b.if_missed == "why it misses"
    for aim in ({"std_above": "x"}, {"not_worse": 1}, {"above": 3}, {"at_least": 1, "std_above": 2}):
        with pytest.raises(ConfigError, match="aim"):
            claims_mod.parse({"signal": [{**bar, "aim": aim}]})
    with pytest.raises(ConfigError, match="unknown key 'aim'"):  # claims take no aim
        claims_mod.parse({"claims": [{**bar, "paper": "suite", "paper_direction": "higher", "aim": {"at_least": 1}}]})
    base, far, near = [20.0, 21.0, 22.0], [30.0, 31.0, 32.0], [21.0, 22.0, 23.0]
    d_far, d_near = compare_values(base, far), compare_values(base, near)
    assert claims_mod.aim_met(("std_above", 3), far, d_far)  # +10 = 10 std
    assert not claims_mod.aim_met(("std_above", 3), near, d_near)  # +1 = 1 std
    assert claims_mod.aim_met(("at_least", 31), far, None) and not claims_mod.aim_met(("at_least", 31.5), far, None)
    assert claims_mod.aim_met(("not_worse", 1), near, d_near)  # higher
    assert claims_mod.aim_met(("not_worse", 1), base, compare_values(near, base))  # -1: within noise
    assert not claims_mod.aim_met(("not_worse", 1), base, compare_values(far, base))  # -10: resolved below
    text = claims_mod.aim_text(b, near, d_near)
    assert text == "; aim (difference > 3 x seed std): **missed**. Why: why it misses"
    assert claims_mod.aim_text(b, far, d_far) == "; aim (difference > 3 x seed std): **met**"


@pytest.mark.parametrize(("direction", "words", "want"), [
    ("higher", ["higher", "higher"], "agrees"), ("higher", ["higher", "lower"], "disagrees"),
    ("higher", ["within noise"], "tiny cannot resolve"), ("higher", ["no verdict"], "tiny cannot resolve"),
    ("not lower", ["within noise"], "tiny cannot resolve"), ("similar", ["higher"], "disagrees"),
    ("lower", ["not run"], "not run"), ("lower", ["lower"], "agrees")])
def test_claim_outcome(direction: str, words: list[str], want: str) -> None:
    assert outcome(direction, [Comparison("a", "b", "", w, "") for w in words]) == want


def test_the_store_maps_every_seed_of_a_list_manifest(runs: Path) -> None:
    from repro.record.store import ingest, records

    ingest(runs)
    rows = {r["folder"]: r["row_label"] for r in records(runs) if r.get("table_id") == TABLE}
    assert rows["tiny/finetune/far-s2"] == "75% x2" and rows["tiny/finetune/one"] == "80% x1" and len(rows) == 10


def test_main_job_section_sums_claims_and_all_and_says_interrupted(tmp_path: Path) -> None:
    from repro.report.results import main_job_lines, record_run

    base = {"scale": "tiny", "jobs": 2, "failed": 0, "commit": "a" * 40, "host": "h", "cpus": 2, "stages": 10}
    record_run(tmp_path, {**base, "tables": ["claims"], "wall_s": 600.0, "ran": 4, "skipped": 1})
    record_run(tmp_path, {**base, "tables": ["all"], "wall_s": 300.0, "ran": 3, "skipped": 5, "interrupted": True,
                          "left": 2})
    text = "\n".join(main_job_lines(tmp_path))
    assert "`repro run claims --scale tiny`: 10.0 min wall, measured: 4 stages run" in text
    assert "`repro run all --scale tiny`: interrupted after 5.0 min wall: 3 stages run, 2 of its 10 still" in text
    assert "Total: **incomplete: 15.0 min wall** for 7 stages run; 2 stages of `all` are still to run." in text
    # tables run between two segments of `all` did stages of the job: they count too
    record_run(tmp_path, {**base, "tables": ["claims", "lomar/t3"], "wall_s": 60.0, "ran": 1, "skipped": 9})
    record_run(tmp_path, {**base, "tables": ["all"], "wall_s": 120.0, "ran": 2, "skipped": 8})
    text = "\n".join(main_job_lines(tmp_path))
    assert "Total: **18.0 min wall** for 10 stages run." in text  # complete: every segment since the last complete
    assert "Runs recorded after it" not in text
    # `make reproduce` again on the finished folder: runs that found everything done measured nothing
    record_run(tmp_path, {**base, "tables": ["claims"], "wall_s": 1.0, "ran": 0, "skipped": 5})
    record_run(tmp_path, {**base, "tables": ["all"], "wall_s": 1.0, "ran": 0, "skipped": 10})
    text = "\n".join(main_job_lines(tmp_path))
    assert "Total: **18.0 min wall** for 10 stages run." in text and "measured: 0 stages run" not in text
    record_run(tmp_path, {**base, "tables": ["all"], "wall_s": 30.0, "ran": 1, "skipped": 9})
    text = "\n".join(main_job_lines(tmp_path))
    assert "Total: **0.5 min wall** for 1 stages run." in text  # a new job starts after a complete `all`
    # ... but where the report still shows stages made by the earlier runs' commit, those runs count as well
    record_run(tmp_path, {**base, "tables": ["all"], "wall_s": 6.0, "ran": 1, "skipped": 9, "commit": "b" * 40})
    shown = [{"provenance": {"commit": "a" * 40}}, {"provenance": {"commit": "b" * 40}}]
    text = "\n".join(main_job_lines(tmp_path, shown))
    assert "and the earlier runs whose stages this report still shows" in text
    assert "Total: **18.6 min wall** for 12 stages run." in text
    text = "\n".join(main_job_lines(tmp_path, [{"provenance": {"commit": "b" * 40}}]))
    assert "Total: **0.1 min wall** for 1 stages run." in text and "earlier runs" not in text


# ---- transfer tables at tiny: the trivial floor, the verdict against it, the budget ----------------------------------

SEG = {"optim": {"iters": 400, "batch_size": 8, "lr": 1e-4},
       "data": {"dataset": "synthetic", "synthetic_train": 1000, "img_size": 32, "num_classes": 11}}
SEG_ACCT = {"iters": 400, "images": 3200, "completed": True}
DET = {"framework": "detectron2", "optim": {"epochs": 3, "batch_size": 4},
       "data": {"dataset": "synthetic", "synthetic_train": 512, "img_size": 64, "num_classes": 80}}
DET_ACCT = {"iterations": 384, "images": 1536, "completed": True}


def _transfer(runs: Path, kind: str, name: str, seed: int, metrics: dict[str, float], cfg: dict[str, Any],
              acct: dict[str, Any]) -> str:
    d = runs / "tiny" / kind / name
    d.mkdir(parents=True)
    r = {"status": "done", "kind": kind, "scale": "tiny", "key": name, "inputs": {}, "substitutes": [],
         "config": {"seed": seed, "kind": kind, **cfg}, "metrics": metrics,
         "accounting": {"device_hours": 0.01, **acct},
         "provenance": {"results_version": {kind: KINDS[kind].results_version}, "commit": "0" * 40}}
    (d / "result.json").write_text(json.dumps(r))
    return str(d)


def _transfer_manifest(runs: Path, table: str, kind: str, rows: dict[str, list[str]]) -> None:
    p = manifest_path(runs, "tiny", table)
    p.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"label": label, "status": "trainable", "reason": "", "stages": {kind: dirs}}
               for label, dirs in rows.items()]
    p.write_text(json.dumps({"table": table, "scale": "tiny", "overrides": [], "rows": entries}))


def _seg(runs: Path, name: str, mious: list[float], floor: float = 6.8) -> list[str]:
    return [_transfer(runs, "segment", f"{name}-s{i}", i, {"miou": v, "trivial_miou": floor}, SEG, SEG_ACCT)
            for i, v in enumerate(mious)]


def test_segment_table_shows_the_floor_the_verdict_against_it_and_the_budget(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _transfer_manifest(runs, "lomar/t4", "segment", {
        "supervised": _seg(runs, "sup", [12.0, 13.0, 14.0]),  # +6.2 over 6.8, SE 0.58: above (resolved)
        "BEiT": _seg(runs, "beit", [6.0, 7.5, 7.0]),  # mean 6.83 > 6.8 by 0.03: within noise
        "MAE": _seg(runs, "mae", [6.5]),  # at or below the floor, one seed
        "LoMaR": _seg(runs, "lomar", [11.8]),  # one seed above: no verdict
    })
    render_all(runs, tmp_path / "repo", ["lomar/t4"])
    md = tmp_path / "repo" / "tables" / "lomar" / "t4.md"
    text = md.read_text()
    assert "| row | paper | ours | vs ref | vs floor |" in text
    rows = _md_rows(md)
    assert rows["supervised"][4] == "+6.2 (above)"
    assert rows["BEiT"][4] == "+0.0 (within noise)"
    assert rows["MAE"][4] == "-0.3 (**not above**)"
    assert rows["LoMaR"][4] == "+5.0 (n=1, no verdict)"
    assert rows["LoMaR384"][2:] == ["not run", "", ""]
    assert ("- floor: the best constant prediction's mIoU (one class on every pixel), measured on each stage's own "
            "evaluation data: 6.8.") in text
    assert ("- tiny budget of the segment stages (from their results): 400 iterations x batch 8 (3,200 images seen) "
            "over 1,000 embedded training images, 32-px crops.") in text
    assert "chance level" not in text
    import csv

    with md.with_suffix(".csv").open() as f:
        mae = next(r for r in csv.DictReader(f) if r["row"] == "MAE")
    assert (mae["miou floor"], mae["miou vs floor"], mae["miou floor verdict"]) == ("6.8000", "-0.3000", "not above")
    assert mae["budget"].startswith("400 iterations x batch 8")
    # rows on different data: the floor's range
    _transfer_manifest(runs, "lomar/t4", "segment", {"supervised": _seg(runs, "sup2", [12.0], floor=7.1),
                                                      "MAE": _seg(runs, "mae2", [12.0])})
    render_all(runs, tmp_path / "repo", ["lomar/t4"])
    assert "evaluation data: 6.8-7.1." in md.read_text()


def test_detection_table_has_one_floor_column_over_box_and_mask(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def det(name: str, box: float, mask: float) -> list[str]:
        m = {"box_ap": box, "mask_ap": mask, "trivial_box_ap": 0.24, "trivial_mask_ap": 0.13}
        return [_transfer(runs, "detect", name, 0, m, DET, DET_ACCT)]

    _transfer_manifest(runs, "lomar/t3", "detect", {"MAE": det("mae", 10.44, 13.72), "LoMaR": det("lomar", 2.4, 0.05)})
    render_all(runs, tmp_path / "repo", ["lomar/t3"])
    md = tmp_path / "repo" / "tables" / "lomar" / "t3.md"
    text = md.read_text()
    rows = _md_rows(md)
    assert text.count("vs floor |") == 1  # one column for both measures
    assert rows["MAE"][-1] == "+10.2 / +13.6 (n=1, no verdict)"
    assert rows["LoMaR"][-1] == "+2.2 / -0.1 (**not above: ViTDet AP mask**)"
    assert "ViTDet AP box 0.2, ViTDet AP mask 0.1." in text and "trivial detector that ignores the image" in text
    assert "per column (ViTDet AP box / ViTDet AP mask)" in text
    assert ("- tiny budget of the detect (detectron2) stages (from their results): 3 epochs = 384 iterations x batch 4 "
            "(1,536 images seen) over 512 embedded training images, 64-px crops.") in text


def test_tables_without_transfer_measures_have_no_floor(runs: Path, tmp_path: Path) -> None:
    render_all(runs, tmp_path / "repo", [TABLE])
    md = tmp_path / "repo" / "tables" / "extrema" / "t2.md"
    assert "floor" not in md.read_text() and "budget" not in md.with_suffix(".csv").read_text()


def test_a_plot_of_a_transfer_measure_draws_its_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from repro.report.tables import render_plot, row_views
    from repro.spec import get_spec

    lines: list[tuple[float, str]] = []
    draw = Axes.axhline

    def spy(self: Axes, y: float = 0, *a: Any, **k: Any) -> Any:
        lines.append((y, k.get("label", "")))
        return draw(self, y, *a, **k)

    monkeypatch.setattr(Axes, "axhline", spy)
    runs = tmp_path / "runs"
    _transfer_manifest(runs, "localmim/t2", "segment", {"BEiT": _seg(runs, "b", [9.0]), "MAE": _seg(runs, "m", [12.0])})
    spec = dataclasses.replace(get_spec("localmim/t2"), plot={"x": "epochs", "y": "miou"})
    from repro.report.tables import load_results, read_manifest

    views = row_views(spec, read_manifest(runs, "tiny", spec.id), load_results(runs))
    assert render_plot(spec, views, "tiny", tmp_path / "p.png") is not None
    assert lines == [(6.8, "floor (6.8, best constant prediction)")]
