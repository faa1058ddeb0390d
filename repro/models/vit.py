"""ViT backbones through timm, fixed 2-D sin-cos position tables, and the relative-position hook.

Every encoder the suite trains is a ``timm.models.vision_transformer.VisionTransformer`` built by ``create_vit``, so
its state dict loads into ``timm.create_model(timm_name(...), ...)``. Methods that feed a subset of tokens (MAE's
visible patches, LoMaR's windows) call the blocks themselves; when ``rel_pos`` is on they first hand the tokens' grid
coordinates to the attention layers with ``set_token_coords``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
# timm's registered model each arch is built from (its defaults are overridden by the explicit sizes).
_TIMM_BASE = {
    "vit_nano": "vit_tiny", "vit_micro": "vit_tiny", "vit_mini": "vit_tiny",
    "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_huge": "vit_huge",
}


def arch_dims(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved sizes: the arch's table entry with any explicit ``embed_dim/depth/num_heads/mlp_ratio`` on top."""
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


class RelPosAttention(Attention):
    """timm Attention plus a relative-position term computed from the token coordinates set before the forward.

    ``kind='bias'``: one learnable bias per head and relative offset (BEiT/SimMIM "shared relative position bias"),
    indexed at the coordinates actually present, so any subset of the grid works. ``coords`` is ``(B, N_patch, 2)``
    (row, col); tokens before the patches (cls) get their own learned bias rows. Other kinds (LoMaR's contextual iRPE)
    subclass this and override ``position_term``.
    """

    def __init__(self, dim: int, num_heads: int, grid: int, num_prefix: int = 1, qkv_bias: bool = True, **kw: Any):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kw)
        self.grid = grid
        self.num_prefix = num_prefix
        span = 2 * grid - 1
        self.rel_table = nn.Parameter(torch.zeros(span * span + 3, num_heads))  # +3: cls->tok, tok->cls, cls->cls
        nn.init.trunc_normal_(self.rel_table, std=0.02)
        self.coords: torch.Tensor | None = None

    def position_term(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """Additive attention bias of shape (B or 1, H, N, N)."""
        coords = self.coords
        if coords is None:
            raise RuntimeError("relative-position attention needs set_token_coords() before the forward pass")
        span = 2 * self.grid - 1
        rel = coords[:, :, None, :] - coords[:, None, :, :] + (self.grid - 1)  # (B, P, P, 2)
        idx = rel[..., 0] * span + rel[..., 1]
        b = idx.shape[0]
        full = torch.full((b, n, n), span * span + 2, dtype=torch.long, device=idx.device)
        k = self.num_prefix
        full[:, k:, k:] = idx
        full[:, :k, k:] = span * span
        full[:, k:, :k] = span * span + 1
        return self.rel_table[full].permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        b, n, c = x.shape
        full = n - self.num_prefix == self.grid * self.grid
        if full and (self.coords is None or self.coords.shape[1] != n - self.num_prefix):
            # A full-image pass that skipped the model's forward() hook (e.g. forward_features in the evaluations).
            self.coords = grid_coords(self.grid, self.grid, x.device)[None]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.position_term(q, n).to(q.dtype)
        if attn_mask is not None:
            bias = bias + attn_mask
        drop = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


REL_POS_KINDS: dict[str, type[RelPosAttention]] = {"bias": RelPosAttention}


def register_rel_pos(kind: str, cls: type[RelPosAttention]) -> None:
    """Methods add their relative-position schemes here (LoMaR: contextual iRPE)."""
    REL_POS_KINDS[kind] = cls


def create_vit(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
               ) -> VisionTransformer:
    """Build the encoder: a timm ViT with a fixed (or trainable) 2-D sin-cos table and optional relative positions."""
    import timm

    kw = timm_kwargs(model_cfg, img_size, num_classes, global_pool)
    vit: VisionTransformer = timm.create_model(timm_name(model_cfg["arch"], model_cfg["patch_size"]),
                                               pretrained=False, **kw)
    pos = model_cfg.get("pos_embed", "sincos")
    if pos != "none":
        gh, gw = vit.patch_embed.grid_size
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_2d(vit.embed_dim, gh, gw, cls_token=vit.cls_token is not None)[None])
        vit.pos_embed.requires_grad_(pos == "learned")
    rel = model_cfg.get("rel_pos", "none")
    if rel != "none":
        if rel not in REL_POS_KINDS:
            import repro.methods  # noqa: F401  (methods register their relative-position schemes)
        if rel not in REL_POS_KINDS:
            raise ValueError(f"unknown model.rel_pos '{rel}'; valid: none, {', '.join(REL_POS_KINDS)}"
                             + ("" if rel != "irpe" else " (irpe is registered by repro.methods.lomar)"))
        grid = vit.patch_embed.grid_size[0]
        for blk in vit.blocks:
            old = blk.attn
            new = REL_POS_KINDS[rel](vit.embed_dim, vit.blocks[0].attn.num_heads, grid,
                                     qkv_bias=old.qkv.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            blk.attn = new
        coords = grid_coords(grid, grid)
        # A full-image forward through timm's own forward() uses every grid position.
        vit.register_forward_pre_hook(lambda m, args: set_token_coords(m, coords.to(args[0].device)[None]))
    return vit


def share_rel_pos_table(vit: nn.Module) -> nn.Parameter:
    """Make every relative-position-bias layer of ``vit`` use the first layer's table (BEiT pretraining's "shared
    relative position bias"); returns the shared parameter.

    The state dict still has one ``blocks.<i>.attn.rel_table`` key per layer (all the same tensor), so the exported
    encoder loads into a ``rel_pos: bias`` ViT, each layer getting its own copy of the shared table, as BEiT's
    fine-tuning initialises its per-layer tables."""
    layers = [m for m in vit.modules() if type(m) is RelPosAttention]
    if not layers:
        raise ValueError("share_rel_pos_table needs a ViT built with model.rel_pos=bias")
    table = layers[0].rel_table
    for m in layers[1:]:
        m.rel_table = table
    return table


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) long tensor of (row, col) in patch-flattening order."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)


def set_token_coords(vit: nn.Module, coords: torch.Tensor | None) -> None:
    """Tell every relative-position attention layer the (B, N_patch, 2) grid coordinates of the coming tokens."""
    for m in vit.modules():
        if isinstance(m, RelPosAttention):
            m.coords = coords


def has_rel_pos(vit: nn.Module) -> bool:
    return any(isinstance(m, RelPosAttention) for m in vit.modules())


def encoder_state_dict(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Plain tensor state dict of the encoder, without any classifier head."""
    return {k: v.detach().cpu().clone() for k, v in vit.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
