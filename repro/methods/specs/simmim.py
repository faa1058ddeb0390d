"""SimMIM's knobs, checks and tiny rule (the module is ``repro.methods.simmim``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, register


@register
class SimMIMSpec(MethodSpec):
    name = "simmim"
    impl_path = "repro.methods.simmim:SimMIM"
    results_version = 2  # 2: issue 10 fidelity fixes
    defaults = {
        "name": "simmim",
        "mask_ratio": 0.6,
        "mask_patch_size": 32,    # px per mask unit (official MASK_PATCH_SIZE)
        "shared_rel_pos": True,   # ViT with model.rel_pos=bias: one table for all blocks (official USE_SHARED_RPB)
    }
    linear_feature = "avg"  # the cls token receives no loss of its own (it is dropped before the decoder)
    finetune_pool = "avg"   # official fine-tuning: USE_MEAN_POOLING

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        if int(params["mask_patch_size"]) < 1:
            raise ConfigError(f"method.mask_patch_size={params['mask_patch_size']} must be a positive number of px")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """The mask unit shrinks with the patch size (the tiny rule's patch 16 -> 4): 32 px -> 8 px, so a unit keeps
        covering the same number of patches (2 x 2 for a ViT/16)."""
        out = dict(params)
        out["mask_patch_size"] = max(1, params["mask_patch_size"] * rule.patch(16) // 16)
        return out
