"""LoMaR (Chen et al., "Efficient Self-supervised Vision Pretraining with Local Masked Reconstruction"), as the
official junchen14/LoMaR code does it.

Each image is cut into ``num_windows`` random K x K windows of patches (K=7); inside every window
``int(K*K*mask_ratio)`` patches are replaced by a learnable mask token and the whole window (visible + masked, + cls)
goes through the encoder, so the encoder batch is N*num_windows sequences of K*K+1 tokens whatever the resolution. A
linear head predicts the (per-patch normalised) pixels; the MSE is taken on the masked patches only. Positions come
from iRPE (Wu et al. 2021): contextual "product" relative encoding on the keys, one table shared by the heads, no
absolute table (``repro.models.irpe``, built from ``model.rel_pos: irpe``). The ``encoder_decoder`` arch (paper
Fig. 4) runs an MAE encoder on the visible window patches and an MAE decoder on the window; ``position: sincos``
(supplementary Table 1) adds the fixed 2-D sin-cos table instead.

Which windows an image gets (``window_pairing``): the official forward repeats the image batch window-major but the
window indices image-major, so its encoder sequence r holds image r % N and window r % W (N the per-GPU batch, W the
window count); an image sees W / gcd(N, W) distinct windows, each gcd(N, W) times with independent masks. ``official``
replays that with N = ``official_per_gpu_batch`` (the README's 256: one window four ways at 224, all nine at 448),
whatever batch this run's devices hold; ``all`` is the paper's reading, every image with every window once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.lomar import LoMaRSpec
from repro.models.mim import (
    MaskedDecoder,
    encode_at,
    gather_tokens,
    mae_init_,
    masked_mse,
    norm_pix,
    patchify,
    sample_windows,
)
from repro.models.vit import create_vit, with_zero_pos_embed


def window_assignment(n: int, num_windows: int, official_batch: int | None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, num_windows) window index of each of image i's ``num_windows`` encoder sequences, on ``device``.

    With ``official_batch`` = N, image i's k-th sequence is the official sequence r = i + k*N, whose window is
    r % num_windows; for n == N this is exactly the official (image, window) table. ``None``: every window once."""
    k = torch.arange(num_windows, device=device)
    if official_batch is None:
        return k.expand(n, -1).clone()
    return (torch.arange(n, device=device)[:, None] + k[None, :] * official_batch) % num_windows


@functools.lru_cache(maxsize=64)
def cached_window_assignment(n: int, num_windows: int, official_batch: int | None,
                             device: torch.device) -> torch.Tensor:
    """``window_assignment`` built on the device once per shape (read-only: shared by every step)."""
    with torch.inference_mode(False):  # a normal tensor even when first built under inference mode
        return window_assignment(n, num_windows, official_batch, device)


class LoMaR(LoMaRSpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        m = cfg["model"]
        img = cfg["data"]["img_size"]
        self.patch = m["patch_size"]
        self.grid = img // self.patch
        self.k = p["window_size"]
        if self.k > self.grid:
            raise ConfigError(f"method.window_size={self.k} exceeds the {self.grid}x{self.grid} patch grid of "
                              f"{img}px / patch {self.patch}; pass a smaller method.window_size")
        if not m.get("class_token", True):
            raise ConfigError("LoMaR feeds a cls token with every window; set model.class_token=true")
        if p["position"] == "irpe" and (m.get("rel_pos") != "irpe" or m.get("pos_embed") != "none"):
            raise ConfigError("method.position=irpe needs model.rel_pos=irpe and model.pos_embed=none")
        if p["position"] == "sincos" and m.get("pos_embed") == "none":
            raise ConfigError("method.position=sincos needs model.pos_embed=sincos (or learned)")
        self.num_mask = int(self.k * self.k * p["mask_ratio"])
        self.encoder = create_vit(m, img, num_classes=0)
        dim, out = self.encoder.embed_dim, self.patch**2 * 3
        if p["arch"] == "encoder":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pred = nn.Linear(dim, out)
        else:
            # The decoder sees one window: its fixed sin-cos table is the K x K window grid.
            self.decoder = MaskedDecoder(dim, p["decoder_dim"], p["decoder_depth"], p["decoder_heads"], self.k, out)
        mae_init_(self)
        if p["arch"] == "encoder":
            nn.init.normal_(self.mask_token, std=0.02)

    # -- windows and masks -------------------------------------------------------------------------------------------

    def sample_windows(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, num_windows, K*K, 2) grid coordinates (row, col) of the patches, in raster order, of each image's
        encoder sequences: the drawn windows (``repro.models.mim.sample_windows``; ``shared`` draws one set for the
        whole batch, ``per_image`` one per image) paired with the images by ``window_pairing``."""
        p = self.params
        drawn = sample_windows(n, self.grid, self.k, p["num_windows"], generator,
                               per_image=p["window_placement"] == "per_image")
        official = int(p["official_per_gpu_batch"]) if p["window_pairing"] == "official" else None
        which = cached_window_assignment(n, p["num_windows"], official, drawn.device)
        return torch.gather(drawn, 1, which[:, :, None, None].expand(-1, -1, *drawn.shape[2:]))

    def window_masking(self, m: int, generator: torch.Generator,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per window, ``num_mask`` random patches masked: (ids_keep (m, K*K-num_mask), ids_restore (m, K*K),
        mask (m, K*K) with 1 = masked)."""
        length = self.k * self.k
        keep = length - self.num_mask
        ids_shuffle = torch.rand(m, length, generator=generator, device=generator.device).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(m, length, device=generator.device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)

    def embed_windows(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder's patch embedding applied to already-cut patches (m, T, p*p*3) in patchify order."""
        proj = self.encoder.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # (D, p, p, C): patchify order
        return self.encoder.patch_embed.norm(F.linear(pixels, weight, proj.bias))

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs = batch[0]
        n = imgs.shape[0]
        coords = self.sample_windows(n, generator)  # (n, w, T, 2)
        m, t = n * coords.shape[1], self.k * self.k
        coords = coords.reshape(m, t, 2)
        flat = coords[..., 0] * self.grid + coords[..., 1]  # (m, T) patch index in the full grid
        # Only the window patches are cut out and embedded; image n's windows are rows n*w ... n*w + w - 1.
        patches = patchify(imgs, self.patch)
        pixels = gather_tokens(patches, flat.reshape(n, -1)).reshape(m, t, -1)
        x = self.embed_windows(pixels)
        ids_keep, ids_restore, mask = self.window_masking(m, generator)
        if self.params["arch"] == "encoder":
            x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x)
            pred = self.pred(encode_at(self.encoder, x, coords)[:, 1:])
        else:
            keep_coords = torch.gather(coords, 1, ids_keep[..., None].expand(-1, -1, 2))
            latent = encode_at(self.encoder, gather_tokens(x, ids_keep), keep_coords)
            pred = self.decoder(latent, ids_restore)
        target = norm_pix(pixels) if self.params["norm_pix_loss"] else pixels
        loss = masked_mse(pred.float(), target.float(), mask)
        return StepOutput(loss, {"loss": loss.detach()})

    def export(self) -> dict[str, torch.Tensor]:
        return with_zero_pos_embed(super().export(), self.encoder, self.grid)
