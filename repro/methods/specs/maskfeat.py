"""MaskFeat's knobs, checks, tiny rule and cost model (the module is ``repro.methods.maskfeat``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, register
from repro.models.cost import block_flops, linear_flops, vit_geometry


@register
class MaskFeatSpec(MethodSpec):
    name = "maskfeat"
    impl_path = "repro.methods.maskfeat:MaskFeat"
    defaults = {
        "name": "maskfeat",
        "mask_ratio": 0.4,
        # smallest masking block, in patches; null: SlowFast's rule (datasets/imagenet.py), a fifth of the masked
        # patches rounded down (78 // 5 = 15 at 14 x 14; BEiT's generator default of 16 is not what it passes)
        "min_block": None,
        "min_aspect": 0.3,
        "hog_bins": 9,
        "cells_per_patch": 2,   # HOG cells per patch side: 16-px patches / 8-px cells
    }
    cost_free = ("min_block", "min_aspect")  # the block shapes of the 40% masked: every patch is encoded alike
    linear_feature = "avg"
    finetune_pool = "avg"

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        if params["min_block"] is not None and int(params["min_block"]) < 1:
            raise ConfigError(f"method.min_block={params['min_block']} must be >= 1 patch")
        if not (0.0 < float(params["min_aspect"]) <= 1.0):
            raise ConfigError(f"method.min_aspect={params['min_aspect']} must be in (0, 1]")
        if int(params["hog_bins"]) < 1 or int(params["cells_per_patch"]) < 1:
            raise ConfigError("method.hog_bins and method.cells_per_patch must be >= 1")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """A given ``min_block`` scaled by the grid area, assuming the paper geometry 224 px / patch 16
        (14 x 14 -> 8 x 8); null keeps SlowFast's rule, which follows the grid by itself."""
        out = dict(params)
        if params["min_block"] is None:
            return out
        tp = rule.patch(16)
        ratio = (rule.img(224, tp) // tp) ** 2 / (224 // 16) ** 2
        out["min_block"] = max(1, round(params["min_block"] * ratio))
        return out

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """Every patch (+ cls) through the encoder."""
        g = vit_geometry(cfg)
        if g is None:
            return None
        parts = {"patch_embed": linear_flops(g.length, g.pix, g.dim, input_grad=False),
                 "encoder": g.depth * block_flops(g.length + g.cls, g.dim, g.mlp, rel_buckets=g.rel)}
        return {"parts": parts, "tokens": {"encoder": f"{g.length + g.cls}"}}
