"""GreenMIM (repro.methods.greenmim): batch-shared unit mask, decoder placement, recipe scaling, overfitting a fixed
batch (the tiny pretrain -> evaluation chain on a Swin encoder: test_chain_smoke.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from repro.config import ConfigError
from repro.data.synthetic import render_scene
from repro.methods.greenmim import GreenMIM, batch_mask
from repro.resolve import resolve

SMALL = {"data.synthetic_train": 32, "data.synthetic_val": 16, "optim.batch_size": 16}


def cfg(**method: Any) -> dict[str, Any]:
    return resolve("greenmim_swin_base", "tiny", {**SMALL, **{f"method.{k}": v for k, v in method.items()}})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_recipes_at_both_scales() -> None:
    p = resolve("greenmim_swin_base", "paper")
    assert (p["model"]["arch"], p["model"]["window_size"], p["data"]["img_size"]) == ("swin_base", 7, 224)
    assert p["method"]["mask_patch_size"] == 32 and p["method"]["decoder_depth"] == 1
    assert p["optim"]["epochs"] == 800 and p["optim"]["batch_size"] == 2048 and p["optim"]["blr"] == 1e-4
    t = cfg()
    # 224 -> 32 px, patch 4 -> 1, window 7 (of 56) -> 4 (of 32), 32-px unit -> 8 px = the last stage's cell.
    assert (t["model"]["arch"], t["model"]["patch_size"], t["model"]["window_size"]) == ("swin_micro", 1, 4)
    assert t["data"]["img_size"] == 32 and t["method"]["mask_patch_size"] == 8
    lt = resolve("greenmim_swin_large", "tiny")
    assert lt["model"]["arch"] == "swin_mini" and lt["model"]["window_size"] == 8  # 14 of 56 -> 8 of 32
    ft = resolve("swin_base", "paper", kind="finetune")
    assert ft["optim"]["layer_decay"] == 0.9 and ft["model"]["drop_path"] == 0.1
    with pytest.raises(ConfigError, match="mask_patch_size"):
        GreenMIM(cfg(mask_patch_size=16))
    with pytest.raises(ConfigError, match="decoder_placement"):
        cfg(decoder_placement="other")
    with pytest.raises(ConfigError, match="Swin"):
        GreenMIM(resolve("greenmim_swin_base", "tiny", {"model.arch": "vit_micro", "model.window_size": None}))


def test_one_mask_for_the_batch() -> None:
    keep, mask = batch_mask(16, 0.75, gen())
    assert keep.numel() == 4 and mask.sum() == 12 and (mask[keep] == 0).all()
    keep49, _ = batch_mask(49, 0.75, gen())
    assert keep49.numel() == 12  # int(49 * 0.25), as the official code
    m = GreenMIM(cfg())
    seen: list[torch.Tensor] = []
    m.decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    m((torch.randn(3, 3, 32, 32), None), gen())
    assert seen[0].shape == (3, 4, m.encoder.num_features)  # 4 visible units of 16, for every image


@pytest.mark.parametrize("placement", ["official", "aligned"])
def test_decoder_placement(placement: str) -> None:
    m = GreenMIM(cfg(decoder_placement=placement))
    slots: list[torch.Tensor] = []
    m.decoder.register_forward_hook(lambda mod, args, out: slots.append(args[1]))
    m((torch.randn(2, 3, 32, 32), None), gen(5))
    keep, _ = batch_mask(16, 0.75, gen(5))
    if placement == "aligned":  # every latent at its own unit
        assert torch.equal(slots[0], keep.sort().values)
    else:  # the k-th latent (raster order) at the k-th unit of the noise order, as the official decoder
        assert torch.equal(slots[0], keep)
        assert not torch.equal(keep, keep.sort().values)  # this seed shows the difference


def test_no_weight_decay_on_position_tables_and_mask_token() -> None:
    m = GreenMIM(cfg())
    groups = m.param_groups({"weight_decay": 0.05})
    no_wd = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for n, p in m.named_parameters():
        if "relative_position_bias_table" in n or "mask_token" in n or p.ndim == 1:
            assert id(p) in no_wd, n
        else:
            assert id(p) not in no_wd, n


def test_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    m = GreenMIM(cfg())
    rng = np.random.default_rng(0)  # procedural scenes (white noise has nothing to learn from the context)
    x = torch.stack([torch.from_numpy(render_scene(rng, 32, i)[0]).permute(2, 0, 1).float() / 255 for i in range(2)])
    x = (x - 0.45) / 0.25
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):  # v2 scenes (flat light backgrounds) overfit more slowly than v1: 150 steps, x3
        loss = m((x, None), gen(3)).loss  # same mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * 3 < losses[0], (losses[0], losses[-1])
