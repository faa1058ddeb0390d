"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling"), ViT and Swin, as
microsoft/SimMIM (models/simmim.py, data/data_simmim.py, configs/*/simmim_pretrain__*.yaml) implements it.

Masking: the image is cut into ``mask_patch_size``-px units (32 px); exactly ``ceil(units * mask_ratio)`` of them are
masked per image (0.6), and the unit mask is repeated onto the encoder's patch grid (2 x 2 patches of a ViT/16,
8 x 8 patches of a Swin/4). EVERY patch goes through the encoder; the embeddings of masked patches are replaced by a
learned mask token (after patch embedding, before positions / the first block). The decoder is one 1x1 convolution
from the encoder's last feature map to ``stride^2 * 3`` channels followed by PixelShuffle(stride), where stride is the
encoder's total downsampling (ViT: the patch size; Swin: patch x 2^(stages-1) = 32); the loss is the L1 distance to
the (ImageNet-normalised) input pixels, summed over masked pixels and divided by their count and by 3 channels.

ViT (the official ``vit_base`` config): no absolute position table, ONE relative position bias table shared by all
blocks (zero-initialised; BEiT style, with cls rows), LayerScale 0.1, drop path 0.1, pre-norm on output (cls dropped
before the decoder). The shared table is tied across the blocks here, so the exported encoder holds one copy per block:
exactly what the official fine-tuning does when it expands the shared table into every block. Weight init follows the
official ViT: N(0, 0.02) Linear/Conv weights, zero biases, and attn.proj / mlp.fc2 divided by sqrt(2 * layer).

Swin (``model.arch`` swin_*): the full-image Swin from ``repro.models.swin`` with the mask token mixed in after patch
embedding; Swin-B pretrains at 192 px with window 6 (set by the recipe).

The augmentation is RandomResizedCrop(scale (0.67, 1), ratio (3/4, 4/3)) + flip (``data.crop_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.simmim import SimMIMSpec
from repro.models.relpos import RelPosAttention, has_rel_pos, share_rel_pos_table
from repro.models.swin import create_swin, is_swin
from repro.models.swin import encoder_state_dict as swin_state_dict
from repro.models.vit import create_vit


def unit_mask(n: int, units: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n, units, units) float mask, 1 = masked, with exactly ``ceil(units^2 * ratio)`` masked units per image
    (a uniformly random subset: the official MaskGenerator's permutation, drawn from ``generator``)."""
    count = units * units
    k = int(math.ceil(count * mask_ratio))
    noise = torch.rand(n, count, generator=generator, device=generator.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < k).float().view(n, units, units)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(n, h, w) -> (n, h * factor, w * factor): every cell repeated over a factor x factor block."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def masked_l1(pred: torch.Tensor, imgs: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: L1 summed over masked pixels (``pixel_mask`` (N, H, W), 1 = masked) / (count + 1e-5) / C."""
    w = pixel_mask.unsqueeze(1).to(pred.dtype)
    loss = (pred - imgs).abs()
    return (loss * w).sum() / (w.sum() + 1e-5) / imgs.shape[1]


def simmim_vit_init_(vit: nn.Module) -> None:
    """The official ViT init: N(0, 0.02) Linear/Conv2d weights (timm trunc_normal_ with its default +-2 bounds),
    zero biases, unit LayerNorms, N(0, 0.02) cls token, zero relative tables, and each block's residual output
    projections (attn.proj, mlp.fc2) divided by sqrt(2 * (index + 1))."""
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, RelPosAttention):
            nn.init.zeros_(m.rel_table)
    with torch.no_grad():
        for i, blk in enumerate(vit.blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
    if getattr(vit, "cls_token", None) is not None:
        nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-2.0, b=2.0)


class SimMIM(SimMIMSpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        img = cfg["data"]["img_size"]
        mcfg = cfg["model"]
        self.img = img
        self.patch = int(mcfg["patch_size"])
        self.swin = is_swin(mcfg["arch"])
        unit = int(p["mask_patch_size"])
        if img % unit or unit % self.patch:
            raise ConfigError(f"method.mask_patch_size={unit} must divide data.img_size={img} and be a multiple of "
                              f"model.patch_size={self.patch}")
        self.units = img // unit
        self.unit_patches = unit // self.patch
        if self.swin:
            self.encoder = create_swin(mcfg, img, num_classes=0)
            dim = int(self.encoder.embed_dim)
            out_dim = int(self.encoder.num_features)
            self.stride = self.patch * 2 ** (len(self.encoder.layers) - 1)
        else:
            self.encoder = create_vit(mcfg, img, num_classes=0)
            simmim_vit_init_(self.encoder)
            if p["shared_rel_pos"] and has_rel_pos(self.encoder):
                share_rel_pos_table(self.encoder)
            dim = out_dim = int(self.encoder.embed_dim)
            self.stride = self.patch
        if img % self.stride:
            raise ConfigError(f"data.img_size={img} is not a multiple of the encoder stride {self.stride}")
        self.grid = img // self.patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        # Conv2d(1x1) to stride^2 * 3 channels + PixelShuffle (PyTorch's default Conv2d init, as the official code).
        self.decoder = nn.Sequential(nn.Conv2d(out_dim, self.stride**2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.stride))

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Official no-decay sets: biases and 1-D tensors, plus ViT: cls token (and any absolute table); Swin: the
        mask token and the relative position tables (the ViT's shared table and mask token ARE decayed)."""
        if self.swin:
            skip = ["mask_token"] + [n for n, _ in self.named_parameters() if "relative_position_bias_table" in n]
        else:
            skip = ["encoder.cls_token", "encoder.pos_embed"]
        return param_groups_weight_decay(self, optim["weight_decay"], no_weight_decay_list=skip)

    def mask(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, grid, grid) patch mask, 1 = masked: the unit mask repeated onto the patch grid."""
        return upsample_mask(unit_mask(n, self.units, float(self.params["mask_ratio"]), generator), self.unit_patches)

    def encode(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every patch through the encoder, masked ones as the mask token; returns the last map (N, C, H/s, W/s)."""
        enc = self.encoder
        if self.swin:
            x = enc.patch_embed(imgs)  # (N, H, W, C), after the patch norm (as the official)
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
            return enc.norm(enc.layers(x)).permute(0, 3, 1, 2)
        x = enc.patch_embed(imgs)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
        x = enc.norm(enc.blocks(x))[:, enc.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs = batch[0]
        mask = self.mask(imgs.shape[0], generator)
        rec = self.decoder(self.encode(imgs, mask))
        loss = masked_l1(rec.float(), imgs.float(), upsample_mask(mask, self.patch))
        return StepOutput(loss, {"loss": loss.detach()})

    def export(self) -> dict[str, torch.Tensor]:
        return swin_state_dict(self.encoder) if self.swin else super().export()
