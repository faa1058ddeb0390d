"""Attention with a relative-position term computed from the tokens' grid coordinates, so any subset of the grid
(MAE's visible patches, LoMaR's windows) attends as it sits on the image: BEiT / SimMIM's per-head bias table
(``RelPosAttention``) and the block that hands the coordinates on (``RelPosBlock``); LoMaR's contextual iRPE subclasses
it (``repro.models.irpe``). ``repro.models.vit.create_vit`` builds them from ``model.rel_pos``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float,
              fused: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, H, N, d) tensors; ``bias`` is an additive float mask broadcast to
    (B, H, N, N) (relative positions, -inf / large negative where a pair must not attend). ``fused``: one
    ``scaled_dot_product_attention`` call (flash / memory-efficient / CPU kernels, the bias as ``attn_mask``);
    otherwise the explicit product, softmax and dropout (``train.fused_attn=false``, for debugging)."""
    if fused:
        if bias is not None and bias.stride(-1) != 1:
            bias = bias.contiguous()  # CUDA's fused kernels refuse a mask without unit last-dim stride
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) long tensor of (row, col) in patch-flattening order."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)


class RelPosAttention(Attention):
    """timm Attention plus a relative-position term computed from the tokens' grid coordinates.

    ``kind='bias'``: one learnable bias per head and relative offset (BEiT/SimMIM "shared relative position bias"),
    indexed at the coordinates actually present, so any subset of the grid works. ``coords`` (an argument of the
    forward, passed on by ``RelPosBlock``) is ``(B or 1, N_patch, 2)`` (row, col); without it the patch tokens are
    the full grid in raster order. Tokens before the patches (cls) get their own learned bias rows. Other kinds
    (LoMaR's contextual iRPE, ``repro.models.irpe``) subclass this and override ``position_term``.
    """

    def __init__(self, dim: int, num_heads: int, grid: int, num_prefix: int = 1, qkv_bias: bool = True,
                 **kw: Any) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kw)
        self.fused_attn = True  # SDPA whatever timm's default; ``set_fused_attn`` (train.fused_attn) switches it
        self.grid = grid
        self.num_prefix = num_prefix
        span = 2 * grid - 1
        self.rel_table = nn.Parameter(torch.zeros(span * span + 3, num_heads))  # +3: cls->tok, tok->cls, cls->cls
        nn.init.trunc_normal_(self.rel_table, std=0.02)

    def default_coords(self, n: int, device: torch.device) -> torch.Tensor:
        """Coordinates of ``n`` tokens (prefix included) passed without any: the full patch grid, else an error."""
        if n - self.num_prefix != self.grid * self.grid:
            raise RuntimeError(f"relative-position attention got {n - self.num_prefix} patch tokens of a "
                               f"{self.grid}x{self.grid} grid without their coords; pass coords= to the block")
        return grid_coords(self.grid, self.grid, device)[None]

    def position_term(self, q: torch.Tensor, n: int, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Additive attention bias of shape (B or 1, H, N, N)."""
        if coords is None:
            coords = self.default_coords(n, q.device)
        span = 2 * self.grid - 1
        rel = coords[:, :, None, :] - coords[:, None, :, :] + (self.grid - 1)  # (B, P, P, 2)
        idx = rel[..., 0] * span + rel[..., 1]
        b = idx.shape[0]
        full = torch.full((b, n, n), span * span + 2, dtype=torch.long, device=idx.device)
        k = self.num_prefix
        full[:, k:, k:] = idx
        full[:, :k, k:] = span * span
        full[:, k:, :k] = span * span + 1
        # Gathered from the (H, entries) view: (H, b, N, N) -> (b, H, N, N) keeps unit stride on the key axis, which
        # the GPU SDPA kernels need of a mask (else they fall back to the explicit, fp32 math path).
        return self.rel_table.t()[:, full].transpose(0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.position_term(q, n, coords).to(q.dtype)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = attention(q, k, v, bias, self.attn_drop.p if self.training else 0.0, self.fused_attn)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


class RelPosBlock(Block):
    """timm's Block whose forward also takes the tokens' grid coordinates and hands them to its attention, as it
    hands ``attn_mask``. Built by timm itself (``block_fn``), so parameters and their initialisation are Block's."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                coords: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, coords=coords)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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


def has_rel_pos(vit: nn.Module) -> bool:
    return any(isinstance(m, RelPosAttention) for m in vit.modules())
