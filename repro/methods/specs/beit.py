"""BEiT's knobs, checks, tiny rule and substitutes (the module is ``repro.methods.beit``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, register

PAPER_GRID = 14  # 224 px / patch 16: the tiny rule scales patch counts by tiny_grid^2 / 14^2
PAPER_PATCH_DIM = 16 * 16 * 3
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")
TOKENIZERS = ("kmeans", "dalle")  # the kinds repro.models.tokenizer.build_tokenizer builds


@register
class BEiTSpec(MethodSpec):
    name = "beit"
    impl_path = "repro.methods.beit:BEiT"
    results_version = 2  # 2: issue 10 fidelity fixes
    defaults = {
        "name": "beit",
        "num_mask_patches": 75,     # masked patches per image (BEiT: 75 of 196)
        "min_block": 16,            # min_mask_patches_per_block
        "max_block": None,          # max_mask_patches_per_block (None: num_mask_patches)
        "min_aspect": 0.3,
        "shared_rel_pos": True,     # one relative-bias table for all layers (needs model.rel_pos=bias)
        "tokenizer": "kmeans",      # kmeans (offline substitute) | dalle (needs tokenizer_path)
        "tokenizer_path": None,     # DALL-E encoder state dict (see repro/models/tokenizer.py)
        "vocab_size": 8192,
        "kmeans_images": 4096,      # training images whose patches fit the k-means codebook
        "kmeans_iters": 10,
        "kmeans_norm": "patch",     # patch: per-patch normalised pixels | none
        "color_jitter": 0.4,
        "second_interpolation": "lanczos",  # resize of the tokenizer's own view (DALL-E)
        "num_windows": 0,           # > 0: LoMaR window masking (Table 5: 4 windows of 7x7)
        "window_size": 7,
        "window_placement": "shared",  # shared: same windows for the whole batch (LoMaR) | per_image
    }
    linear_feature = "avg"
    finetune_pool = "avg"

    @classmethod
    def substitutes(cls, params: Mapping[str, Any]) -> list[str]:
        if params["tokenizer"] == "kmeans":
            return ["BEiT targets are k-means codebook tokens, a substitute for the DALL-E dVAE"]
        return []

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        for key in ("num_mask_patches", "min_block", "kmeans_images", "kmeans_iters"):
            if int(params[key]) < 1:
                raise ConfigError(f"method.{key}={params[key]} must be >= 1")
        if params["max_block"] is not None and int(params["max_block"]) < int(params["min_block"]):
            raise ConfigError(f"method.max_block={params['max_block']} is below method.min_block; pass null or more")
        if not 0.0 < float(params["min_aspect"]) <= 1.0:
            raise ConfigError(f"method.min_aspect={params['min_aspect']} must be in (0, 1]")
        if int(params["vocab_size"]) < 2:
            raise ConfigError(f"method.vocab_size={params['vocab_size']} must be >= 2")
        if params["num_windows"] < 0 or params["window_size"] < 2:
            raise ConfigError(f"method.num_windows={params['num_windows']} (0 = off) / window_size="
                              f"{params['window_size']}: need num_windows >= 0 and window_size >= 2")
        for key, choices in (("tokenizer", TOKENIZERS), ("kmeans_norm", ("patch", "none")),
                             ("window_placement", ("shared", "per_image")),
                             ("second_interpolation", INTERPOLATIONS)):
            if params[key] not in choices:
                raise ConfigError(f"method.{key}={params[key]!r}; valid: {', '.join(choices)}")
        if params["tokenizer"] == "dalle":
            path = params["tokenizer_path"]
            if not path or not Path(path).is_file():
                raise ConfigError(f"method.tokenizer=dalle needs method.tokenizer_path=<DALL-E encoder state dict>; "
                                  f"'{path}' is not a file (or use method.tokenizer=kmeans, the offline substitute)")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """Patch counts scale with the grid area (14x14 -> 8x8: 75 -> 24 masked, blocks >= 5), the window with the
        grid side (7 -> 4, as LoMaR), and the k-means vocabulary with the pixels per patch (768 -> 48: 8192 -> 512;
        the DALL-E vocabulary is fixed by its weights)."""
        out = dict(params)
        tp = rule.patch(16)
        tiny_grid = rule.img(PAPER_GRID * 16, tp) // tp
        area = tiny_grid**2 / PAPER_GRID**2
        for key in ("num_mask_patches", "min_block", "max_block"):
            if out[key] is not None:
                out[key] = max(1, round(params[key] * area))
        out["window_size"] = max(2, round(params["window_size"] * tiny_grid / PAPER_GRID))
        if params["tokenizer"] == "kmeans":
            out["vocab_size"] = max(16, round(params["vocab_size"] * tp * tp * 3 / PAPER_PATCH_DIM))
        return out
