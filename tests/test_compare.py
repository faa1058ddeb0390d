"""Verdicts from seed spread, `repro compare` / `repro history` on a store of synthetic results, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_store import fake_result, folder  # tests/ is on sys.path (pytest prepend mode); "tests." can be shadowed

from repro.cli import main
from repro.io import atomic_write_json
from repro.record import compare, store


def test_verdict_from_seed_spread() -> None:
    base = [0.50, 0.51, 0.49]  # std 0.01, n 3: tolerance 2 * sqrt(2 * 0.01^2 / 3) = 0.0163
    v = compare.verdict(base, [0.60, 0.61, 0.59])
    assert v.verdict == "improved" and v.diff == pytest.approx(0.10) and v.tolerance == pytest.approx(0.01633, 1e-3)
    assert compare.verdict(base, [0.40, 0.41, 0.39]).verdict == "regressed"
    assert compare.verdict(base, [0.40, 0.41, 0.39], higher_is_better=False).verdict == "improved"
    assert compare.verdict(base, [0.505, 0.495, 0.515]).verdict == "within noise"
    assert compare.verdict(base, [0.52, 0.53, 0.51]).verdict == "improved"  # diff 0.02 > 0.0163
    assert compare.verdict(base, [0.515, 0.525, 0.505]).verdict == "within noise"  # diff 0.015 < 0.0163
    one = compare.verdict([0.5], [0.9])
    assert one.verdict == compare.NO_SPREAD and one.tolerance is None and one.head.n == 1
    s = compare.summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert compare.higher_is_better("linear_top1") and not compare.higher_is_better("final_loss")
    assert compare.higher_is_better("images_per_s") and not compare.higher_is_better("step_time_s")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A git repository with three commits (dated in order); the store resolves revisions in it."""
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    shas = []
    for i in range(3):
        (r / "f").write_text(str(i))
        _git(r, "add", "f")
        subprocess.run(["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m",
                        f"c{i}", "--date", f"2026-01-0{i + 1}T00:00:00"], check=True,
                       env={"GIT_COMMITTER_DATE": f"2026-01-0{i + 1}T00:00:00", "PATH": "/usr/bin:/bin"})
        shas.append(_git(r, "rev-parse", "HEAD"))
    monkeypatch.setattr(store, "REPO", r)
    return shas


def _write(root: Path, commit: str, top1: list[float], device: str = "x86_64", ips: float = 100.0,
           table: bool = True, dirty: bool = False) -> None:
    """One table row (lomar/t2, row LoMaR) evaluated with one seed per value; the stage folders are rewritten by
    each commit's run, as `repro run --force` does."""
    for seed, v in enumerate(top1):
        atomic_write_json(folder(root, seed) / "result.json",
                          fake_result(commit, seed, {"linear_top1": v}, device=device, images_per_s=ips + seed,
                                      dirty=dirty))
        atomic_write_json(folder(root, seed, "pretrain") / "result.json",
                          fake_result(commit, seed, {"final_loss": 1.0}, kind="pretrain", device=device,
                                      images_per_s=ips + seed, dirty=dirty))
        if table:
            atomic_write_json(root / "tiny" / "tables" / "lomar" / "t2.json",
                              {"table": "lomar/t2", "scale": "tiny", "overrides": [f"seed={seed}"],
                               "rows": [{"label": "LoMaR", "status": "ok",
                                         "stages": {"linear": str(folder(root, seed)),
                                                    "pretrain": str(folder(root, seed, "pretrain"))}}]})
        store.ingest(root)  # as `repro run TABLE seed=N` does after each run


def test_compare_catches_a_regression(tmp_path: Path, repo: list[str], capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    _write(runs, repo[0], [50.0, 51.0, 49.0])
    _write(runs, repo[1], [50.5, 49.5, 50.2])  # noise
    _write(runs, repo[2], [45.0, 46.0, 44.0], ips=50.0)  # a deliberate regression: accuracy and speed
    lines, facts = compare.compare(runs, repo[0], repo[1])
    by = {(ln.kind, ln.metric): ln for ln in lines}
    assert by[("linear", "linear_top1")].v.verdict == "within noise"
    assert by[("linear", "linear_top1")].v.base.n == 3 and by[("linear", "linear_top1")].table == "lomar/t2"
    lines, facts = compare.compare(runs, repo[0], repo[2])
    by = {(ln.kind, ln.metric): ln for ln in lines}
    assert by[("linear", "linear_top1")].v.verdict == "regressed"
    assert by[("pretrain", "images_per_s")].v.ratio == pytest.approx(51 / 101)
    assert by[("pretrain", "images_per_s")].v.verdict == "regressed"
    assert ("linear", "images_per_s") not in by  # cost shown for pretraining only unless asked for
    text = compare.format_text(lines, facts)
    assert "regressed" in text and "x0.505" in text and "cpu (x86_64)" in text
    md = tmp_path / "cmp.md"
    assert main(["compare", repo[0], repo[2], "--runs-dir", str(runs), "--markdown", str(md)]) == 0
    assert "**regressed" in md.read_text() and "| lomar/t2 | LoMaR | linear | linear_top1 |" in md.read_text()
    assert main(["compare", repo[0], repo[2], "--runs-dir", str(runs), "--fail-on-regression"]) == 1
    assert main(["compare", repo[0], repo[1], "--runs-dir", str(runs), "--fail-on-regression"]) == 0
    # uncommitted changes on top of a commit are their own side (REV+dirty)
    _write(runs, repo[2], [55.0, 56.0, 54.0], dirty=True)
    lines, facts = compare.compare(runs, repo[2], repo[2] + "+dirty", metric="linear_top1")
    assert [ln.v.verdict for ln in lines] == ["improved"] and lines[0].v.head.mean == 55.0
    assert facts["dirty"] == {"base": False, "head": True}
    assert "+dirty" in compare.format_text(lines, facts)
    hist = compare.history(runs, "linear_top1", table="lomar/t2")
    assert [(p.commit, p.dirty) for p in next(iter(hist.values()))] == [(repo[0], False), (repo[1], False),
                                                                        (repo[2], False), (repo[2], True)]
    capsys.readouterr()
    # one seed per side: no verdict, and no tolerance invented
    runs1 = tmp_path / "runs1"
    _write(runs1, repo[0], [50.0])
    _write(runs1, repo[1], [40.0])
    lines, _ = compare.compare(runs1, repo[0], repo[1], metric="linear_top1")
    assert [ln.v.verdict for ln in lines] == [compare.NO_SPREAD]


def test_history_table_and_plot(tmp_path: Path, repo: list[str], capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    for sha, vals in zip(reversed(repo), ([45.0, 46.0, 44.0], [50.5, 49.5, 50.2], [50.0, 51.0, 49.0])):
        _write(runs, sha, vals)  # stored newest commit first: history orders by commit date
    hist = compare.history(runs, "linear_top1", table="lomar/t2", row="LoMaR")
    (name, pts), = hist.items()
    assert "lomar/t2 LoMaR (linear, tiny)" in name
    assert [p.commit for p in pts] == repo
    assert [p.summary.mean for p in pts] == pytest.approx([50.0, 50.0667, 45.0], 1e-3)
    plots = tmp_path / "plots"
    assert main(["history", "linear_top1", "--table", "lomar/t2", "--row", "LoMaR", "--runs-dir", str(runs),
                 "--plots-dir", str(plots)]) == 0
    png = plots / "history" / "linear_top1-lomar_t2-LoMaR.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert repo[0][:10] in capsys.readouterr().out


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repro: error: ")
    return err


def test_bad_input_one_line_each(tmp_path: Path, repo: list[str], capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    _write(runs, repo[0], [50.0, 51.0])
    _write(runs, repo[1], [50.0, 51.0], device="Other CPU")
    r = ["--runs-dir", str(runs)]
    assert "unknown revision 'nosuchrev'" in _error(capsys, ["compare", "nosuchrev", repo[1], *r])
    assert "no stored results for head" in _error(capsys, ["compare", repo[0], repo[2], *r])
    assert "(4 made without uncommitted changes" in _error(capsys, ["compare", repo[0], repo[1] + "+dirty", *r])
    assert "metric 'top9'" in _error(capsys, ["compare", repo[0], repo[1], "--metric", "top9", *r])
    assert "unknown table 'lomar/t99'" in _error(capsys, ["compare", repo[0], repo[1], "--table", "lomar/t99", *r])
    assert "no stored results for table lomar/t1" in _error(capsys, ["compare", repo[0], repo[1], "--table",
                                                                     "lomar/t1", *r])
    assert "different devices" in _error(capsys, ["compare", repo[0], repo[1], *r])
    assert "metric 'top9'" in _error(capsys, ["history", "top9", *r])
    assert "no stored row 'X'" in _error(capsys, ["history", "linear_top1", "--row", "X", *r])
    assert "no results store" in _error(capsys, ["history", "linear_top1", "--runs-dir", str(tmp_path / "none")])
    capsys.readouterr()
    assert main(["compare", repo[0], repo[1], "--allow-device-mismatch", *r]) == 0
    assert "[devices differ]" in capsys.readouterr().out


FAKE_MAIN = """
import json, pathlib, subprocess, sys
args = sys.argv[1:]
root = pathlib.Path(args[args.index("--runs-dir") + 1])
sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
folder = root / "tiny" / "linear" / "mae-0000000000"
folder.mkdir(parents=True)
(folder / "result.json").write_text(json.dumps({"status": "done", "kind": "linear", "recipe": "mae", "scale": "tiny",
    "metrics": {"linear_top1": float(len(pathlib.Path("f").read_text()))}, "accounting": {"device": "cpu"},
    "provenance": {"commit": sha, "seed": 0}, "config": {"seed": 0, "argv": args, "pkg": __file__}}))
"""


def test_run_at_commit_uses_a_worktree_of_that_commit(tmp_path: Path, repo: list[str],
                                                      capsys: pytest.CaptureFixture) -> None:
    from repro.record import worktree

    r = store.REPO
    (r / "repro").mkdir()
    (r / "repro" / "__main__.py").write_text(FAKE_MAIN)
    (r / "f").write_text("12345")
    _git(r, "add", "repro", "f")
    subprocess.run(["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "fake"],
                   check=True)
    rev = _git(r, "rev-parse", "HEAD")
    runs = tmp_path / "runs"
    argv = worktree.strip_options(["run", "--commit", "HEAD", "lomar/t2", "--runs-dir=/x", "--jobs", "2"],
                                  ("--commit", "--runs-dir"))
    assert argv == ["run", "lomar/t2", "--jobs", "2"]
    assert worktree.run_at_commit("HEAD", argv, runs) == 0
    (rec,) = store.records(runs)
    assert rec["commit_sha"] == rev and rec["metrics"] == {"linear_top1": 5.0}
    assert rec["folder"] == f"commits/{rev[:12]}/tiny/linear/mae-0000000000"

    cfg = json.loads(rec["config"])
    assert cfg["argv"] == [*argv, "--runs-dir", str(runs / "commits" / rev[:12]), "--no-report"]
    assert f"repro-{rev[:10]}-" in cfg["pkg"]  # the worktree's package ran, not this one
    assert _git(r, "worktree", "list").count("\n") == 0  # the temporary worktree is gone
    with pytest.raises(Exception, match="unknown revision"):
        worktree.run_at_commit("nope", argv, runs)


def test_bench_gate_and_stages() -> None:
    from repro.record import bench

    base = {"accuracy": {"mae/linear/linear_top1": [10.0, 11.0, 12.0], "lomar/knn/knn_top1_k20": [10.0, 11.0, 12.0]},
            "ratios": {"lomar/mae": [1.30, 1.32, 1.28], "extrema x5/x1": [2.0, 2.1, 1.9]}}
    cur = {"accuracy": {"mae/linear/linear_top1": [10.5, 11.5, 11.0]},  # lomar/knn missing
           "ratios": {"lomar/mae": [1.80, 1.82, 1.78], "extrema x5/x1": [1.2, 1.25, 1.15]}}
    lines = {ln["key"]: ln["verdict"] for ln in bench.gate(base, cur)}
    assert lines == {"mae/linear/linear_top1": "within noise", "lomar/knn/knn_top1_k20": "missing in this run",
                     "lomar/mae": "regressed", "extrema x5/x1": "improved"}  # a larger step-time ratio is slower
    assert "regressed (tol" in bench.format_gate(bench.gate(base, cur))
    # 20% slower: beyond the repeats' spread, inside the between-run band of CPU timing (RATIO_BAND)
    slower = {"ratios": {"lomar/mae": [1.56, 1.58, 1.54]}}
    assert [ln["verdict"] for ln in bench.gate({"ratios": {"lomar/mae": base["ratios"]["lomar/mae"]}}, slower)] == [
        "within noise"]
    rows = bench.stages(1)
    assert sorted(rows) == sorted(bench.METHODS)
    for m, row in rows.items():
        assert set(row) == {"pretrain", "linear", "knn"} and row["pretrain"].cfg["method"]["name"] == m
        assert row["pretrain"].cfg["optim"]["epochs"] == 2 and row["pretrain"].cfg["data"]["synthetic_train"] == 500
        assert row["linear"].cfg["seed"] == row["knn"].cfg["seed"] == 1
        assert row["linear"].deps["init"] is row["pretrain"]
    assert rows["mae"]["pretrain"].key != bench.stages(0)["mae"]["pretrain"].key
