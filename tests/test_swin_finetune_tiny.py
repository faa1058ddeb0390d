"""Swin fine-tuning at tiny: the paper's lr stays at paper scale; at tiny the one rule caps a Swin fine-tuning's
absolute lr at SWIN_FINETUNE_LR (the papers' 2.5e-3 - 5e-3 left the micro Swin at chance) and changes nothing else;
ViT fine-tuning keeps the paper's absolute lr."""

from __future__ import annotations

from typing import Any

import pytest

from repro.resolve import resolve
from repro.scales import SWIN_FINETUNE_LR, apply_scale

# recipe: (paper lr, paper batch, tiny batch)
RECIPES = {
    "localmim_swin_base": (4.0e-3, 2048, 64),
    "localmim_swin_base_100ep": (5.0e-3, 1024, 32),
    "localmim_swin_base_pixel": (4.0e-3, 1024, 32),
    "localmim_swin_large": (2.0e-3, 2048, 64),
}


def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_lr_kept_and_tiny_lr_capped(name: str) -> None:
    lr, batch, tiny_batch = RECIPES[name]
    paper = resolve(name, "paper", kind="finetune")
    assert (paper["optim"]["lr"], paper["optim"]["batch_size"]) == (lr, batch)
    tiny = resolve(name, "tiny", kind="finetune")
    assert tiny["optim"]["lr"] == SWIN_FINETUNE_LR == 5.0e-4 and tiny["optim"]["batch_size"] == tiny_batch
    # The cap changes only optim.lr: the rule without it (the paper's absolute lr kept) differs in nothing else.
    uncapped = apply_scale({**paper, "model": {**paper["model"], "arch": "vit_base"}}, "tiny")
    skip = {"scale", "model"}
    a = {k: v for k, v in leaves(uncapped).items() if k.split(".")[0] not in skip}
    b = {k: v for k, v in leaves(tiny).items() if k.split(".")[0] not in skip}
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"optim.lr"}
    assert uncapped["optim"]["lr"] == lr


@pytest.mark.parametrize("name", ["simmim_swin_base", "swin_base", "scratch_swin_base"])
def test_every_swin_finetuning_capped_blr_recipes_too(name: str) -> None:
    paper = resolve(name, "paper", kind="finetune")
    absolute = paper["optim"]["blr"] * paper["optim"]["batch_size"] / 256
    assert absolute > SWIN_FINETUNE_LR  # 5e-3, 2.5e-3, 1e-3: the papers' lr, above the cap
    assert resolve(name, "tiny", kind="finetune")["optim"]["lr"] == SWIN_FINETUNE_LR


def test_vit_finetuning_keeps_the_papers_absolute_lr() -> None:
    paper = resolve("localmim_vit_base", "paper", kind="finetune")
    tiny = resolve("localmim_vit_base", "tiny", kind="finetune")
    o = tiny["optim"]
    got = o["lr"] if o.get("lr") is not None else o["blr"] * o["batch_size"] / 256
    want = paper["optim"]["lr"] or paper["optim"]["blr"] * paper["optim"]["batch_size"] / 256
    assert got == pytest.approx(want)


def test_tiny_resolved_values_of_the_100ep_recipe() -> None:
    """The Swin rows of the LocalMIM tables at tiny (swin_micro, 468 steps at batch 32)."""
    t = resolve("localmim_swin_base_100ep", "tiny", kind="finetune")
    o, m = t["optim"], t["model"]
    assert (m["arch"], m["patch_size"], m["window_size"], t["data"]["img_size"]) == ("swin_micro", 1, 4, 32)
    assert (o["lr"], o["batch_size"], o["epochs"], o["layer_decay"], o["clip_grad"]) == (5.0e-4, 32, 3, 0.9, None)
    assert o["warmup_epochs"] == pytest.approx(0.6) and m["drop_path"] == pytest.approx(0.025)
