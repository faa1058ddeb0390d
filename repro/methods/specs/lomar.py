"""LoMaR's knobs, checks, tiny rule and cost model (the module is ``repro.methods.lomar``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, register
from repro.models.cost import block_flops, linear_flops, vit_geometry

# Paper grid at 224 px / patch 16: the tiny rule scales the window by tiny_grid / PAPER_GRID.
PAPER_GRID = 14


@register
class LoMaRSpec(MethodSpec):
    name = "lomar"
    impl_path = "repro.methods.lomar:LoMaR"
    results_version = 2  # 2: official image-window pairing (issue 10)
    defaults = {
        "name": "lomar",
        "window_size": 7,
        "num_windows": 4,
        "mask_ratio": 0.8,
        "window_placement": "shared",  # shared: same windows for the whole batch (official) | per_image
        "window_pairing": "official",  # official: image r % N with window r % W (module doc) | all: every window
        "official_per_gpu_batch": 256,  # N of the official pairing: the official runs' per-GPU batch (README)
        "norm_pix_loss": True,
        "arch": "encoder",  # encoder: all window tokens + linear head | encoder_decoder: MAE-style (Fig. 4)
        "position": "irpe",  # irpe (model.rel_pos irpe, no absolute table) | sincos (absolute, supp. Table 1)
        "decoder_dim": 512,  # encoder_decoder only
        "decoder_depth": 8,
        "decoder_heads": 16,
    }
    linear_feature = "cls"
    finetune_pool = "avg"
    cost_free = ("window_pairing", "official_per_gpu_batch")  # which image meets which window: same step cost

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        k, ratio = params["window_size"], params["mask_ratio"]
        if k < 2 or params["num_windows"] < 1:
            raise ConfigError(f"method.window_size={k} / num_windows={params['num_windows']}: need window_size >= 2 "
                              "and num_windows >= 1")
        if not 1 <= int(k * k * ratio) < k * k:
            raise ConfigError(f"method.mask_ratio={ratio} masks {int(k * k * ratio)} of {k * k} window patches; "
                              "pick a ratio that masks at least one and keeps at least one")
        if int(params["official_per_gpu_batch"]) < 1:
            raise ConfigError(f"method.official_per_gpu_batch={params['official_per_gpu_batch']}: need >= 1")
        for key, choices in (("window_placement", ("shared", "per_image")), ("window_pairing", ("official", "all")),
                             ("arch", ("encoder", "encoder_decoder")),
                             ("position", ("irpe", "sincos"))):
            if params[key] not in choices:
                raise ConfigError(f"method.{key}={params[key]!r}; valid: {', '.join(choices)}")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        out = rule.decoder(params, "decoder_dim", "decoder_depth", "decoder_heads")
        # The window covers the same fraction of the grid: tiny grids are 8x8 (32 px / patch 4) where the paper's are
        # 14x14 (224 px / patch 16), so K -> round(K * 8/14) (7 -> 4, 5 -> 3, 9 -> 5, 11 -> 6, 14 -> 8).
        tiny_patch = rule.patch(16)
        tiny_grid = rule.img(PAPER_GRID * 16, tiny_patch) // tiny_patch
        out["window_size"] = max(2, round(params["window_size"] * tiny_grid / PAPER_GRID))
        return out

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """``num_windows`` sequences of K^2 + 1 tokens whatever the resolution (or, encoder_decoder, the visible
        window patches through the encoder and the whole window through the decoder)."""
        g = vit_geometry(cfg)
        if g is None:
            return None
        m = cfg["method"]
        k, w = m["window_size"], m["num_windows"]
        t = k * k
        parts = {"patch_embed": linear_flops(w * t, g.pix, g.dim, input_grad=False)}
        tokens = {}
        if m.get("arch", "encoder") == "encoder":
            parts["encoder"] = g.depth * block_flops(t + 1, g.dim, g.mlp, seqs=w, rel_buckets=g.rel)
            parts["head"] = linear_flops(w * t, g.dim, g.pix)
            tokens["encoder"] = f"{w} x {t + 1}"
        else:
            keep = t - int(t * m["mask_ratio"])
            dd = m["decoder_dim"]
            parts["encoder"] = g.depth * block_flops(keep + 1, g.dim, g.mlp, seqs=w, rel_buckets=g.rel)
            parts["decoder"] = w * (linear_flops(keep + 1, g.dim, dd) + m["decoder_depth"] * block_flops(t + 1, dd)
                                    + linear_flops(t + 1, dd, g.pix))
            tokens["encoder"] = f"{w} x {keep + 1}"
            tokens["decoder"] = f"{w} x {t + 1}"
        return {"parts": parts, "tokens": tokens}
