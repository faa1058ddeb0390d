"""MAE's knobs, checks, tiny rule and cost model (the module is ``repro.methods.mae``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.methods.registry import MethodSpec, check_ratio, register
from repro.models.cost import block_flops, linear_flops, visible_encoder_flops, vit_geometry


@register
class MAESpec(MethodSpec):
    name = "mae"
    impl_path = "repro.methods.mae:MAE"
    defaults = {
        "name": "mae",
        "mask_ratio": 0.75,
        "decoder_dim": 512,
        "decoder_depth": 8,
        "decoder_heads": 16,
        "norm_pix_loss": True,
    }
    linear_feature = "cls"
    finetune_pool = "avg"
    # train.compile_scope=all: the decoder's glue (mask tokens, unshuffle, positions), prediction and loss, one graph
    compiled_units = ("decode_loss",)

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        return rule.decoder(params, "decoder_dim", "decoder_depth", "decoder_heads")

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """Visible patches (+ cls) through the encoder; the decoder on all L + 1 positions."""
        g = vit_geometry(cfg)
        if g is None:
            return None
        m = cfg["method"]
        parts, tokens, n = visible_encoder_flops(g, m["mask_ratio"])
        dd, full = m["decoder_dim"], g.length + 1
        parts["decoder"] = (linear_flops(n, g.dim, dd) + m["decoder_depth"] * block_flops(full, dd, 4.0)
                            + linear_flops(full, dd, g.pix))
        tokens["decoder"] = f"{full}"
        return {"parts": parts, "tokens": tokens}
