"""LocalMIM (Wang et al. 2023, "Masked Image Modeling with Local Multi-Scale Reconstruction"), ViT version, as
huawei-noah/Efficient-Computing Self-supervised/LocalMIM/ViT implements it.

MAE-style encoder on the visible 25% of the patches. Several encoder blocks are tapped (0-based ``taps``; default
[1, 3, depth-3, depth-1], the paper's layers 2, 4, 10, 12 of ViT-B); each tap has its own LayerNorm and its own small
MAE decoder (mask token + fixed sin-cos positions + ``decoder_depth`` blocks). Each decoder's patch-grid output is
rescaled to its supervision scale (``scales``, multiples of the patch grid: [4, 2, 1, 0.5] = 56, 28, 14, 7 at 224):
x4 = deconv(d, d/2) + LayerNorm2d + GELU + deconv(d/2, d/4); x2 = deconv(d, d/2); x1 = none; x0.5 = 2x2 average pool;
then a 1x1 conv predicts the target of every cell: the HOG of that region (``3 * hog_bins`` values, cell size =
image / target grid, e.g. 4, 8, 16, 32 px) or its pixels (``norm_pix_loss`` per region). The patch mask is repeated
onto finer grids and averaged onto coarser ones (fractional weights); the loss is the weighted sum of the per-scale
masked MSEs (equal weights by default, as the paper and code).

Ablation knobs (paper Tables 5-7): ``grad_isolation`` stops the gradient between tapped segments (the hidden state
entering the block after each tap, except the top one, is detached); ``global_multiscale`` puts every decoder on the
top block's output (Table 6 "global"); ``feature_fusion`` is Table 7's "global with fusion" after ConvMAE: the tapped
features below the top one are each normalised and linearly projected, added to the normalised top feature, and ONE
decoder reconstructs a single-scale target (``scales`` must then hold one scale, e.g. [1]).

Sharing: the top tap (block depth-1) uses the encoder's own final norm as its LayerNorm, so the exported encoder
carries that trained norm (the cls feature the linear probe and kNN read); the official code keeps it as a separate
``norm[3]`` and drops it at fine-tuning, where mean pooling + fc_norm is used either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput, check_ratio, register
from repro.models.hog import HOG
from repro.models.mim import MaskedDecoder, encode_visible, mae_init_, masked_mse, norm_pix, patchify
from repro.models.vit import ARCHS, create_vit

SCALES = (4.0, 2.0, 1.0, 0.5)


def default_taps(depth: int, n: int = 4) -> list[int]:
    """The official tap layers [1, 3, depth-3, depth-1] (0-based) when they are strictly increasing (depth >= 7);
    for shallower encoders (the tiny scale: 4 or 6 blocks) or other tap counts, ``n`` blocks evenly spaced in depth
    ending at the top (depth 4 -> [0, 1, 2, 3]; depth 6 -> [1, 2, 4, 5])."""
    if n == 4 and depth >= 7:
        return [1, 3, depth - 3, depth - 1]
    if n > depth:
        raise ConfigError(f"{n} LocalMIM taps do not fit in a {depth}-block encoder; set method.taps explicitly")
    return [int(math.floor(depth * (i + 1) / n + 0.5)) - 1 for i in range(n)]


def rescale_head(scale: float, dim: int, out_dim: int) -> nn.Sequential:
    """Patch-grid decoder features (N, dim, g, g) -> predictions (N, out_dim, g*scale, g*scale)."""
    layers: list[nn.Module]
    hidden = dim
    if scale == 4.0:
        layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2, eps=1e-6), nn.GELU(),
                  nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)]
        hidden = dim // 4
    elif scale == 2.0:
        layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)]
        hidden = dim // 2
    elif scale == 1.0:
        layers = []
    elif scale == 0.5:
        layers = [nn.AvgPool2d(2, 2)]
    else:
        raise ConfigError(f"LocalMIM scale {scale} is not supported; valid: {', '.join(map(str, SCALES))}")
    return nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))


def scale_mask(mask: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """Patch mask (N, grid*grid), 1 = masked -> the mask on the (grid*scale)^2 target grid: each patch's value
    repeated over its sub-cells for scale >= 1, averaged over 1/scale x 1/scale patches (fractional) below 1."""
    m = mask.reshape(-1, 1, grid, grid).float()
    if scale >= 1:
        s = int(scale)
        m = m.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    else:
        m = F.avg_pool2d(m, round(1 / scale))
    return m.flatten(1)


def _detach_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].detach(), *args[1:])


@register
class LocalMIM(PretrainMethod):
    name = "localmim"
    defaults = {
        "name": "localmim",
        "mask_ratio": 0.75,
        "taps": None,             # 0-based block indices; null: default_taps(depth)
        "scales": [4.0, 2.0, 1.0, 0.5],
        "target": "hog",          # hog | pixel
        "hog_bins": 9,
        "hog_bias": False,
        "decoder_dim": 256,
        "decoder_depth": 1,
        "decoder_heads": 8,
        "loss_weights": None,     # null: 1 for every scale
        "norm_pix_loss": True,    # pixel target only
        "grad_isolation": False,
        "global_multiscale": False,
        "feature_fusion": False,
    }
    linear_feature = "cls"
    finetune_pool = "avg"

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        p = self.params
        img = cfg["data"]["img_size"]
        self.encoder = create_vit(cfg["model"], img, num_classes=0)
        depth, dim = len(self.encoder.blocks), self.encoder.embed_dim
        self.patch = cfg["model"]["patch_size"]
        self.grid = img // self.patch
        self.scales = [float(s) for s in p["scales"]]
        fusion = p["feature_fusion"]
        n_taps = 4 if fusion and p["taps"] is None else len(self.scales)
        taps = list(p["taps"]) if p["taps"] is not None else default_taps(depth, n_taps)
        if any(t < 0 or t >= depth for t in taps):
            raise ConfigError(f"method.taps={taps} must lie in [0, {depth - 1}] for this {depth}-block encoder")
        for s in self.scales:
            if (self.grid * s) != int(self.grid * s) or (self.patch / s) != int(self.patch / s):
                raise ConfigError(f"LocalMIM scale {s} does not fit a {self.grid}x{self.grid} grid of "
                                  f"{self.patch}-px patches (target grid and cell size must be whole numbers)")
        self.taps = taps
        # Which hidden state feeds each decoder (and its norm); fusion feeds one decoder with the fused taps.
        self.sources = [depth - 1] * len(self.scales) if p["global_multiscale"] else list(taps)
        if fusion:
            self.sources = [taps[-1]]
        tapped = sorted(set(taps if fusion else self.sources))
        # Blocks above the highest tap (and the encoder norm with them) get no gradient; DDP must be told.
        self.find_unused_parameters = tapped[-1] < depth - 1
        self.norms = nn.ModuleDict({
            str(t): self.encoder.norm if t == depth - 1 else nn.LayerNorm(dim, eps=1e-6) for t in tapped})
        self.fuse = nn.ModuleDict({str(t): nn.Linear(dim, dim) for t in taps[:-1]}) if fusion else None
        if p["target"] == "hog":
            self.hog = HOG(p["hog_bins"], bias=p["hog_bias"])
            out_dims = [3 * p["hog_bins"]] * len(self.scales)
        else:
            self.hog = None
            out_dims = [int(self.patch / s) ** 2 * 3 for s in self.scales]
        dd = p["decoder_dim"]
        self.decoders = nn.ModuleList(
            [MaskedDecoder(dim, dd, p["decoder_depth"], p["decoder_heads"], self.grid, None) for _ in self.scales])
        self.heads = nn.ModuleList([rescale_head(s, dd, o) for s, o in zip(self.scales, out_dims)])
        weights = p["loss_weights"]
        self.weights = [1.0] * len(self.scales) if weights is None else [float(w) for w in weights]
        mae_init_(self)
        if p["grad_isolation"]:
            # Detach the input of the block after every tapped block below the top: each segment learns from its own
            # loss (nothing to isolate when only the top block is read, as in global_multiscale).
            for t in tapped:
                if t + 1 < depth:
                    self.encoder.blocks[t + 1].register_forward_pre_hook(_detach_input)

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        scales = params["scales"]
        if not scales or any(float(s) not in SCALES for s in scales):
            raise ConfigError(f"method.scales={scales} must be a non-empty list of {', '.join(map(str, SCALES))}")
        if params["target"] not in ("hog", "pixel"):
            raise ConfigError(f"method.target={params['target']!r}; valid: hog, pixel")
        if params["global_multiscale"] and params["feature_fusion"]:
            raise ConfigError("method.global_multiscale and method.feature_fusion are exclusive; set one to false")
        taps = params["taps"]
        if taps is not None:
            if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in taps):
                raise ConfigError(f"method.taps={taps} must be non-negative 0-based block indices")
            if list(taps) != sorted(taps):
                raise ConfigError(f"method.taps={taps} must be in increasing order (fine scales on lower blocks)")
        if params["feature_fusion"]:
            if len(scales) != 1:
                raise ConfigError(f"method.feature_fusion reconstructs one scale; pass e.g. method.scales=[1] "
                                  f"(got {scales})")
            if taps is not None and len(taps) < 2:
                raise ConfigError("method.feature_fusion needs at least two taps to fuse")
        elif taps is not None and len(taps) != len(scales):
            raise ConfigError(f"method.taps={taps} needs one entry per scale in method.scales={scales}")
        w = params["loss_weights"]
        if w is not None and (len(w) != len(scales) or any(float(x) < 0 for x in w)):
            raise ConfigError(f"method.loss_weights={w} needs one non-negative weight per scale ({len(scales)})")
        if int(params["hog_bins"]) < 1:
            raise ConfigError(f"method.hog_bins={params['hog_bins']} must be >= 1")
        d, h = int(params["decoder_dim"]), int(params["decoder_heads"])
        if h < 1 or d % h or d % 4:
            raise ConfigError(f"method.decoder_dim={d} must be divisible by 4 and by method.decoder_heads={h}")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """Decoder shrunk by the width/depth rule; explicit taps mapped proportionally in depth (1-based layer l of
        the paper encoder -> ceil(l * tiny_depth / paper_depth)); null taps are recomputed from the tiny depth."""
        out = rule.decoder(params, "decoder_dim", "decoder_depth", "decoder_heads")
        if out["taps"] is not None:
            paper_depth = ARCHS[rule.paper_arch][1]
            tiny_depth = ARCHS[rule.tiny_arch][1]
            out["taps"] = [max(0, math.ceil((t + 1) * tiny_depth / paper_depth) - 1) for t in out["taps"]]
        return out

    def _features(self, imgs: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                                    torch.Tensor]:
        """Encoder pass; returns the (normalised, or fused) input of every decoder, the mask and ids_restore."""
        _, mask, ids_restore, hidden = encode_visible(self.encoder, imgs, self.params["mask_ratio"], generator)
        normed = {t: norm(hidden[int(t)]) for t, norm in self.norms.items()}
        if self.fuse is not None:
            top = str(self.sources[0])
            fused = normed[top] + sum(proj(normed[t]) for t, proj in self.fuse.items())
            return [fused], mask, ids_restore
        return [normed[str(s)] for s in self.sources], mask, ids_restore

    def targets(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale targets, each (N, (grid*scale)^2, D_scale) in row-major cell order."""
        if self.hog is not None:
            cells = [int(self.patch / s) for s in self.scales]
            return [t.flatten(2).transpose(1, 2) for t in self.hog.multi_cell(imgs, cells)]
        out = []
        for s in self.scales:
            t = patchify(imgs, int(self.patch / s))
            out.append(norm_pix(t) if self.params["norm_pix_loss"] else t)
        return out

    def losses(self, imgs: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The masked MSE of every decoder (unweighted), in ``scales`` order."""
        feats, mask, ids_restore = self._features(imgs, generator)
        with torch.no_grad():
            targets = self.targets(imgs)
        out = []
        for x, dec, head, s, tgt in zip(feats, self.decoders, self.heads, self.scales, targets):
            y = dec(x, ids_restore)  # (N, L, d)
            y = y.transpose(1, 2).reshape(y.shape[0], -1, self.grid, self.grid)
            pred = head(y).flatten(2).transpose(1, 2)
            out.append(masked_mse(pred.float(), tgt.float(), scale_mask(mask, self.grid, s)))
        return out

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        parts = self.losses(batch[0], generator)
        loss = sum(w * part for w, part in zip(self.weights, parts))
        logs: dict[str, torch.Tensor | float] = {"loss": loss.detach()}
        for s, part in zip(self.scales, parts):
            logs[f"loss_x{s:g}"] = part.detach()
        return StepOutput(loss, logs)

