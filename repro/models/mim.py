"""Building blocks shared by the masked-image-modeling methods: patchify, per-sample masking, the MAE-style decoder,
masked losses and the MAE weight initialisation."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from repro.models.vit import sincos_2d


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch flattened in (row, col, channel) order as MAE does."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    n, l, _ = x.shape
    g = int(l**0.5)
    return x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)


def random_masking(n: int, length: int, mask_ratio: float, generator: torch.Generator,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE).

    Returns ``ids_keep`` (N, len_keep), ``ids_restore`` (N, L) and the binary ``mask`` (N, L) with 1 = masked, in the
    original patch order. ``len_keep = int(L * (1 - ratio))``.
    """
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=generator, device=generator.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :len_keep], ids_restore, mask


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of the pixel target (MAE norm_pix_loss): unbiased variance, as torch.var."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the per-token MSE; ``mask`` may be fractional (weights)."""
    loss = (pred - target).pow(2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum().clamp_min(1e-8)


def encode_visible(encoder: VisionTransformer, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """MAE encoder pass on visible patches + cls. Returns (tokens after final norm, mask, ids_restore, hidden states
    after each block, before the final norm)."""
    from repro.models.vit import grid_coords, has_rel_pos, set_token_coords

    x = encoder.patch_embed(imgs)
    n, length, _ = x.shape
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed[:, 1:, :]
    ids_keep, ids_restore, mask = random_masking(n, length, mask_ratio, generator)
    x = gather_tokens(x, ids_keep)
    if has_rel_pos(encoder):
        gh, gw = encoder.patch_embed.grid_size
        set_token_coords(encoder, grid_coords(gh, gw, x.device)[ids_keep])
    cls = encoder.cls_token
    if encoder.pos_embed is not None:
        cls = cls + encoder.pos_embed[:, :1, :]
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
    x = encoder.norm_pre(x)
    hidden = []
    for blk in encoder.blocks:
        x = blk(x)
        hidden.append(x)
    return encoder.norm(x), mask, ids_restore, hidden


class MaskedDecoder(nn.Module):
    """MAE-style decoder: embed visible tokens, insert the mask token at masked positions, add a fixed 2-D sin-cos
    table, run transformer blocks, and predict ``out_dim`` values per patch (cls dropped)."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, grid: int, out_dim: int | None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(dim, grid, grid, cls_token=True)[None], persistent=False)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=_ln) for _ in range(depth)])
        self.norm = _ln(dim)
        self.pred = nn.Linear(dim, out_dim) if out_dim else nn.Identity()
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:, :], masks], dim=1)
        body = gather_tokens(body, ids_restore)
        x = torch.cat([x[:, :1, :], body], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:, :]


_ln = partial(nn.LayerNorm, eps=1e-6)


def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights (and the patch projection viewed as Linear), zero biases,
    unit LayerNorms, N(0, 0.02) cls token. Fixed position tables are left as they are."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, VisionTransformer):
            w = m.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.cls_token is not None:
                nn.init.normal_(m.cls_token, std=0.02)
