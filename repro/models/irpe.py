"""iRPE (Wu et al. 2021) contextual "product" relative position encoding on the keys, the attention LoMaR uses
(``model.rel_pos: irpe``; ``repro.models.vit.create_vit`` builds it)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from repro.models.relpos import RelPosAttention, grid_coords

# iRPE's bucket ratio: alpha = 1.9, beta = 3.8, gamma = 15.2 (the official LoMaR/iRPE setting).
IRPE_RATIO = 1.9


def irpe_piecewise(offset: torch.Tensor, ratio: float = IRPE_RATIO) -> torch.Tensor:
    """iRPE's piecewise index g(x) for integer offsets: exact for |x| <= alpha, logarithmic in |x| beyond, magnitude
    capped at int(beta); alpha, beta, gamma = ratio, 2*ratio, 8*ratio. Odd in x."""
    alpha, beta, gamma = ratio, 2.0 * ratio, 8.0 * ratio
    x = offset.double()
    a = x.abs()
    far = alpha + torch.log(a.clamp_min(alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    mag = torch.where(a <= alpha, a.round(), far.round().clamp_max(int(beta)))
    return (torch.sign(x) * mag).long()


def irpe_buckets_per_axis(ratio: float = IRPE_RATIO) -> int:
    """Values g can take on one axis: 2*int(beta)+1 (7 at ratio 1.9)."""
    return 2 * int(2.0 * ratio) + 1


def irpe_product_bucket(rel: torch.Tensor, ratio: float = IRPE_RATIO) -> torch.Tensor:
    """"product" method: the bucket of a 2-D offset (..., 2) = (row, col) is g(row) and g(col) combined,
    in [0, S*S) with S = irpe_buckets_per_axis."""
    s = irpe_buckets_per_axis(ratio)
    half = s // 2
    return (irpe_piecewise(rel[..., 0], ratio) + half) * s + irpe_piecewise(rel[..., 1], ratio) + half


class IRPEAttention(RelPosAttention):
    """Attention with iRPE contextual "product" encoding on keys: ``bias_ij = q_i . r_{bucket(i, j)}`` with one
    (buckets, head_dim) table shared by the heads, buckets from the 2-D offset ``coord_i - coord_j`` of the tokens'
    grid coordinates. As iRPE with ``skip=1``, the prefix (cls) token has one bucket of its own for its whole row and
    column. The table starts at zero (iRPE's default) and q enters unscaled, as in the official LoMaR attention.

    Without coordinates (e.g. ``forward_features`` on a full image) the tokens are taken to fill a square grid in
    raster order.
    """

    def __init__(self, dim: int, num_heads: int, grid: int, num_prefix: int = 1, qkv_bias: bool = True,
                 **kw: Any) -> None:
        super().__init__(dim, num_heads, grid, num_prefix=num_prefix, qkv_bias=qkv_bias, **kw)
        del self.rel_table  # the per-head table of the 'bias' kind; iRPE has its own
        self.num_buckets = irpe_buckets_per_axis() ** 2  # + 1 for the prefix token below
        self.rpe_k = nn.Parameter(torch.zeros(self.num_buckets + 1, self.head_dim))

    def default_coords(self, n: int, device: torch.device) -> torch.Tensor:
        side = math.isqrt(n - self.num_prefix)
        if side * side != n - self.num_prefix:
            raise RuntimeError(f"iRPE attention got {n - self.num_prefix} patch tokens without their coords; "
                               "pass coords= to the block")
        return grid_coords(side, side, device)[None]

    def bucket_ids(self, n: int, device: torch.device, coords: torch.Tensor | None = None) -> torch.Tensor:
        """(b, n, n) bucket of every (query, key) pair; b is 1 or the batch."""
        k = self.num_prefix
        if coords is None:
            coords = self.default_coords(n, device)
        rel = coords[:, :, None, :] - coords[:, None, :, :]
        ids = torch.full((coords.shape[0], n, n), self.num_buckets, dtype=torch.long, device=device)
        ids[:, k:, k:] = irpe_product_bucket(rel)
        return ids

    def position_term(self, q: torch.Tensor, n: int, coords: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.bucket_ids(n, q.device, coords)
        per_bucket = q @ self.rpe_k.t().to(q.dtype)  # (B, H, N, buckets)
        b, h = q.shape[:2]
        return per_bucket.gather(-1, ids[:, None].expand(b, h, n, n))
