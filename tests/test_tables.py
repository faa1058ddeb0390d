"""Paper tables -> a DAG of stages -> results -> rendered tables: stage sharing across rows and tables, unknown ids,
a crash in one row not stopping the others, done stages skipped, and a deterministic report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro.cli import main
from repro.pipeline.execute import LocalExecutor
from repro.pipeline.plan import all_stages, plan_tables
from repro.pipeline.stage import FAILED, LOG
from repro.report.tables import render_all, write_manifests

# A micro run of the same table: every stage keeps its code path, with 64 images, one epoch and one block.
MICRO = ["data.synthetic_train=64", "data.synthetic_val=32", "optim.epochs=1", "optim.batch_size=32",
         "optim.warmup_epochs=0.5", "model.depth=1"]


def _row(plans: list, table: str, label: str):  # noqa: ANN202
    tp = next(p for p in plans if p.spec.id == table)
    return next(r for r in tp.rows if r.row.label == label)


def test_rows_with_the_same_configuration_share_stages_across_tables() -> None:
    plans = plan_tables(["localmim/t6", "localmim/t7"], "tiny")
    a = _row(plans, "localmim/t6", "local multi-scale, ViT-B")
    b = _row(plans, "localmim/t7", "local, ViT-B")
    assert a.pretrain is not None and a.pretrain.key == b.pretrain.key
    assert a.evals["finetune"].key == b.evals["finetune"].key
    per_table = sum(len(p.stages) for p in plans)
    assert len(all_stages(plans)) < per_table  # shared stages are planned (and trained) once
    # Rows that differ in a knob do not share their pretraining.
    g = _row(plans, "localmim/t7", "global, ViT-B")
    assert g.pretrain.key != b.pretrain.key


def test_paper_level_overrides_go_through_the_tiny_rule() -> None:
    plans = plan_tables(["localmim/t4c"], "tiny")
    big = _row(plans, "localmim/t4c", "512D - 16H, ViT-B").pretrain.cfg["method"]
    small = _row(plans, "localmim/t4c", "128D - 4H, ViT-B").pretrain.cfg["method"]
    assert big["decoder_dim"] > small["decoder_dim"]  # the paper's ordering survives the shrink
    assert big["decoder_dim"] < 512  # and it was shrunk
    paper = plan_tables(["localmim/t4c"], "paper")
    assert _row(paper, "localmim/t4c", "512D - 16H, ViT-B").pretrain.cfg["method"]["decoder_dim"] == 512


def test_reported_and_pending_rows_have_no_stages() -> None:
    plans = plan_tables(["lomar/t2"], "tiny")
    dino = _row(plans, "lomar/t2", "DINO")
    assert dino.status == "reported" and not dino.stages and "not trained" in dino.reason


def test_unknown_table_lists_the_valid_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "lomar/t99"]) == 2
    err = capsys.readouterr().err
    assert "unknown table 'lomar/t99'" in err and "lomar/t2" in err and "extrema/t12" in err
    assert len(err.strip().splitlines()) == 1


def test_plan_prints_the_dag_without_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "lomar/s-t1", "--scale", "tiny", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lomar/s-t1" in out and "pretrain/lomar_ape-" in out and "after pretrain/" in out
    assert "8 unique stages (0 done, 8 to run)" in out
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


@pytest.mark.slow
def test_table_run_crash_isolation_skip_and_deterministic_report(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    broken = plan_tables(["lomar/s-t1"], "tiny", MICRO)
    for rp in broken[0].rows:  # every LoMaR pretraining crashes when it starts (edited before any key is computed)
        if rp.row.label.startswith("LoMaR"):
            rp.pretrain.cfg["method"]["name"] = "no_such_method"
    status = LocalExecutor(stream=False, jobs=2).run(all_stages(broken), runs)
    stages = all_stages(broken)
    by_label = {}
    for s in stages:
        by_label.setdefault(s.label, {})[s.kind] = status[s.key]
    assert by_label["MAE, Absolute Position"] == {"pretrain": "done", "finetune": "done"}
    assert by_label["MAE, Relative Position"] == {"pretrain": "done", "finetune": "done"}
    assert by_label["LoMaR, Relative Position"] == {"pretrain": "failed", "finetune": "blocked"}
    failed = next(s for s in stages if s.label == "LoMaR, Relative Position" and s.kind == "pretrain")
    info = json.loads((failed.dir(runs) / FAILED).read_text())
    assert "no_such_method" in info["error"] and info["log"] == str(failed.dir(runs) / LOG)
    assert "Traceback" in (failed.dir(runs) / LOG).read_text()

    plans = plan_tables(["lomar/s-t1"], "tiny", MICRO)
    stages = all_stages(plans)
    status = LocalExecutor(stream=False, jobs=2).run(stages, runs)
    for s in stages:  # what finished before is skipped; the repaired LoMaR rows run now
        expected = "skipped" if s.label.startswith("MAE") else "done"
        assert status[s.key] == expected, (s.name, s.label)

    write_manifests(plans, runs, "tiny", MICRO)
    first = {p: p.read_bytes() for p in render_all(runs, tmp_path / "a", ["lomar/s-t1"])}
    second = {p: p.read_bytes() for p in render_all(runs, tmp_path / "b", ["lomar/s-t1"])}
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert list(first.values()) == list(second.values())  # byte-identical
    md = (tmp_path / "a" / "tables" / "lomar" / "s-t1.md").read_text()
    assert "not run" not in md and "## tiny scale" in md and "83.5" in md
    csv = (tmp_path / "a" / "tables" / "lomar" / "s-t1.csv").read_text().splitlines()
    assert len(csv) == 1 + 4  # header + the four rows
