"""The results store: idempotent ingestion, concurrent writers, killed writers, schema version."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from repro.config import ConfigError
from repro.io import atomic_write_json
from repro.record import store


def fake_result(commit: str, seed: int = 0, metrics: dict[str, float] | None = None, kind: str = "linear",
                recipe: str = "mae", device: str = "x86_64", images_per_s: float = 100.0,
                finished: float | None = None, extra: dict[str, Any] | None = None,
                dirty: bool = False) -> dict[str, Any]:
    """A result.json as the worker writes it (the fields the store reads)."""
    cfg = {"kind": kind, "recipe": recipe, "scale": "tiny", "seed": seed,
           "data": {"dataset": "synthetic", "path": None}, "optim": {"epochs": 1}, **(extra or {})}
    return {"status": "done", "kind": kind, "recipe": recipe, "label": recipe, "scale": "tiny", "key": f"k{seed}",
            "config": cfg, "metrics": metrics if metrics is not None else {"linear_top1": 50.0 + seed},
            "accounting": {"device": "cpu", "images_per_s": images_per_s, "step_time_s": 1.0 / images_per_s,
                           "device_hours": 0.01},
            "provenance": {"commit": commit, "dirty": dirty, "seed": seed, "device_name": device,
                           "results_version": {kind: 1}},
            "inputs": {}, "finished": finished if finished is not None else time.time()}


def folder(root: Path, seed: int, kind: str = "linear", recipe: str = "mae") -> Path:
    return root / "tiny" / kind / f"{recipe}-{seed:010d}"


def count(root: Path, sql: str) -> int:
    con = sqlite3.connect(store.store_path(root))
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


def test_ingest_idempotent_and_new_commit_is_a_new_row(tmp_path: Path) -> None:
    atomic_write_json(folder(tmp_path, 0) / "result.json", fake_result("a" * 40, 0))
    atomic_write_json(folder(tmp_path, 1) / "result.json", fake_result("a" * 40, 1))
    atomic_write_json(folder(tmp_path, 2) / "result.json", {**fake_result("a" * 40, 2), "status": "failed"})
    first = store.ingest(tmp_path)
    assert (first.added, first.unchanged, first.skipped) == (2, 0, [])
    again = store.ingest(tmp_path)
    assert (again.added, again.unchanged) == (0, 2)
    assert count(tmp_path, "SELECT count(*) FROM stages") == 2
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 2
    # the same stage re-run at another commit overwrites its result.json: the store keeps both
    atomic_write_json(folder(tmp_path, 0) / "result.json", fake_result("b" * 40, 0))
    assert store.ingest(tmp_path).added == 1
    recs = store.records(tmp_path)
    assert sorted((r["commit_sha"][0], r["seed"]) for r in recs) == [("a", 0), ("a", 1), ("b", 0)]
    assert {r["metrics"]["linear_top1"] for r in recs} == {50.0, 51.0}
    assert all(r["device"] == "cpu" and r["images_per_s"] == 100.0 for r in recs)


def test_manifest_rows_are_kept_across_runs(tmp_path: Path) -> None:
    for seed in (0, 1):  # two runs of one table (seed=0, seed=1): each rewrites the manifest
        atomic_write_json(folder(tmp_path, seed) / "result.json", fake_result("a" * 40, seed))
        atomic_write_json(tmp_path / "tiny" / "tables" / "lomar" / "t2.json",
                          {"table": "lomar/t2", "scale": "tiny", "overrides": [f"seed={seed}", "optim.epochs=1"],
                           "rows": [{"label": "LoMaR", "status": "ok",
                                     "stages": {"linear": str(folder(tmp_path, seed))}}]})
        store.ingest(tmp_path)
    recs = store.records(tmp_path)
    assert {(r["table_id"], r["row_label"], r["seed"], r["overrides"]) for r in recs} == {
        ("lomar/t2", "LoMaR", 0, '["optim.epochs=1"]'), ("lomar/t2", "LoMaR", 1, '["optim.epochs=1"]')}


def test_corrupt_result_is_reported_and_skipped(tmp_path: Path) -> None:
    good = json.dumps(fake_result("a" * 40, 0))
    p = folder(tmp_path, 0) / "result.json"
    p.parent.mkdir(parents=True)
    p.write_text(good[: len(good) // 2])  # half-written by a non-atomic writer
    rep = store.ingest(tmp_path)
    assert rep.added == 0 and len(rep.skipped) == 1 and str(p) in rep.skipped[0]
    assert "1 skipped" in rep.line()
    assert count(tmp_path, "SELECT count(*) FROM stages") == 0
    p.write_text(good)  # the stage finishes later: picked up then
    assert store.ingest(tmp_path).added == 1


def test_fifty_concurrent_writers_with_the_collector_running(tmp_path: Path) -> None:
    n, done = 50, threading.Event()
    reports: list[store.IngestReport] = []

    def writer(i: int) -> None:
        time.sleep((i % 7) * 0.01)
        atomic_write_json(folder(tmp_path, i) / "result.json",
                          fake_result("c" * 40, i, {"linear_top1": float(i), "linear_top5": float(i) + 1}))

    def collector() -> None:
        while not done.is_set():
            reports.append(store.ingest(tmp_path))

    col = threading.Thread(target=collector)
    col.start()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    col.join()
    reports.append(store.ingest(tmp_path))
    assert len(reports) >= 2
    assert all(not r.skipped for r in reports)  # atomic writes: never seen half-written
    assert sum(r.added for r in reports) == n
    assert count(tmp_path, "SELECT count(*) FROM stages") == n
    assert count(tmp_path, "SELECT count(DISTINCT folder) FROM stages") == n
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 2 * n  # every metric of every stage, none partial
    assert store.ingest(tmp_path).added == 0


WRITER = """
import json, os, sys, time
path, atomic = sys.argv[1], sys.argv[2] == "atomic"
data = json.dumps(json.loads(sys.stdin.read())).encode()
os.makedirs(os.path.dirname(path), exist_ok=True)
target = os.path.join(os.path.dirname(path), ".result.json.x.tmp") if atomic else path
with open(target, "wb") as f:
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    print("half", flush=True)
    time.sleep(60)
    f.write(data[len(data) // 2:])
if atomic:
    os.replace(target, path)
"""


@pytest.mark.parametrize("atomic", [True, False])
def test_writer_killed_mid_write_leaves_nothing_ingested(tmp_path: Path, atomic: bool) -> None:
    path = folder(tmp_path, 0) / "result.json"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "atomic" if atomic else "plain"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(fake_result("d" * 40, 0)))
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "half"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rep = store.ingest(tmp_path)
    assert rep.added == 0
    assert len(rep.skipped) == (0 if atomic else 1)  # a temp file is not a result; a torn result.json is reported
    assert count(tmp_path, "SELECT count(*) FROM stages") == 0
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with store.connect(tmp_path) as con:
        con.execute("INSERT INTO schema_version VALUES (?)", (store.SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="schema version 2, newer") as e:
        store.ingest(tmp_path)
    assert "\n" not in str(e.value)
    assert store.ingest_quietly(tmp_path).startswith("results store: not updated (")


def test_stage_key_does_not_depend_on_machine_paths(tmp_path: Path) -> None:
    from repro.pipeline.stage import Stage
    from repro.resolve import resolve

    cfg = resolve("mae", "tiny", [])
    # an embedded-data stage without inputs keeps the key it had before paths left the identity (pinned; a recipe
    # change that moves it on purpose updates this value)
    assert Stage("pretrain", cfg).key == "9f33a8a3f5c70f72"  # moved on purpose: pretrain results_version 2
    on = {p: Stage("pretrain", {**cfg, "data": {**cfg["data"], "path": p}}).key for p in ("/mnt/a/in1k", "/b/in1k")}
    assert len(set(on.values())) == 1
    other = Stage("pretrain", {**cfg, "data": {**cfg["data"], "dataset": "digits", "path": "/b/in1k"}}).key
    assert other != on["/b/in1k"]  # the dataset's name stays in the identity

    lin = resolve("mae", "tiny", [], kind="linear")

    def encoder(where: Path, key: str | None, content: bytes) -> str:
        where.mkdir(parents=True)
        (where / "encoder.pth").write_bytes(content)
        if key:
            atomic_write_json(where / "result.json", {"key": key, "status": "done"})
        return str(where / "encoder.pth")

    a = encoder(tmp_path / "a" / "pretrain-1", "k1", b"x")
    b = encoder(tmp_path / "elsewhere" / "copy", "k1", b"x")
    c = encoder(tmp_path / "c", None, b"x")
    d = encoder(tmp_path / "d" / "e", None, b"x")
    e = encoder(tmp_path / "e", None, b"y")
    key = {n: Stage("linear", {**lin, "init": p}).key for n, p in dict(a=a, b=b, c=c, d=d, e=e).items()}
    assert key["a"] == key["b"]  # the producing stage's key, wherever its folder is
    assert key["c"] == key["d"] != key["e"]  # a loose file: its bytes
    assert Stage("linear", {**lin, "init": "random"}).key not in key.values()


def test_report_outputs_do_not_make_the_code_dirty(tmp_path: Path) -> None:
    """`make reproduce` renders RESULTS.md / tables / plots after `repro run claims`, then runs `all`: those files
    changing must not mark the stages `all` runs as made by uncommitted code; any other tracked change must."""
    import subprocess

    from repro.record.provenance import tree_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for f in ("RESULTS.md", "tables/t.md", "plots/p.png", "repro/a.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("v1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert tree_state(tmp_path)["dirty"] is False
    for f in ("RESULTS.md", "tables/t.md", "plots/p.png"):
        (tmp_path / f).write_text("v2\n")
    (tmp_path / "untracked.py").write_text("x\n")
    state = tree_state(tmp_path)
    assert state["dirty"] is False and len(state["commit"]) == 40
    (tmp_path / "repro/a.py").write_text("v2\n")
    assert tree_state(tmp_path)["dirty"] is True
    (tmp_path / "repro/a.py").write_text("v1\n")
    assert tree_state(tmp_path / "repro")["dirty"] is False  # from a sub-folder: the whole tree, the same exclusions
    (tmp_path / "RESULTS.md").write_text("v1\n")
    (tmp_path / "other.txt").write_text("x\n")
    git("add", "other.txt")
    assert tree_state(tmp_path / "repro")["dirty"] is True
    assert tree_state(Path("/"))["commit"] is None


def test_a_superseded_table_stage_is_no_chain(tmp_path: Path) -> None:
    from repro.record.store import finished_results
    from repro.report.results import chain_results

    manifest = tmp_path / "tiny" / "tables" / "lomar" / "t2.json"
    for seed in (0, 1):  # the table's row at old code (folder 0), then re-run by a code change (folder 1)
        atomic_write_json(folder(tmp_path, seed) / "result.json", fake_result("a" * 40, seed))
        atomic_write_json(manifest, {"table": "lomar/t2", "scale": "tiny", "overrides": [],
                                     "rows": [{"label": "LoMaR", "stages": {"linear": str(folder(tmp_path, seed))}}]})
        store.ingest(tmp_path)
    atomic_write_json(folder(tmp_path, 2) / "result.json", fake_result("a" * 40, 2))  # a `repro chain` evaluation
    store.ingest(tmp_path)
    chains = chain_results(tmp_path, finished_results(tmp_path))
    assert [Path(r["_dir"]).name for r in chains] == [folder(tmp_path, 2).name]
    (tmp_path / store.STORE).unlink()  # without the store only the current manifests tell: folder 0 looks a chain
    assert len(chain_results(tmp_path, finished_results(tmp_path))) == 2
