"""MAE (He et al. 2022), as facebookresearch/mae implements it.

Per-sample argsort masking; the encoder sees only the visible patches (+ cls); a 512-d, 8-block decoder (paper
scale) sees every position, with a shared mask token and fixed sin-cos positions; the loss is the MSE on masked
patches of per-patch normalised pixels (``norm_pix_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.mae import MAESpec
from repro.models.mim import MaskedDecoder, encode_visible, mae_init_, masked_mse, norm_pix, patchify
from repro.models.vit import create_vit


class MAE(MAESpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        img = cfg["data"]["img_size"]
        self.encoder = create_vit(cfg["model"], img, num_classes=0)
        self.patch = cfg["model"]["patch_size"]
        grid = img // self.patch
        self.decoder = MaskedDecoder(self.encoder.embed_dim, p["decoder_dim"], p["decoder_depth"], p["decoder_heads"],
                                     grid, self.patch**2 * 3)
        mae_init_(self)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs = batch[0]
        latent, mask, ids_restore, _ = encode_visible(self.encoder, imgs, self.params["mask_ratio"], generator,
                                                      self.speed_switch("embed_visible", imgs.device))
        loss = self.run_unit("decode_loss", latent, ids_restore, imgs, mask)
        return StepOutput(loss, {"loss": loss.detach()})

    def decode_loss(self, latent: torch.Tensor, ids_restore: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                    ) -> torch.Tensor:
        """Everything after the encoder: the decoder, the (normalised) pixel target and the masked MSE."""
        pred = self.decoder(latent, ids_restore)
        target = patchify(imgs, self.patch)
        if self.params["norm_pix_loss"]:
            target = norm_pix(target)
        return masked_mse(pred.float(), target.float(), mask)
