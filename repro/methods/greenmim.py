"""GreenMIM (Huang et al. 2022, "Green Hierarchical Vision Transformer for Masked Image Modeling"), as
LayneH/GreenMIM implements it.

- Mask: ONE random mask for the whole batch (per device), drawn by argsort of uniform noise on the grid of the last
  stage's cells (32 px at 224: 7 x 7 = 49 units, ``int(49 * 0.25) = 12`` visible).
- Encoder: a Swin on the visible patches only (``repro.models.swin.forward_visible``): windows packed into equal groups
  by a knapsack dynamic programme, cross-window pairs masked, relative position bias at the visible coordinates,
  patch merging on visible 2x2 cells; final norm.
- Decoder: MAE-style, 512-d, 1 block, 16 heads, fixed 2-D sin-cos positions over the 49 units (no cls token), a
  linear head predicting each 32 x 32 x 3 unit; loss: MSE of norm-pix targets on masked units.
- Weight init as MAE (xavier-uniform Linear incl. the encoder, patch projection as Linear, N(0, .02) mask token);
  AdamW (0.9, 0.95) with no weight decay on biases, norms, the relative position tables and the mask token.

``decoder_placement``: in the official code the encoder returns the visible tokens in raster order, but the decoder
puts the k-th of them at the k-th visible position of the *noise* order (``ids_restore`` of the shuffle), so the
visible latents sit at permuted positions of the decoder grid. ``official`` (default) reproduces that; ``aligned``
puts every latent at its own position (LocalMIM's Swin code, derived from GreenMIM, does this).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.greenmim import GreenMIMSpec
from repro.models.mim import UnitDecoder, mae_init_, masked_mse, norm_pix, patchify
from repro.models.swin import (
    create_swin,
    encoder_state_dict,
    forward_visible,
    is_swin,
    mask_unit,
    visible_ids_from_units,
)


def batch_mask(units: int, mask_ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask for the batch: ``keep`` (len_keep,) unit ids in noise order and ``mask`` (units,) 1 = masked."""
    len_keep = int(units * (1 - mask_ratio))
    noise = torch.rand(units, generator=generator, device=generator.device)
    keep = torch.argsort(noise)[:len_keep]
    mask = torch.ones(units, device=noise.device)
    mask[keep] = 0
    return keep, mask


class GreenMIM(GreenMIMSpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        if not is_swin(cfg["model"]["arch"]):
            raise ConfigError(f"greenmim needs a Swin encoder; got model.arch={cfg['model']['arch']} "
                              "(use e.g. model.arch=swin_base)")
        img = cfg["data"]["img_size"]
        self.encoder = create_swin(cfg["model"], img, num_classes=0)
        self.patch = cfg["model"]["patch_size"]
        self.unit_patches = mask_unit(self.encoder)
        self.unit_px = self.patch * self.unit_patches
        if p["mask_patch_size"] != self.unit_px:
            raise ConfigError(f"method.mask_patch_size={p['mask_patch_size']} must be the last Swin stage's cell, "
                              f"{self.unit_px} px here (patch {self.patch} x {self.unit_patches}); "
                              f"set method.mask_patch_size={self.unit_px}")
        self.grid = img // self.unit_px
        self.decoder = UnitDecoder(self.encoder.num_features, p["decoder_dim"], p["decoder_depth"],
                                   p["decoder_heads"], self.grid, self.unit_px**2 * 3)
        mae_init_(self)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Official: no weight decay on biases, norms, relative position tables and the mask token."""
        skip = [n for n, _ in self.named_parameters() if "position_bias" in n or "token" in n]
        return param_groups_weight_decay(self, optim["weight_decay"], no_weight_decay_list=skip)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs = batch[0]
        keep, mask = batch_mask(self.grid * self.grid, self.params["mask_ratio"], generator)
        unit_visible = (mask == 0).reshape(self.grid, self.grid).to(imgs.device)
        ids = visible_ids_from_units(unit_visible, self.unit_patches)
        out = forward_visible(self.encoder, imgs, ids, mode=self.params["grouping"]).out
        # out.tokens are in raster order of the visible units (= sorted keep)
        slots = keep.to(imgs.device) if self.params["decoder_placement"] == "official" else out.ids
        pred = self.decoder(out.tokens, slots)
        target = patchify(imgs, self.unit_px)
        if self.params["norm_pix_loss"]:
            target = norm_pix(target)
        loss = masked_mse(pred.float(), target.float(), mask.to(imgs.device)[None].expand(imgs.shape[0], -1))
        return StepOutput(loss, {"loss": loss.detach()})

    def export(self) -> dict[str, torch.Tensor]:
        return encoder_state_dict(self.encoder)
