"""Tiny rules of the transfer stage kinds (``StageKind.tiny``; ``repro.scales.apply_scale`` calls them instead of
the common rule). Torch-free: planning imports this module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from repro.config import deep_merge
from repro.models.archs import ARCHS
from repro.scales import TinyRule, with_tiny_overrides

# The tiny rule of segment stages (on top of repro.scales' model rule): crops / 16 (512 -> 32 px: the tiny image
# size, the pretraining's grid, and the embedded images' size, so a test image is one window), iterations / 400
# (160k -> 400, 80k -> 200; warm-up likewise, at least 2),
# batch by the common rule (16 -> 8), the paper's absolute lr, decoder widths by the encoder's width ratio.
# Iterations: at / 1600 an 80k schedule (50 steps) left mIoU near the floor; / 400 costs 45-80 s on one core
# (measured: 200 / 400 iterations of a micro ViT, eval included) and gives 1.5-2.3x the best constant prediction's
# mIoU on the embedded data, random init and pretrained alike. A larger lr (3e-4, 1e-3 for 1e-4) scored lower.
TINY_CROP_FACTOR = 16
TINY_ITER_FACTOR = 400


def tiny_segment(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A paper-scale segment config at tiny scale (see ``TINY_*`` above)."""
    out = deep_merge(cfg, {})
    m, d, o, t = out["model"], out["data"], out["optim"], out["train"]
    rule = TinyRule(m["arch"])
    paper_depth = rule_depth(m)
    m["arch"] = rule.tiny_arch
    for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        m[k] = None
    m["patch_size"] = rule.patch(m["patch_size"])
    depth = rule_depth(m)
    m["out_indices"] = scale_taps(m["out_indices"], paper_depth, depth)
    m["decoder_channels"] = rule.dim(m["decoder_channels"])
    m["aux_channels"] = rule.dim(m["aux_channels"])
    crop = max(m["patch_size"] * 4, d["img_size"] // TINY_CROP_FACTOR)
    d["resize"] = [round(s * crop / d["img_size"]) for s in d["resize"]]
    d["img_size"] = crop
    if d["dataset"] == "ade20k":
        d["dataset"], d["path"] = "synthetic", None
    if d["dataset"] == "synthetic":
        d["num_classes"] = d["synthetic_classes"] + 1  # the background is a class (repro.data.dense)
    o["iters"] = max(1, math.ceil(o["iters"] / TINY_ITER_FACTOR))
    o["warmup_iters"] = max(2, math.ceil(o["warmup_iters"] / TINY_ITER_FACTOR)) if o["warmup_iters"] else 0
    o["batch_size"] = rule.batch(o["batch_size"])
    t["batch_per_device"] = o["batch_size"]
    t["num_workers"] = 0
    t["log_every"] = 10
    t["ckpt_every"] = max(1, o["iters"] // 2)
    out["eval"]["mode"] = "whole"
    return with_tiny_overrides(out)


def scale_taps(taps: list[int], depth: int, new_depth: int) -> list[int]:
    """Each tap keeps its relative depth (block i of D -> round((i + 1) d / D) - 1 of d), then distinct taps stay
    distinct where the new depth allows (4 taps of a 4-block encoder: every block)."""
    out = [min(new_depth - 1, max(0, round((i + 1) * new_depth / depth) - 1)) for i in taps]
    for j in range(1, len(out)):
        if taps[j] > taps[j - 1]:
            out[j] = max(out[j], out[j - 1] + 1)
    for j in reversed(range(len(out))):
        out[j] = min(out[j], new_depth - len(out) + j) if len(out) <= new_depth else out[j]
    return out


def rule_depth(model: Mapping[str, Any]) -> int:
    return int(model.get("depth") or ARCHS[model["arch"]][1])
