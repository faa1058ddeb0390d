"""ViT backbones through timm, with fixed 2-D sin-cos position tables and, on request, relative-position attention
(``repro.models.relpos``; LoMaR's iRPE: ``repro.models.irpe``).

Every encoder the suite trains is a ``timm.models.vision_transformer.VisionTransformer`` built by ``create_vit``, so
its state dict loads into ``timm.create_model(timm_name(...), ...)``. With ``model.rel_pos`` the blocks are
``RelPosBlock``s: methods that feed a subset of tokens (MAE's visible patches, LoMaR's windows) call them with the
tokens' grid coordinates (``run_blocks``); timm's own forward passes none, which means the full grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from repro.models.archs import ARCHS, arch_dims  # noqa: F401  (ARCHS re-exported; the tables live there)
from repro.models.irpe import IRPEAttention
from repro.models.relpos import RelPosAttention, RelPosBlock

# timm's registered model each arch is built from (its defaults are overridden by the explicit sizes).
_TIMM_BASE = {
    "vit_nano": "vit_tiny", "vit_micro": "vit_tiny", "vit_mini": "vit_tiny",
    "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_huge": "vit_huge",
}


def timm_name(arch: str, patch_size: int) -> str:
    """The timm model name to pass to ``timm.create_model`` (with the explicit sizes as kwargs)."""
    base = _TIMM_BASE[arch]
    if base in ("vit_small", "vit_base") and patch_size == 8:
        return f"{base}_patch8_224"
    return f"{base}_patch{14 if base == 'vit_huge' else 16}_224"


def timm_kwargs(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
                ) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(timm_name(...), **kw)`` build exactly our encoder."""
    d = arch_dims(model_cfg)
    pool = global_pool or model_cfg.get("global_pool", "token")
    cls_token = bool(model_cfg.get("class_token", True))
    return {
        "img_size": img_size,
        "patch_size": model_cfg["patch_size"],
        "embed_dim": d["embed_dim"],
        "depth": d["depth"],
        "num_heads": d["num_heads"],
        "mlp_ratio": d["mlp_ratio"],
        "num_classes": num_classes,
        "class_token": cls_token,
        "global_pool": "avg" if pool == "avg" or not cls_token else "token",  # no cls token: mean + fc_norm
        "drop_path_rate": float(model_cfg.get("drop_path") or 0.0),
        "init_values": model_cfg.get("layer_scale"),
        "pos_embed": "none" if model_cfg.get("pos_embed") == "none" else "learn",
    }


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2)), the MAE/Transformer convention."""
    if dim % 2:
        raise ValueError("sin-cos embedding needs an even dimension")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D table of shape ``(grid_h*grid_w [+1], dim)``: first half encodes x (column), second half y (row);
    the cls row (first) is zeros. Row-major token order, as patch embedding flattens."""
    if dim % 4:
        raise ValueError("2-D sin-cos embedding needs a dimension divisible by 4")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def set_fused_attn(module: nn.Module, on: bool) -> int:
    """Run every attention layer of ``module`` through SDPA (``on``) or the explicit softmax(QK^T)V: timm's ViT,
    decoder, CaiT class-attention and Swin window attention (their ``fused_attn``), the relative-position layers here,
    and the visible-only Swin attention of ``repro.models.swin`` (``explicit_attn``). Returns how many layers."""
    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = on
            m.explicit_attn = not on
            n += 1
    return n


def rel_pos_kinds() -> dict[str, type[RelPosAttention]]:
    """``model.rel_pos`` -> its attention class."""
    return {"bias": RelPosAttention, "irpe": IRPEAttention}


# (function, backend, mode, dynamic) -> torch.compile(function): one compiled callable per function, shared by every
# module that runs it (a method's compiled units, the visible-only Swin block)
_COMPILED: dict[tuple[Callable[..., Any], str, str | None, bool | None], Callable[..., Any]] = {}


def compile_once(fn: Callable[..., Any], backend: str, mode: str | None, dynamic: bool | None) -> Callable[..., Any]:
    """``torch.compile(fn, ...)``, made once per (function, backend, mode, dynamic) in this process."""
    key = (fn, backend, mode, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=dynamic, **({"mode": mode} if mode else {}))
    return _COMPILED[key]


def run_blocks(vit: VisionTransformer, x: torch.Tensor, coords: torch.Tensor | None = None,
               hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``vit``'s blocks on tokens ``x`` (prefix first) whose patch tokens sit at grid ``coords`` (B or 1, N_patch, 2)
    (used by relative-position encoders; None: the full grid); each block's output is appended to ``hidden``."""
    kw = {"coords": coords} if coords is not None and isinstance(vit.blocks[0], RelPosBlock) else {}
    for blk in vit.blocks:
        x = blk(x, **kw)
        if hidden is not None:
            hidden.append(x)
    return x


def create_vit(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
               ) -> VisionTransformer:
    """Build the encoder: a timm ViT with a fixed (or trainable) 2-D sin-cos table and optional relative positions."""
    import timm

    kw = timm_kwargs(model_cfg, img_size, num_classes, global_pool)
    rel = model_cfg.get("rel_pos", "none")
    kinds = rel_pos_kinds()
    if rel != "none":
        if rel not in kinds:
            raise ValueError(f"unknown model.rel_pos '{rel}'; valid: none, {', '.join(kinds)}")
        kw["block_fn"] = RelPosBlock
    vit: VisionTransformer = timm.create_model(timm_name(model_cfg["arch"], model_cfg["patch_size"]),
                                               pretrained=False, **kw)
    pos = model_cfg.get("pos_embed", "sincos")
    if pos != "none":
        gh, gw = vit.patch_embed.grid_size
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_2d(vit.embed_dim, gh, gw, cls_token=vit.cls_token is not None)[None])
        vit.pos_embed.requires_grad_(pos == "learned")
    if rel != "none":
        grid = vit.patch_embed.grid_size[0]
        for blk in vit.blocks:
            old = blk.attn
            new = kinds[rel](vit.embed_dim, vit.blocks[0].attn.num_heads, grid, num_prefix=vit.num_prefix_tokens,
                             qkv_bias=old.qkv.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            blk.attn = new
    return vit


def encoder_state_dict(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Plain tensor state dict of the encoder, without any classifier head."""
    return {k: v.detach().cpu().clone() for k, v in vit.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def with_zero_pos_embed(state: dict[str, torch.Tensor], vit: VisionTransformer, grid: int) -> dict[str, torch.Tensor]:
    """``state`` plus an all-zero ``pos_embed`` when ``vit`` has no absolute table (BEiT, LoMaR): evaluation ViTs built
    with a fixed table then get exactly the position-free encoder; ViTs built with ``pos_embed=none`` ignore it."""
    if vit.pos_embed is None:
        state["pos_embed"] = torch.zeros(1, grid * grid + vit.num_prefix_tokens, vit.embed_dim)
    return state
