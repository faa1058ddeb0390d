"""LocalMIM's knobs, checks, tiny rule and cost model (the modules are in ``repro.methods.localmim``: one class for a
ViT encoder, one for a Swin)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, load_class, register
from repro.models.archs import ARCHS, SWIN_ARCHS, is_swin, swin_stage_ends
from repro.models.cost import block_flops, linear_flops, visible_encoder_flops, vit_geometry

SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)
VIT_IMPL, SWIN_IMPL = "repro.methods.localmim:LocalMIMViT", "repro.methods.localmim:LocalMIMSwin"


@register
class LocalMIMSpec(MethodSpec):
    name = "localmim"
    impl_path = "repro.methods.localmim:LocalMIM"
    results_version = 2  # 2: Swin weight-decay groups, one hog_bias draw per layer (issue 10)
    defaults = {
        "name": "localmim",
        "mask_ratio": 0.75,
        "taps": None,             # 0-based block indices; null: default_taps(depth)
        "scales": [4.0, 2.0, 1.0, 0.5],
        "target": "hog",          # hog | pixel
        "hog_bins": 9,
        "hog_bias": False,
        "decoder_dim": 256,
        "decoder_depth": 1,
        "decoder_heads": 8,
        "loss_weights": None,     # null: 1 for every scale
        "norm_pix_loss": True,    # pixel target only
        "grad_isolation": False,
        "global_multiscale": False,
        "feature_fusion": False,
        "merge_coords": "official",  # Swin: official (the official code's labels after a merge) | own
    }
    cost_free = ("merge_coords",)
    linear_feature = "cls"  # the Swin class probes "avg" (no cls token)
    finetune_pool = "avg"
    compiled_units = ("decode_losses",)  # train.compile_scope=all: the per-scale glue after the encoder, one graph

    @classmethod
    def implementation(cls, cfg: Mapping[str, Any] | None = None) -> type[Any]:
        """``LocalMIM`` (which builds the arch's class), or with ``cfg`` the ViT or Swin class itself."""
        if cfg is None:
            return load_class(cls.impl_path)
        return load_class(SWIN_IMPL if is_swin(cfg["model"]["arch"]) else VIT_IMPL)

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        scales = params["scales"]
        if not scales or any(float(s) not in SCALES for s in scales):
            raise ConfigError(f"method.scales={scales} must be a non-empty list of {', '.join(map(str, SCALES))}")
        if params["target"] not in ("hog", "pixel"):
            raise ConfigError(f"method.target={params['target']!r}; valid: hog, pixel")
        if params["global_multiscale"] and params["feature_fusion"]:
            raise ConfigError("method.global_multiscale and method.feature_fusion are exclusive; set one to false")
        taps = params["taps"]
        if taps is not None:
            if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in taps):
                raise ConfigError(f"method.taps={taps} must be non-negative 0-based block indices")
            if list(taps) != sorted(taps):
                raise ConfigError(f"method.taps={taps} must be in increasing order (fine scales on lower blocks)")
        if params["feature_fusion"]:
            if len(scales) != 1:
                raise ConfigError(f"method.feature_fusion reconstructs one scale; pass e.g. method.scales=[1] "
                                  f"(got {scales})")
            if taps is not None and len(taps) < 2:
                raise ConfigError("method.feature_fusion needs at least two taps to fuse")
        elif taps is not None and len(taps) != len(scales):
            raise ConfigError(f"method.taps={taps} needs one entry per scale in method.scales={scales}")
        w = params["loss_weights"]
        if w is not None and (len(w) != len(scales) or any(float(x) < 0 for x in w)):
            raise ConfigError(f"method.loss_weights={w} needs one non-negative weight per scale ({len(scales)})")
        if params["merge_coords"] not in ("official", "own"):
            raise ConfigError(f"method.merge_coords={params['merge_coords']!r}; valid: official (the official Swin "
                              "code's coordinates after a patch merging), own (each token's own)")
        if int(params["hog_bins"]) < 1:
            raise ConfigError(f"method.hog_bins={params['hog_bins']} must be >= 1")
        d, h = int(params["decoder_dim"]), int(params["decoder_heads"])
        if h < 1 or d % h or d % 4:
            raise ConfigError(f"method.decoder_dim={d} must be divisible by 4 and by method.decoder_heads={h}")

    @classmethod
    def inert(cls, cfg: Mapping[str, Any]) -> tuple[str, ...]:
        """``merge_coords`` does nothing on a ViT (no patch merging)."""
        return () if is_swin(str((cfg.get("model") or {}).get("arch", ""))) else ("merge_coords",)

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """Decoder shrunk by the width/depth rule; explicit taps mapped proportionally in depth (1-based layer l of
        the paper encoder -> ceil(l * tiny_depth / paper_depth)); null taps are recomputed from the tiny depth. Swin:
        stage ends map to the same stages' ends."""
        out = rule.decoder(params, "decoder_dim", "decoder_depth", "decoder_heads")
        if out["taps"] is not None and is_swin(rule.paper_arch):
            # Swin: the same stages' ends in the tiny Swin (Swin-B [1, 3, 21, 23] -> swin_micro [1, 3, 5, 7]).
            paper_ends = swin_stage_ends(SWIN_ARCHS[rule.paper_arch][1])
            tiny_ends = swin_stage_ends(SWIN_ARCHS[rule.tiny_arch][1])
            out["taps"] = [tiny_ends[paper_ends.index(t)] if t in paper_ends else t for t in out["taps"]]
        elif out["taps"] is not None:
            paper_depth = ARCHS[rule.paper_arch][1]
            tiny_depth = ARCHS[rule.tiny_arch][1]
            out["taps"] = [max(0, math.ceil((t + 1) * tiny_depth / paper_depth) - 1) for t in out["taps"]]
        return out

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """MAE's encoder, then per scale one small decoder on all L + 1 positions and its rescaling head (ViT only)."""
        g = vit_geometry(cfg)
        if g is None:
            return None
        m = cfg["method"]
        parts, tokens, n = visible_encoder_flops(g, m["mask_ratio"])
        dd, full = m["decoder_dim"], g.length + 1
        scales = list(m["scales"])
        out = 3 * m["hog_bins"] if m["target"] == "hog" else None
        dec = 0.0
        for s in scales:
            o = out if out is not None else g.pix // int(s * s) if s >= 1 else g.pix * 4
            dec += linear_flops(n, g.dim, dd) + m["decoder_depth"] * block_flops(full, dd, 4.0)
            dec += _rescale_head_flops(float(s), g.grid, dd, o)
        parts["decoders"] = dec
        tokens["decoder"] = f"{len(scales)} x {full}"
        return {"parts": parts, "tokens": tokens}


def _rescale_head_flops(scale: float, grid: int, dim: int, out: int) -> float:
    """The rescaling head (deconvolutions / pooling, then a 1x1 conv), forward + backward."""
    g2 = grid * grid
    if scale == 4.0:
        return (linear_flops(g2, dim, dim // 2 * 4) + linear_flops(4 * g2, dim // 2, dim // 4 * 4)
                + linear_flops(16 * g2, dim // 4, out))
    if scale == 2.0:
        return linear_flops(g2, dim, dim // 2 * 4) + linear_flops(4 * g2, dim // 2, out)
    if scale == 1.0:
        return linear_flops(g2, dim, out)
    return linear_flops(g2 / 4, dim, out)
