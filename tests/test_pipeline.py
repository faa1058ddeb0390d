"""Stages and the local pipeline: identity (dedup, invalidation), an end-to-end tiny chain, failure isolation, report.

The end-to-end tests start one subprocess per stage (~5 s each, mostly imports), so they are marked slow.
Only the kNN evaluation is chained: it exercises the same pretrain -> encoder.pth -> evaluation path as fine-tuning
and linear probing in a fraction of the time (and the tiny linear recipe's effective batch of 512 needs more than
the 64 training images used here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from repro.cli import main
from repro.config import config_hash
from repro.io import load_checkpoint
from repro.models.vit import timm_kwargs, timm_name
from repro.pipeline.execute import LocalExecutor, summary
from repro.pipeline.plan import chain
from repro.pipeline.stage import FAILED, LOG, RESULT, Stage, topo_order
from repro.resolve import resolve

SMALL = ["data.synthetic_train=64", "data.synthetic_val=32"]
CHAIN_ARGS = ["chain", "mae", "--scale", "tiny", "--baseline", "random", "--evals", "knn",
              "optim.epochs=1", "optim.warmup_epochs=0.5", *SMALL, "optim.batch_size=32"]


# ------------------------------------------------------------------------------------------------ stage identity

def _by_role(stages: list[Stage]) -> dict[str, Stage]:
    """kind for pretrained evaluations, kind+'/random' for the baseline ones."""
    return {s.kind + ("/random" if s.kind != "pretrain" and not s.deps else ""): s for s in stages}


def test_same_config_same_keys_and_dedup() -> None:
    a = chain("mae", "tiny", [], baseline=True)
    b = chain("mae", "tiny", [], baseline=True)
    assert [s.key for s in a] == [s.key for s in b]
    assert len({s.key for s in a}) == len(a) == 7  # pretrain + 3 evaluations x (pretrained, random)
    merged = topo_order([*a, *b])
    assert [s.key for s in merged] == [s.key for s in topo_order(a)]
    assert merged[0].kind == "pretrain"  # dependencies first
    # Stage folders follow the key.
    assert a[0].dir("/r") == b[0].dir("/r") and a[0].dir("/r").parent.parent == Path("/r/tiny")


def test_knob_changes_pretrain_key_and_its_dependents() -> None:
    base = _by_role(chain("mae", "tiny", [], baseline=True))
    other = _by_role(chain("mae", "tiny", ["method.mask_ratio=0.6"], baseline=True))
    assert other["pretrain"].key != base["pretrain"].key
    for kind in ("finetune", "linear", "knn"):
        # Same evaluation config, but it evaluates a different encoder: a different stage.
        assert other[kind].cfg == base[kind].cfg
        assert other[kind].key != base[kind].key, kind
        # The random-init baseline does not depend on the pretraining knob: reused.
        assert other[f"{kind}/random"].key == base[f"{kind}/random"].key, kind


def test_inherited_data_changes_every_evaluation() -> None:
    base = _by_role(chain("mae", "tiny", [], baseline=True))
    other = _by_role(chain("mae", "tiny", ["data.synthetic_train=300"], baseline=True))
    for role, s in other.items():
        assert s.cfg["data"]["synthetic_train"] == 300, role
        assert s.key != base[role].key, role


def test_volatile_keys_do_not_change_identity() -> None:
    base = [s.key for s in chain("mae", "tiny", [], baseline=True)]
    assert [s.key for s in chain("mae", "tiny", ["train.num_workers=4"], baseline=True)] == base
    assert [s.key for s in chain("mae", "tiny", ["train.log_every=1"], baseline=True)] == base
    assert [s.key for s in chain("mae", "tiny", ["train.precision=fp32"], baseline=True)] != base


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tiny chain (pretrain -> kNN, plus random-init kNN), run through the CLI; shared by the tests below."""
    tmp = tmp_path_factory.mktemp("pipeline")
    runs = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPRO_CACHE", str(tmp / "cache"))
        mp.setenv("REPRO_RUNS", str(tmp / "unused-runs"))
        mp.setenv("OMP_NUM_THREADS", "1")
        rc = main([*CHAIN_ARGS, "--runs-dir", str(runs)])
        yield {"rc": rc, "runs": runs, "tmp": tmp, "stages": chain("mae", "tiny", CHAIN_ARGS[8:], baseline=True,
                                                                       evals=["knn"])}


def _results(runs: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(runs.glob(f"tiny/*/*/{RESULT}")):
        r = json.loads(p.read_text())
        out[r["kind"] + ("" if r["kind"] == "pretrain" or r["inputs"] else "/random")] = r
    return out


@pytest.mark.slow
def test_chain_end_to_end(chain_run: dict[str, Any]) -> None:
    assert chain_run["rc"] == 0
    runs: Path = chain_run["runs"]
    stages: list[Stage] = chain_run["stages"]
    res = _results(runs)
    assert set(res) == {"pretrain", "knn", "knn/random"}
    assert {s.key for s in stages} == {r["key"] for r in res.values()}
    for role, r in res.items():
        assert r["status"] == "done", role
        prov = r["provenance"]
        assert set(prov["versions"]) >= {"torch", "timm", "repro"}
        stage = next(s for s in stages if s.key == r["key"])
        assert prov["config_hash"] == config_hash(stage.cfg), role
        assert r["config"]["data"]["synthetic_train"] == 64, role  # inherited by the evaluations

    pre = res["pretrain"]
    assert pre["accounting"]["completed"] and pre["accounting"]["steps"] == 2  # 64 images / batch 32, 1 epoch
    assert pre["metrics"]["final_loss"] > 0
    for role in ("knn", "knn/random"):
        m = res[role]["metrics"]
        assert set(m) == {"knn_top1_k20", "knn_top1_k200"}, role
        assert all(0.0 <= v <= 100.0 for v in m.values())
    assert res["knn"]["inputs"]["init"] == str(Path(pre["artifacts"]["encoder.pth"]).parent)
    assert res["knn"]["config"]["init"] == pre["artifacts"]["encoder.pth"]

    # The exported encoder is a timm ViT's state dict.
    enc = load_checkpoint(pre["artifacts"]["encoder.pth"])
    model_cfg = pre["config"]["model"]
    vit = timm.create_model(timm_name(model_cfg["arch"], model_cfg["patch_size"]), pretrained=False,
                            **timm_kwargs(model_cfg, 32, num_classes=0, global_pool="token"))
    vit.load_state_dict(enc, strict=True)
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    meta = json.loads((Path(pre["artifacts"]["encoder.json"])).read_text())
    assert meta["method"] == "mae" and meta["linear_feature"] == "cls"


@pytest.mark.slow
def test_chain_rerun_skips_every_stage(chain_run: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runs: Path = chain_run["runs"]
    monkeypatch.setenv("REPRO_CACHE", str(chain_run["tmp"] / "cache"))
    files = sorted(runs.rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in files if p.is_file()}
    capsys.readouterr()
    assert main([*CHAIN_ARGS, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr()
    assert out.err.count("done already, skipped") == 3
    assert "running" not in out.err
    lines = out.out.strip().splitlines()[1:]
    assert len(lines) == 3 and all(line.split()[0] == "skipped" for line in lines), out.out
    assert sorted(runs.rglob("*")) == files
    assert {p: p.stat().st_mtime_ns for p in files if p.is_file()} == before


@pytest.mark.slow
def test_failed_stage_blocks_dependents_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             chain_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPRO_CACHE", str(chain_run["tmp"] / "cache"))  # the dataset is already there
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Resolved and planned, but the worker fails when it starts: a method that does not exist.
    bad = resolve("mae", "tiny", [*SMALL, "optim.batch_size=32", "optim.epochs=1"], kind="pretrain")
    bad["method"]["name"] = "no_such_method"
    pre = Stage("pretrain", bad, label="bad")
    knn_cfg = resolve("default", "tiny", SMALL, kind="knn")
    dependent = Stage("knn", knn_cfg, {"init": pre}, label="dependent")
    independent = Stage("knn", knn_cfg, label="independent")
    stages = [pre, dependent, independent]
    runs = tmp_path / "runs"
    status = LocalExecutor(stream=False).run(stages, runs)
    assert status == {pre.key: "failed", dependent.key: "blocked", independent.key: "done"}

    log = pre.dir(runs) / LOG
    failed = json.loads((pre.dir(runs) / FAILED).read_text())
    assert failed["log"] == str(log) and "no_such_method" in failed["error"]
    assert "Traceback" in log.read_text()
    assert not (pre.dir(runs) / RESULT).exists()
    assert not dependent.dir(runs).exists()
    assert independent.done(runs)
    err = capsys.readouterr().err
    assert f"FAILED (exit 1); log: {log}" in err and "blocked" in err
    text = summary(stages, status, runs)
    assert f"failed   {pre.name} bad  log: {log}" in text
    assert f"blocked  {dependent.name}" in text and f"done     {independent.name}" in text


@pytest.mark.slow
def test_report_is_deterministic(chain_run: dict[str, Any], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    runs: Path = chain_run["runs"]
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--runs-dir", str(runs), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["report", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert out.read_bytes() == first
    text = first.decode()
    assert "| scale | pretraining | encoder |" in text and "kNN top-1 (k=20)" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2
    assert any("| mae (1 ep) |" in r for r in rows) and any("| random init |" in r for r in rows)
    knn = _results(runs)["knn"]["metrics"]["knn_top1_k20"]
    assert f"{knn:.2f}" in next(r for r in rows if "mae (1 ep)" in r)
    assert "mae (1 ep) vs random init" in text


def test_a_knob_inert_for_the_arch_stays_out_of_the_stage_key() -> None:
    # LocalMIM's merge_coords acts on a Swin only (MethodSpec.inert): ViT stages keep the keys they had before it.
    def key(recipe: str, merge: str) -> str:
        return Stage("pretrain", resolve(recipe, "tiny", {"method": {"merge_coords": merge}})).key

    assert key("localmim", "official") == key("localmim", "own")
    assert key("localmim_swin_base", "official") != key("localmim_swin_base", "own")
    vit = resolve("localmim", "tiny")
    del vit["method"]["merge_coords"]
    assert Stage("pretrain", vit).key == key("localmim", "official")
