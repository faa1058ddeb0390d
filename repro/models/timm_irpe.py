"""timm-registered ViTs with LoMaR's contextual iRPE attention (``model.rel_pos: irpe``), which timm has no model for.

Importing this module registers ``repro_vit_irpe`` (sizes from the keyword arguments) and sized names mirroring
timm's (``repro_vit_irpe_base_patch16_224`` ...), so ``timm.create_model(name, **kwargs)`` builds the encoder that
``repro.models.vit.create_vit`` builds for ``rel_pos: irpe``: timm's VisionTransformer whose blocks are
``RelPosBlock``s with ``IRPEAttention``. Its state dict is our exported encoder's (``blocks.<i>.attn.rpe_k`` included)
and ``forward_features`` on a full image is our encoder's. Only random initialisation (there are no hub weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from repro.models.irpe import IRPEAttention
from repro.models.relpos import RelPosBlock

# Default sizes of the sized names (timm's ViT sizes); kwargs override them, as with timm's own vit_* names.
_SIZES = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def vit_irpe(**kwargs: Any) -> VisionTransformer:
    """timm's VisionTransformer (any of its keyword arguments) with iRPE attention in every block."""
    if kwargs.pop("pretrained", False):
        raise ValueError("repro_vit_irpe models have no pretrained weights; load an encoder_timm.pth instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    kwargs.setdefault("pos_embed", "none")  # LoMaR's encoder has relative positions only
    vit = VisionTransformer(block_fn=RelPosBlock, **kwargs)
    grid = vit.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"iRPE attention needs a square patch grid, got {tuple(grid)}")
    for blk in vit.blocks:
        old = blk.attn
        new = IRPEAttention(vit.embed_dim, old.num_heads, grid[0], num_prefix=vit.num_prefix_tokens,
                            qkv_bias=old.qkv.bias is not None)
        new.load_state_dict(old.state_dict(), strict=False)  # keep timm's initialisation of qkv / proj
        blk.attn = new
    return vit


@register_model
def repro_vit_irpe(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Sizes entirely from ``kwargs`` (default: ViT-B/16 at 224)."""
    return vit_irpe(pretrained=pretrained, **{**_SIZES["base"], "patch_size": 16, **kwargs})


def _sized(size: str, patch: int) -> Callable[..., VisionTransformer]:
    def entry(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return vit_irpe(pretrained=pretrained, **{**_SIZES[size], "patch_size": patch, **kwargs})

    entry.__name__ = f"repro_vit_irpe_{size}_patch{patch}_224"
    entry.__qualname__ = entry.__name__
    entry.__module__ = __name__
    entry.__doc__ = f"ViT-{size}/{patch} at 224 with iRPE attention (kwargs override the sizes)."
    return entry


for _size in _SIZES:
    for _patch in ((16, 8) if _size in ("small", "base") else (16,)):
        globals()[f"repro_vit_irpe_{_size}_patch{_patch}_224"] = register_model(_sized(_size, _patch))


def irpe_timm_name(vit_timm_name: str) -> str:
    """The registered iRPE name beside timm's ``vit_<size>_patch<p>_224`` (the generic one for other names)."""
    name = "repro_" + vit_timm_name.replace("vit_", "vit_irpe_", 1)
    from timm.models import is_model

    return name if is_model(name) else "repro_vit_irpe"
