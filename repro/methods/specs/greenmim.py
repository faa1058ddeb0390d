"""GreenMIM's knobs, checks and tiny rule (the module is ``repro.methods.greenmim``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, register

PLACEMENTS = ("official", "aligned")
GROUPINGS = ("auto", "group", "single")


@register
class GreenMIMSpec(MethodSpec):
    name = "greenmim"
    impl_path = "repro.methods.greenmim:GreenMIM"
    defaults = {
        "name": "greenmim",
        "mask_ratio": 0.75,
        "mask_patch_size": 32,        # px; must be the last stage's cell (patch_size * 2**(stages - 1))
        "decoder_dim": 512,
        "decoder_depth": 1,
        "decoder_heads": 16,
        "norm_pix_loss": True,
        "decoder_placement": "official",  # official (latents at noise-order positions, as the code) | aligned
        "grouping": "auto",  # auto (official: one masked group when N <= 2 ws^2, else knapsack) | group | single
    }
    linear_feature = "avg"
    finetune_pool = "avg"

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        if params["decoder_placement"] not in PLACEMENTS:
            raise ConfigError(f"method.decoder_placement={params['decoder_placement']!r}; valid: "
                              f"{', '.join(PLACEMENTS)}")
        if params["grouping"] not in GROUPINGS:
            raise ConfigError(f"method.grouping={params['grouping']!r}; valid: {', '.join(GROUPINGS)}")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        out = rule.decoder(params, "decoder_dim", "decoder_depth", "decoder_heads")
        out["mask_patch_size"] = rule.patch(params["mask_patch_size"])  # 32 -> 8, the tiny last-stage cell
        return out
