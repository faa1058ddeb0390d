"""One smoke test of every method end to end: ``repro chain`` (pretrain -> evaluations, each stage in its own worker
process) at tiny scale with a small budget. Each evaluation kind the case runs must record finite metrics, and the
exported encoder.pth must load weights-only into every evaluation model the chain plans (fine-tuning included)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from repro.cli import main
from repro.evals.features import eval_encoder
from repro.methods.registry import METHODS
from repro.pipeline.plan import chain

# case -> (pretraining recipe, evaluations run). Fine-tuning runs once on a ViT and once on a Swin (it is the slow
# one); every case still builds its fine-tuning model and loads the encoder into it.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mae": ("mae", ("finetune", "linear", "knn")),
    "lomar": ("lomar", ("linear", "knn")),
    "localmim": ("localmim", ("linear", "knn")),
    "localmim_swin": ("localmim_swin_base", ("linear", "knn")),
    "simmim": ("simmim", ("linear", "knn")),
    "maskfeat": ("maskfeat", ("linear", "knn")),
    "beit": ("beit_window", ("linear", "knn")),
    "greenmim": ("greenmim_swin_base", ("finetune", "knn")),
    "extrema": ("extrema", ("linear", "knn")),  # linear and kNN read its instance head
}


# 256 training images: the largest tiny evaluation batch (fine-tuning, MAE's linear probe) is 256.
OVERRIDES = ["optim.epochs=1", "data.synthetic_train=256", "data.synthetic_val=32", "optim.batch_size=32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the embedded data generated once for every case


def test_every_method_has_a_case() -> None:
    recipes = {recipe for recipe, _ in CASES.values()}
    for name in METHODS:
        assert any(chain(r, "tiny")[0].cfg["method"]["name"] == name for r in recipes), name


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_chain(case: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, evals = CASES[case]
    monkeypatch.setenv("REPRO_CACHE", str(cache))
    ov = OVERRIDES
    rc = main(["chain", recipe, "--scale", "tiny", "--runs-dir", str(tmp_path), *ov, "--evals", ",".join(evals)])
    assert rc == 0

    results = {r["kind"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("tiny/*/*/result.json"))}
    assert set(results) == {"pretrain", *evals}
    for kind, r in results.items():
        assert r["status"] == "done", kind
        assert r["accounting"]["precision"] == "fp32", kind  # every result says what precision ran
        metrics: dict[str, Any] = r["metrics"]
        assert metrics and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()), kind

    enc = results["pretrain"]["artifacts"]["encoder.pth"]
    state = torch.load(enc, map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    planned = {s.kind: s.cfg for s in chain(recipe, "tiny", ov, evals=("finetune", "linear", "knn"))}
    for kind in ("finetune", "linear", "knn"):
        model = eval_encoder(planned[kind], enc)  # raises if an encoder weight is missing from encoder.pth
        own = model.state_dict()
        same = [k for k, v in state.items() if k in own and own[k].shape == v.shape and not k.endswith("pos_embed")]
        assert same and all(torch.equal(own[k], state[k]) for k in same), kind
    for kind in set(evals) - {"finetune"}:
        if str(planned[kind]["model"]["arch"]).startswith("swin_"):
            assert results[kind]["config"]["feature"] != "cls", kind  # a Swin has no cls token
