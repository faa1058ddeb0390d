"""MaskFeat (Wei et al. 2022, "Masked Feature Prediction for Self-Supervised Visual Pre-Training"), image / ViT
version, as facebookresearch/SlowFast (models/masked.py, configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml) runs it.

Every patch goes through the encoder; the embeddings of masked patches are replaced by a learned mask token before the
position embedding is added. Masking is BEiT's block-wise masking of 40% of the patches, with blocks of at least a
fifth of the masked count (15 patches at 14 x 14, as SlowFast's ImageNet loader sets it) and aspect ratios in
[0.3, 1/0.3]. The target is the HOG of the image (9 unsigned bins, 8-px cells, per RGB channel, L2-normalised per
cell; repro.models.hog): each 16-px patch covers 2 x 2 cells, so a linear head predicts 4 x 27 = 108 values from each
output patch token; the loss is the MSE over masked patches. benchmarks/official/parity.py checks all of it against
SlowFast's MaskMViT with copied weights.

Initialisation as SlowFast's (``slowfast_vit_init_``): its MViT's N(0, 0.02) weights with 0.02 biases, and trained
absolute positions drawn N(0, 0.02) rather than a sin-cos table.

Geometry knobs are patch-relative so that the tiny scale keeps their meaning: ``cells_per_patch`` (HOG cells per patch
side: 2 = 8-px cells for 16-px patches) and ``min_block`` (the smallest block in patches: null, SlowFast's fifth of the
masked count, follows the grid by itself; a given number is shrunk with the grid area at tiny).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.maskfeat import MaskFeatSpec
from repro.models.hog import HOG, cells_to_patches
from repro.models.mim import blockwise_mask, masked_mse
from repro.models.vit import create_vit


def slowfast_vit_init_(vit: nn.Module) -> None:
    """SlowFast's MViT init (video_model_builder.MViT._init_weights), which MaskMViT keeps for its encoder: N(0, 0.02)
    Linear and Conv2d weights (trunc_normal_, default +-2 bounds), Linear biases and LayerNorm biases 0.02 (not 0),
    unit LayerNorm weights, N(0, 0.02) cls token and trained position table (a fixed one, ``model.pos_embed=sincos``,
    stays); the patch conv's bias keeps PyTorch's default.
    The final norm is reset to (1, 0): it stands for MaskMViT's prediction-head LayerNorm, which the head inits so."""
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0.02)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.constant_(m.bias, 0.02)
    for name in ("pos_embed", "cls_token"):
        p = getattr(vit, name, None)
        if p is not None and p.requires_grad:
            nn.init.trunc_normal_(p, std=0.02)
    norm = getattr(vit, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


class MaskFeat(MaskFeatSpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        img = cfg["data"]["img_size"]
        self.encoder = create_vit(cfg["model"], img, num_classes=0)
        slowfast_vit_init_(self.encoder)
        self.patch = cfg["model"]["patch_size"]
        k = int(p["cells_per_patch"])
        if self.patch % k:
            raise ConfigError(f"method.cells_per_patch={k} does not divide model.patch_size={self.patch}")
        self.k = k
        self.grid = img // self.patch
        self.num_mask = round(p["mask_ratio"] * self.grid * self.grid)
        given = p["min_block"]
        self.min_block = max(1, self.num_mask // 5) if given is None else int(given)
        self.hog = HOG(p["hog_bins"], cell=self.patch // k)
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, 3 * p["hog_bins"] * k * k)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def mask(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return blockwise_mask(n, self.grid, self.grid, self.num_mask, generator, min_num=self.min_block,
                              min_aspect=float(self.params["min_aspect"]))

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """HOG predictions (N, L, 3 * bins * k^2) for every patch, with the masked patches' embeddings replaced."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
        x = enc.norm(enc.blocks(x))
        return self.head(x[:, enc.num_prefix_tokens:])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        return cells_to_patches(self.hog(imgs), self.k)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs = batch[0]
        mask = self.mask(imgs.shape[0], generator)
        pred = self.predict(imgs, mask)
        with torch.no_grad():
            target = self.target(imgs)
        loss = masked_mse(pred.float(), target, mask)
        return StepOutput(loss, {"loss": loss.detach(), "mask_ratio": mask.mean().detach()})
