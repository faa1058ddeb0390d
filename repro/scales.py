"""Scales, declared in one place.

``paper``: the recipe exactly as the paper / official code has it.
``tiny``: the same code paths made small by ONE rule applied to every recipe, so relative comparisons inside a table
keep their meaning: ViT-S/B/L -> nano/micro/mini, patch 16 -> 4 (8 -> 2), resolution / 7 (224 -> 32), pretraining
epochs / 100 (evaluation epochs / 50; both rounded up, so every table's ~340 stages run in about an hour on a
2-core CPU), effective batch / 32 (at most 256) with the paper's absolute lr, decoders
shrunk by the encoder's width and depth ratios, ImageNet-like datasets -> the embedded procedural dataset.
Swin (archs ``swin_*``): Swin-T/S -> swin_nano, Swin-B -> swin_micro, Swin-L -> swin_mini, patch 4 -> 1 (the same
/ 4), resolution / 7 rounded to a multiple of patch x 2**(stages - 1) (224 -> 32, 192 -> 24) so the three merges fit,
window scaled with the patch grid (7 at 56 -> 4 at 32, 14 -> 8, 6 at 48 -> 3 at 24), so every stage keeps its number of
windows; a method's 32-px mask unit follows the patch rule (32 -> 8, the last stage's cell in both cases); width and
depth ratios (for decoders) from the stage-1 width and the total depth.
A recipe may override the result only through ``tiny_overrides`` with a ``tiny_reason``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError, deep_merge
from repro.models.archs import ARCHS, SWIN_ARCHS, is_swin

TINY_ARCH = {"vit_small": "vit_nano", "vit_base": "vit_micro", "vit_large": "vit_mini", "vit_huge": "vit_mini",
             "swin_tiny": "swin_nano", "swin_small": "swin_nano", "swin_base": "swin_micro", "swin_large": "swin_mini"}
TINY_PATCH = {16: 4, 14: 4, 8: 2}
EPOCH_FACTOR = 100  # pretraining epochs / 100 (ceil): 100 -> 1, 300 -> 3, 800 -> 8, 1600 -> 16
EVAL_EPOCH_FACTOR = 50  # fine-tuning / linear epochs / 50 (ceil): 100 -> 2, 90 -> 2, 50 -> 1
BATCH_FACTOR = 32
RES_FACTOR = 7
REAL_DATASETS = ("imagenet1k", "imagenet22k", "inat2018", "inat2019")


def _width_depth(arch: str) -> tuple[int, int]:
    """(width, depth) of an arch for the tiny rule's ratios: a Swin's stage-1 width and total depth."""
    if is_swin(arch):
        dim, depths, _, _, _ = SWIN_ARCHS[arch]
        return dim, sum(depths)
    dim, depth, _, _ = ARCHS[arch]
    return dim, depth


class TinyRule:
    """The paper -> tiny mapping for one recipe (knows the paper arch, for width/depth ratios)."""

    def __init__(self, paper_arch: str):
        self.paper_arch = paper_arch
        self.tiny_arch = TINY_ARCH.get(paper_arch, paper_arch)
        pd, pdepth = _width_depth(paper_arch)
        td, tdepth = _width_depth(self.tiny_arch)
        self.width = td / pd
        self.depth = tdepth / pdepth

    @staticmethod
    def epochs(e: float, factor: int = EPOCH_FACTOR) -> int:
        return max(1, math.ceil(e / factor))

    @staticmethod
    def warmup(w: float, factor: int = EPOCH_FACTOR) -> float:
        return w / factor

    @staticmethod
    def batch(b: int) -> int:
        # / 32, capped at 256 so that even linear probing (16384) takes several steps per epoch on 2k images
        return min(256, max(8, b // BATCH_FACTOR))

    @staticmethod
    def patch(p: int) -> int:
        return TINY_PATCH.get(p, max(1, p // 4))

    @staticmethod
    def img(size: int, tiny_patch: int) -> int:
        return max(tiny_patch * 4, round(size / RES_FACTOR / tiny_patch) * tiny_patch)

    def dim(self, d: int, multiple: int = 16) -> int:
        return max(multiple, round(d * self.width / multiple) * multiple)

    def layers(self, n: int) -> int:
        return max(1, math.ceil(n * self.depth))

    @staticmethod
    def heads(dim: int) -> int:
        return max(1, dim // 32)

    def decoder(self, params: dict[str, Any], dim_key: str, depth_key: str, heads_key: str) -> dict[str, Any]:
        out = dict(params)
        out[dim_key] = self.dim(params[dim_key])
        out[depth_key] = self.layers(params[depth_key])
        out[heads_key] = self.heads(out[dim_key])
        return out


def apply_scale(cfg: dict[str, Any], scale: str, method_cls: Any = None) -> dict[str, Any]:
    """Return ``cfg`` at ``scale`` (a new dict); ``method_cls`` (the method's spec, ``repro.methods.registry``)
    shrinks the method's own size knobs."""
    if scale == "paper":
        return cfg
    if scale != "tiny":
        raise ConfigError(f"unknown scale '{scale}'; valid scales: paper, tiny")
    out = deep_merge(cfg, {})
    m, d, o, t = out["model"], out["data"], out.get("optim"), out["train"]
    rule = TinyRule(m["arch"])
    m["arch"] = rule.tiny_arch
    for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        m[k] = None
    paper_grid = d["img_size"] / m["patch_size"]
    m["patch_size"] = rule.patch(m["patch_size"])
    if is_swin(rule.tiny_arch):
        _, depths, _, window, _ = SWIN_ARCHS[rule.paper_arch]
        unit = m["patch_size"] * 2 ** (len(depths) - 1)
        d["img_size"] = max(unit, round(d["img_size"] / RES_FACTOR / unit) * unit)
        m["window_size"] = max(1, round((m.get("window_size") or window) * d["img_size"] / m["patch_size"]
                                        / paper_grid))
    else:
        d["img_size"] = rule.img(d["img_size"], m["patch_size"])
    if d["dataset"] in REAL_DATASETS:
        d["dataset"] = "synthetic"
        d["path"] = None
    if d["dataset"] == "synthetic":
        d["num_classes"] = d["synthetic_classes"]
    elif d["dataset"] == "digits":
        d["num_classes"] = 10
    if o is not None:
        factor = EPOCH_FACTOR if out.get("kind", "pretrain") == "pretrain" else EVAL_EPOCH_FACTOR
        o["epochs"] = rule.epochs(o["epochs"], factor)
        o["warmup_epochs"] = rule.warmup(o["warmup_epochs"], factor)
        if o.get("milestones"):  # multistep: at the same epoch as the warm-up is (700 of 800 -> 7 of 8)
            o["milestones"] = [rule.warmup(m, factor) for m in o["milestones"]]
        paper_batch = o["batch_size"]
        o["batch_size"] = rule.batch(paper_batch)
        frac = float(d.get("train_fraction", 1.0))
        if frac < 1.0 and d["dataset"] == "synthetic":
            # A label fraction (semi-supervised rows) of the small embedded set: at least 4 steps per epoch.
            o["batch_size"] = max(8, min(o["batch_size"], int(d["synthetic_train"] * frac) // 4 // 8 * 8))
        # Keep the paper's absolute lr: with blr x batch / 256 alone, a 32x smaller batch would also take a 32x
        # smaller Adam step, and a tiny run of a few thousand steps would not leave its initialisation.
        if o.get("lr") is None:
            o["blr"] = o["blr"] * paper_batch / o["batch_size"]
        t["batch_per_device"] = min(o["batch_size"], 256)
    t["num_workers"] = 0
    if t.get("compile") is None:  # a tiny stage runs for seconds: compiling its blocks would cost more than it saves
        t["compile"] = False
    t["log_every"] = 10
    t["keep_every"] = 0
    if method_cls is not None and "method" in out:
        out["method"] = method_cls.tiny(dict(out["method"]), rule)
    overrides = out.get("tiny_overrides") or {}
    if overrides:
        if not out.get("tiny_reason"):
            raise ConfigError(f"recipe {out.get('recipe')}: tiny_overrides need a tiny_reason saying why")
        out = deep_merge(out, overrides)
    return out


def scale_of(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("scale", "paper"))
