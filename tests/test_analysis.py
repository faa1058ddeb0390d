"""The analysis stage (LocalMIM Figs. 3, 5, 6): NMI and pairwise KL on hand-made attention maps with known values,
the explicit attention of a ViT block against its fused forward, per-block gradient norms recorded by the engine,
and a tiny pretrain -> analysis chain through the pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import TensorDataset

from repro.config import ConfigError
from repro.engine.dist import DistEnv
from repro.engine.fit import fit
from repro.evals.analysis import (
    _even_subset,
    attention_map,
    attention_nmi,
    attention_pair_kl,
    grad_norms_at_median,
    layer_attention_stats,
    median_epoch,
)
from repro.methods.mae import MAE
from repro.models.vit import create_vit
from repro.resolve import resolve

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MICRO = {"arch": "vit_nano", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
         "pos_embed": "sincos", "rel_pos": "none", "class_token": True, "global_pool": "token", "drop_path": 0.0,
         "layer_scale": None}


# ---- NMI -------------------------------------------------------------------------------------------------------------

def test_nmi_of_uniform_attention_is_zero() -> None:
    for n in (2, 5, 16):
        assert attention_nmi(torch.full((n, n), 1.0 / n)).item() == pytest.approx(0.0, abs=1e-12)
    # Any map whose rows are all the same (the attention does not depend on the query) has NMI 0.
    row = torch.softmax(torch.randn(7, generator=torch.Generator().manual_seed(0)), 0)
    assert attention_nmi(row.expand(5, 7)).item() == pytest.approx(0.0, abs=1e-12)


def test_nmi_of_one_hot_identity_is_maximal() -> None:
    for n in (2, 5, 16):
        assert attention_nmi(torch.eye(n)).item() == pytest.approx(1.0, abs=1e-12)
    perm = torch.eye(6)[torch.tensor([3, 0, 5, 1, 2, 4])]
    assert attention_nmi(perm).item() == pytest.approx(1.0, abs=1e-12)
    # Random softmax maps lie strictly between the two extremes.
    g = torch.Generator().manual_seed(1)
    vals = attention_nmi(torch.softmax(torch.randn(50, 9, 9, generator=g) * 2, -1))
    assert ((vals > 0) & (vals < 1)).all()


def test_nmi_of_hard_assignments_matches_sklearn() -> None:
    """A one-hot map query q -> key f(q) is the joint distribution of two labelings (q, f(q)); Strehl & Ghosh's NMI
    (geometric normalisation) is sklearn's ``average_method='geometric'``."""
    for f in ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 1, 1], [0, 1, 2, 3, 4, 5]):
        n = len(f)
        attn = torch.zeros(n, n)
        attn[torch.arange(n), torch.tensor(f)] = 1.0
        want = normalized_mutual_info_score(list(range(n)), f, average_method="geometric")
        assert attention_nmi(attn).item() == pytest.approx(want, abs=1e-9), f


def test_nmi_all_on_one_key_is_zero() -> None:
    attn = torch.zeros(4, 4)
    attn[:, 2] = 1.0
    assert attention_nmi(attn).item() == 0.0


# ---- KL --------------------------------------------------------------------------------------------------------------

def test_kl_of_identical_distributions_is_zero() -> None:
    row = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert attention_pair_kl(row.expand(6, 4)).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_pair_kl(torch.full((3, 3, 5), 0.2)).abs().max().item() < 1e-12


def test_kl_known_value_and_brute_force() -> None:
    p, q = [0.5, 0.5], [0.9, 0.1]
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
    pair = torch.tensor([p, q], dtype=torch.float64)
    assert attention_pair_kl(pair).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-12)
    g = torch.Generator().manual_seed(2)
    a = torch.softmax(torch.randn(3, 6, 8, generator=g), -1).double()
    brute = torch.zeros(3, dtype=torch.float64)
    for i in range(6):
        for j in range(6):
            if i != j:
                brute += (a[:, i] * (a[:, i].log() - a[:, j].log())).sum(-1)
    assert torch.allclose(attention_pair_kl(a), brute / 30, rtol=1e-10)
    # Query-independent attention has zero KL, query-specific (one-hot) attention a large one.
    assert attention_pair_kl(torch.eye(4)).item() > 20


# ---- attention of a ViT ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel_pos", ["none", "bias"])
def test_explicit_attention_reproduces_the_fused_block(rel_pos: str) -> None:
    torch.manual_seed(0)
    vit = create_vit({**MICRO, "rel_pos": rel_pos}, 16).eval()
    if rel_pos == "bias":
        for blk in vit.blocks:  # a non-zero bias, so that forgetting it would show
            torch.nn.init.normal_(blk.attn.rel_table, std=1.0)
    x = torch.randn(2, vit.patch_embed.num_patches + 1, 32)
    mod = vit.blocks[0].attn
    with torch.no_grad():
        out = mod(x)
        a = attention_map(mod, x)
        v = mod.qkv(x).reshape(2, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        again = mod.proj((a @ v).transpose(1, 2).reshape(2, -1, 32))
    assert a.shape == (2, 2, 17, 17) and torch.allclose(a.sum(-1), torch.ones(2, 2, 17))
    assert torch.allclose(again, out, atol=1e-5)


def test_layer_stats_have_one_entry_per_block() -> None:
    torch.manual_seed(0)
    for depth in (2, 3):
        vit = create_vit({**MICRO, "depth": depth}, 16).eval()
        s = layer_attention_stats(vit, torch.randn(3, 3, 16, 16))
        assert set(s) == {"nmi", "kl"}
        for v in s.values():
            assert v.shape == (depth,) and torch.isfinite(v).all()
        assert ((s["nmi"] >= 0) & (s["nmi"] <= 3)).all()  # sums over 3 images of values in [0, 1]
        assert (s["kl"] >= 0).all()
    x = torch.randn(2, 3, 16, 16)
    patches, every = layer_attention_stats(vit, x), layer_attention_stats(vit, x, tokens="all")
    assert torch.isfinite(every["nmi"]).all() and not torch.allclose(patches["nmi"], every["nmi"])
    with pytest.raises(ConfigError, match="tokens"):
        layer_attention_stats(vit, torch.randn(1, 3, 16, 16), tokens="cls")


def test_even_subset_and_median_epoch() -> None:
    assert _even_subset(10, 3) == [0, 4, 9] or _even_subset(10, 3) == [0, 5, 9]
    assert _even_subset(5, 100) == [0, 1, 2, 3, 4]
    assert len(_even_subset(500, 1000)) == 500
    assert [median_epoch(e) for e in (1, 2, 5, 100)] == [1, 1, 3, 50]


# ---- gradient norms recorded by the engine ---------------------------------------------------------------------------

def _mae_cfg(**over: Any) -> dict[str, Any]:
    base = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "optim.batch_size": 16, "train.batch_per_device": 8,
            "data.img_size": 16, "model.depth": 3, "train.grad_norms": True}
    base.update(over)
    return resolve("mae", "tiny", [f"{k}={v}" for k, v in base.items()])


def test_engine_records_per_block_grad_norms(tmp_path: Path) -> None:
    cfg = _mae_cfg(**{"optim.clip_grad": 1.0e-4})
    torch.manual_seed(0)
    model = MAE(cfg)
    for p in model.encoder.blocks[1].parameters():  # a frozen block has no gradient: norm 0
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.zeros(32, dtype=torch.long))
    acct = fit(model, data, cfg, tmp_path, env=CPU, desc="test")
    hist = acct["history"]
    assert len(hist) == 2
    for rec in hist:
        gn = rec["grad_norms"]
        assert len(gn) == 3 and gn[1] == 0.0 and gn[0] > 0 and gn[2] > 0
        # Recorded before clipping: the total exceeds the clip threshold by far.
        assert math.sqrt(sum(v * v for v in gn)) > 1e-3
    # Off by default: no record.
    off = fit(MAE(_mae_cfg(**{"train.grad_norms": False})), data, _mae_cfg(**{"train.grad_norms": False}),
              tmp_path / "off", env=CPU, desc="test")
    assert all("grad_norms" not in r for r in off["history"])


def test_grad_norms_at_median_epoch() -> None:
    hist = [{"epoch": e, "grad_norms": [float(e), 1.0]} for e in range(1, 6)]
    res = {"config": {"optim": {"epochs": 5}}, "accounting": {"history": hist}}
    assert grad_norms_at_median(res) == (3, [3.0, 1.0])
    assert grad_norms_at_median({"config": {"optim": {"epochs": 5}}, "accounting": {"history": [{"epoch": 1}]}}) \
        is None
    with pytest.raises(ConfigError, match="median epoch 3"):
        grad_norms_at_median({"config": {"optim": {"epochs": 5}}, "accounting": {"history": hist[:2]}})


# ---- pretrain -> analysis through the pipeline -----------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_pretrain_analysis_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalMIM f5 'Local' row at tiny, shrunk: the pretraining records grad norms, the analysis reads them at the
    median epoch and measures NMI / KL of the exported encoder, one value per block."""
    from repro.pipeline.execute import LocalExecutor
    from repro.pipeline.plan import plan_tables

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ov = ["optim.epochs=3", "optim.warmup_epochs=0.5", "optim.batch_size=32", "data.synthetic_train=64",
          "data.synthetic_val=16", "num_images=8", "batch_size=4"]
    (plan,) = plan_tables(["localmim/f5"], "tiny", ov)
    row = next(r for r in plan.rows if r.row.label == "Local")
    assert row.status == "trainable" and row.pretrain.cfg["train"]["grad_norms"] is True
    runs = tmp_path / "runs"
    status = LocalExecutor(stream=False).run(row.stages, runs)
    assert set(status.values()) == {"done"}, status
    ana = json.loads((row.evals["analysis"].dir(runs) / "result.json").read_text())
    pre = json.loads((row.pretrain.dir(runs) / "result.json").read_text())
    depth = len(pre["accounting"]["history"][0]["grad_norms"])
    m = ana["metrics"]
    assert len(m["nmi"]) == len(m["kl"]) == len(m["grad_norm"]) == depth
    assert m["grad_norm_epoch"] == 2.0
    assert m["grad_norm"] == pre["accounting"]["history"][1]["grad_norms"]
    assert all(0.0 <= v <= 1.0 for v in m["nmi"]) and all(v >= 0 for v in m["kl"])
    assert ana["accounting"]["images"] == 8
