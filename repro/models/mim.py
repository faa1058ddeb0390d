"""Building blocks shared by the masked-image-modeling methods: patchify, per-sample masking, BEiT's block-wise
masking, LoMaR's random windows, the MAE-style decoder, GreenMIM's unit decoder, masked losses and the MAE weight
initialisation."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
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


_ATTEMPTS = 10  # tries per block, as BEiT's MaskingGenerator
_CHECK_EVERY = 8  # tries between the (one-flag) checks whether every image has finished


def blockwise_mask(n: int, grid_h: int, grid_w: int, num_masking: int, generator: torch.Generator,
                   min_num: int = 16, max_num: int | None = None, min_aspect: float = 0.3,
                   batched: bool | None = None) -> torch.Tensor:
    """BEiT's block-wise masking for ``n`` images: (n, grid_h*grid_w) float mask on the generator's device, 1 = masked.

    Rectangular blocks are added until ``num_masking`` patches are masked: each try draws a target area uniformly in
    [min_num, min(remaining, max_num)] and a log-uniform aspect ratio in [min_aspect, 1/min_aspect], rounds to h x w
    (each strictly smaller than the grid), places it uniformly, and is kept when it adds between 1 and ``remaining``
    new patches; after ``_ATTEMPTS`` failed tries in a row the image stops (so it may end a few patches short, never
    over). All random numbers come from ``generator``, drawn up front in one tensor (a fixed amount per call, so the
    generator's state does not depend on the masks drawn); image i's t-th try uses draw (i, t).

    ``batched`` (default: on any device but the CPU): every image runs its tries at once on the device (a loop over
    tries, not images; the only read back is one flag every ``_CHECK_EVERY`` tries). Otherwise a loop per image on
    the CPU, which is faster there. Both give the same masks.
    """
    max_num = num_masking if max_num is None else max_num
    dev = generator.device
    # At most num_masking successful blocks plus one final failing round, each of up to _ATTEMPTS tries.
    tries = _ATTEMPTS * (num_masking + 1)
    u = torch.rand(n, tries, 4, generator=generator, device=dev, dtype=torch.float64)
    if batched if batched is not None else dev.type != "cpu":
        mask = _blockwise_batched(u, grid_h, grid_w, num_masking, min_num, max_num, min_aspect)
    else:
        mask = _blockwise_loop(u.cpu().numpy(), grid_h, grid_w, num_masking, min_num, max_num, min_aspect)
    return mask.reshape(n, grid_h * grid_w).to(dev, torch.float32)


def _blockwise_batched(u: torch.Tensor, grid_h: int, grid_w: int, num_masking: int, min_num: int, max_num: int,
                       min_aspect: float) -> torch.Tensor:
    n, tries, dev = u.shape[0], u.shape[1], u.device
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))  # (n, tries): the state-free part, at once
    rows, cols = torch.arange(grid_h, device=dev), torch.arange(grid_w, device=dev)
    mask = torch.zeros(n, grid_h, grid_w, dtype=torch.bool, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    fails = torch.zeros(n, dtype=torch.long, device=dev)
    active = torch.full((n,), num_masking > 0, dtype=torch.bool, device=dev)
    for t in range(tries):
        if t % _CHECK_EVERY == 0 and not bool(active.any()):
            break
        limit = (num_masking - count).clamp(max=max_num)
        area = min_num + u[:, t, 0] * (limit - min_num)
        h = torch.round(torch.sqrt(area * aspect[:, t])).long()
        w = torch.round(torch.sqrt(area / aspect[:, t])).long()
        fits = (w < grid_w) & (h < grid_h)
        top = (u[:, t, 2] * (grid_h - h + 1)).long()
        left = (u[:, t, 3] * (grid_w - w + 1)).long()
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (n, grid_h)
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        rect = in_rows[:, :, None] & in_cols[:, None, :]
        new = h * w - (rect & mask).sum((1, 2))
        ok = active & fits & (new > 0) & (new <= limit)
        mask |= rect & ok[:, None, None]
        count += torch.where(ok, new, 0)
        fails = torch.where(ok, 0, fails + 1)
        active &= (count < num_masking) & (fails < _ATTEMPTS)
    return mask


def _blockwise_loop(u: np.ndarray, grid_h: int, grid_w: int, num_masking: int, min_num: int, max_num: int,
                    min_aspect: float) -> torch.Tensor:
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    out = np.zeros((u.shape[0], grid_h, grid_w), dtype=np.float32)
    for i in range(u.shape[0]):
        mask, draws, count, k = out[i], u[i], 0, 0
        while count < num_masking:
            limit = min(num_masking - count, max_num)
            delta = 0
            for _ in range(_ATTEMPTS):
                a, r, t, l = draws[k]
                k += 1
                area = min_num + a * (limit - min_num)
                aspect = math.exp(log_lo + r * (log_hi - log_lo))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < grid_w and h < grid_h:
                    top = int(t * (grid_h - h + 1))
                    left = int(l * (grid_w - w + 1))
                    region = mask[top:top + h, left:left + w]
                    new = h * w - int(region.sum())
                    if 0 < new <= limit:
                        region[...] = 1.0
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
    return torch.from_numpy(out)


def sample_windows(n: int, grid: int, k: int, num_windows: int, generator: torch.Generator,
                   per_image: bool = False) -> torch.Tensor:
    """LoMaR's random windows: (n, num_windows, k*k, 2) grid coordinates (row, col) of every window's patches in
    raster order, on a ``grid`` x ``grid`` patch grid.

    Tops and lefts are each a random permutation of the grid-k+1 possible offsets, cut to num_windows (cycled when
    there are fewer offsets than windows); one set for the whole batch (the official LoMaR) or, with ``per_image``,
    one per image."""
    positions = grid - k + 1
    b = n if per_image else 1
    dev = generator.device
    reps = -(-num_windows // positions)

    def offsets() -> torch.Tensor:
        perms = torch.rand(b, reps, positions, generator=generator, device=dev).argsort(dim=-1)
        return perms.reshape(b, reps * positions)[:, :num_windows]

    tops, lefts = offsets(), offsets()
    ar = torch.arange(k, device=dev)
    rows = (tops[:, :, None, None] + ar[:, None]).expand(b, num_windows, k, k)
    cols = (lefts[:, :, None, None] + ar[None, :]).expand(b, num_windows, k, k)
    coords = torch.stack([rows, cols], dim=-1).reshape(b, num_windows, k * k, 2)
    return coords.expand(n, -1, -1, -1)


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


def patch_pixels(patch_embed: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """The pixels of every patch of ``imgs`` (n, C, H, W), (n, L, C*p*p) in the patch projection's weight order."""
    _, c, ph, pw = patch_embed.proj.weight.shape
    n, _, h, w = imgs.shape
    x = imgs.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // ph) * (w // pw), c * ph * pw)


def embed_pixels(patch_embed: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``patch_embed`` (a timm PatchEmbed: strided-conv projection, per-token norm) applied to cut patches
    (..., C*p*p) from ``patch_pixels``: the projection as a linear layer with the same weights."""
    proj = patch_embed.proj
    return patch_embed.norm(F.linear(pixels, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias))


def embed_visible(patch_embed: nn.Module, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """``gather_tokens(patch_embed(imgs), ids_keep)`` up to float rounding (``train.embed_visible``): the pixels are
    gathered first and only the kept patches projected, a quarter of the FLOPs at MAE's ratio and no conv layout
    conversions on the GPU."""
    return embed_pixels(patch_embed, gather_tokens(patch_pixels(patch_embed, imgs), ids_keep))


def encode_visible(encoder: VisionTransformer, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator,
                   visible_embed: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """MAE encoder pass on visible patches + cls. Returns (tokens after final norm, mask, ids_restore, hidden states
    after each block, before the final norm). ``visible_embed``: embed only the kept patches (``embed_visible``;
    the same tokens up to float rounding)."""
    from repro.models.relpos import grid_coords, has_rel_pos
    from repro.models.vit import run_blocks

    n, length = imgs.shape[0], encoder.patch_embed.num_patches
    if visible_embed:
        ids_keep, ids_restore, mask = random_masking(n, length, mask_ratio, generator)
        x = embed_visible(encoder.patch_embed, imgs, ids_keep)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed[0, 1:][ids_keep]
    else:
        x = encoder.patch_embed(imgs)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed[:, 1:, :]
        ids_keep, ids_restore, mask = random_masking(n, x.shape[1], mask_ratio, generator)
        x = gather_tokens(x, ids_keep)
    coords = None
    if has_rel_pos(encoder):
        gh, gw = encoder.patch_embed.grid_size
        coords = grid_coords(gh, gw, x.device)[ids_keep]
    cls = encoder.cls_token
    if encoder.pos_embed is not None:
        cls = cls + encoder.pos_embed[:, :1, :]
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
    x = encoder.norm_pre(x)
    hidden: list[torch.Tensor] = []
    x = run_blocks(encoder, x, coords, hidden)
    return encoder.norm(x), mask, ids_restore, hidden


def encode_at(encoder: VisionTransformer, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Encoder blocks on patch embeddings ``x`` (m, T, D) that sit at grid ``coords`` (1 or m, T, 2) of the image:
    their absolute positions (if the encoder has a table) and the cls token are added, relative-position layers get
    the coordinates. Returns the tokens after the final norm, cls first (LoMaR's and BEiT's windows)."""
    from repro.models.vit import run_blocks

    cls = encoder.cls_token
    if encoder.pos_embed is not None:
        flat = coords[..., 0] * encoder.patch_embed.grid_size[1] + coords[..., 1]
        x = x + encoder.pos_embed[0, 1:][flat]
        cls = cls + encoder.pos_embed[:, :1]
    x = encoder.norm_pre(torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1))
    return encoder.norm(run_blocks(encoder, x, coords))


class MaskedDecoder(nn.Module):
    """MAE-style decoder: embed visible tokens, insert the mask token at masked positions, add a fixed 2-D sin-cos
    table, run transformer blocks, and predict ``out_dim`` values per patch (cls dropped)."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, grid: int, out_dim: int | None,
                 mlp_ratio: float = 4.0) -> None:
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


class UnitDecoder(nn.Module):
    """GreenMIM's decoder (also LocalMIM's on a Swin): embed the visible latents, fill the other units with a mask
    token, add fixed sin-cos positions, transformer blocks, norm, linear prediction of every unit."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, grid: int, out_dim: int) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(dim, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, K, in_dim) go to unit positions ``slots`` (K,); returns (B, units, out_dim)."""
        x = self.embed(latent)
        b, units = x.shape[0], self.pos.shape[1]
        full = self.mask_token.to(x.dtype).expand(b, units, -1).clone()
        full[:, slots] = x
        x = full + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


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
