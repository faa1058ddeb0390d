"""Architecture tables and size arithmetic, torch-free (planning and validation read them without building a model).

``repro.models.vit`` and ``repro.models.swin`` build the timm modules from these entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from repro.config import ConfigError

# name: (embed_dim, depth, num_heads, mlp_ratio). The first three are the tiny-scale stand-ins (see repro.scales).
ARCHS: dict[str, tuple[int, int, int, float]] = {
    "vit_nano": (48, 4, 2, 4.0),
    "vit_micro": (64, 4, 2, 4.0),
    "vit_mini": (96, 6, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
}

# name: (embed_dim, depths, num_heads, window_size, mlp_ratio). nano/micro/mini are the tiny-scale stand-ins
# (repro.scales: swin_tiny/small -> nano, base -> micro, large -> mini); their window is the tiny-scale one.
SWIN_ARCHS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int, float]] = {
    "swin_nano": (16, (2, 2, 2, 2), (1, 2, 4, 8), 4, 4.0),
    "swin_micro": (32, (2, 2, 2, 2), (1, 2, 4, 8), 4, 4.0),
    "swin_mini": (48, (2, 2, 4, 2), (2, 4, 8, 16), 4, 4.0),
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 4.0),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 4.0),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 4.0),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 4.0),
}


def is_swin(arch: str) -> bool:
    return str(arch).startswith("swin_")


def arch_dims(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved ViT sizes: the arch's table entry with any explicit ``embed_dim/depth/num_heads/mlp_ratio`` on top."""
    arch = model_cfg["arch"]
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch '{arch}'; valid: {', '.join(ARCHS)}")
    dim, depth, heads, mlp = ARCHS[arch]
    return {
        "embed_dim": model_cfg.get("embed_dim") or dim,
        "depth": model_cfg.get("depth") or depth,
        "num_heads": model_cfg.get("num_heads") or heads,
        "mlp_ratio": model_cfg.get("mlp_ratio") or mlp,
    }


def swin_dims(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved sizes: the arch's entry with an explicit ``embed_dim``, ``mlp_ratio`` and ``window_size`` on top."""
    arch = model_cfg["arch"]
    if arch not in SWIN_ARCHS:
        raise ConfigError(f"unknown model.arch '{arch}'; valid Swin archs: {', '.join(SWIN_ARCHS)}")
    for k in ("depth", "num_heads"):
        if model_cfg.get(k) is not None:
            raise ConfigError(f"model.{k} is a ViT knob; a Swin's per-stage depths and heads come from model.arch "
                              f"(set model.{k}=null)")
    dim, depths, heads, window, mlp = SWIN_ARCHS[arch]
    return {
        "embed_dim": model_cfg.get("embed_dim") or dim,
        "depths": depths,
        "num_heads": heads,
        "window_size": model_cfg.get("window_size") or window,
        "mlp_ratio": model_cfg.get("mlp_ratio") or mlp,
    }


def check_geometry(img_size: int, patch_size: int, depths: Sequence[int], window: int) -> list[int]:
    """Swin stage grid sizes; ConfigError when a stage grid is not divisible into whole windows or merges."""
    if img_size % patch_size:
        raise ConfigError(f"data.img_size={img_size} is not a multiple of model.patch_size={patch_size}")
    grid = img_size // patch_size
    n = len(depths)
    if grid % 2 ** (n - 1):
        raise ConfigError(f"Swin needs the patch grid ({grid}) divisible by {2 ** (n - 1)} for its {n - 1} merges; "
                          f"use data.img_size a multiple of {patch_size * 2 ** (n - 1)}")
    grids = [grid // 2**i for i in range(n)]
    for g in grids:
        if g > window and g % window:
            raise ConfigError(f"Swin stage grid {g} is not a multiple of model.window_size={window}; pick a window "
                              f"that divides every stage grid larger than it ({grids})")
    return grids


def swin_stage_ends(depths: Sequence[int]) -> list[int]:
    """0-based index of the last block of every Swin stage ([1, 3, 21, 23] for Swin-B's [2, 2, 18, 2])."""
    return [sum(depths[: i + 1]) - 1 for i in range(len(depths))]
