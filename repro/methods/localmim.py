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

Swin (``model.arch`` swin_*; Self-supervised/LocalMIM/Swin, modified from GreenMIM): the visible-only Swin of
``repro.models.swin`` (grouped window attention) on ONE mask per batch, drawn on the last stage's cells (32 px) with
the official count ``int(units * ratio) + 1`` (37 of 49 at 0.75). ``taps`` are still 0-based block indices but must
be stage ends (default: all four, [1, 3, 21, 23] of Swin-B = the paper's 2, 4, 22, 24); a tap reads its stage's output
AFTER the patch merging that follows it (dims 2C, 4C, 8C, 8C; grids 28, 14, 7, 7 at 224), as the official code.
``scales`` are multiples of the grid of the feature a decoder reads (the same rule as for the ViT, whose features are
all on the patch grid): [1, 1, 1, 1] is the official "same scale as the feature map"; 0.25 is allowed for Table 6's
local single-scale row. Each decoder is GreenMIM's unit decoder (no cls; mask token, fixed sin-cos positions, blocks)
with ``decoder_dim`` (128) and ``decoder_heads`` (4), except that the decoder of the stage-1 tap is ``decoder_dim / 2``
wide (official); targets: HOG with cells = the target cell size (8, 16, 32, 32 px; 18 bins + bias in the recipes) or
per-cell normalised pixels. ``grad_isolation`` detaches the input of the stage after each tapped one;
``feature_fusion`` adds to the normalised top feature a linear map of each lower tap's normalised r x r block of
tokens per top-level cell (ConvMAE's stride-r convolution).

Merged tokens' coordinates (``merge_coords``): the official encoder stores the visible tokens unit-major (each 32-px
unit's tokens together) and gives the tokens after every patch merging the raster coordinates of their storage slot,
not their own, so at stages 1 and 2 its windows and relative positions come from those labels (stage 0 and, one token
per unit, stage 3 use the true ones). ``official`` (default) reproduces it (``repro.models.swin.storage_coords``);
``own`` gives every token its own coordinates, as a Swin on the full image would. Both are checked against the
official module (benchmarks/official/parity.py, case localmim-swin; ``own`` against the official with its labels
corrected in memory).

Two classes, ``LocalMIMViT`` and ``LocalMIMSwin``, share ``LocalMIM`` (targets, weighted loss, logs);
``LocalMIM(cfg)`` builds the one of ``cfg``'s arch.

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
from timm.optim import param_groups_weight_decay
from torch import nn

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.localmim import SCALES, LocalMIMSpec
from repro.models.archs import swin_stage_ends
from repro.models.hog import HOGLayers
from repro.models.mim import MaskedDecoder, UnitDecoder, encode_visible, mae_init_, masked_mse, norm_pix, patchify
from repro.models.swin import (
    SwinTokens,
    WindowGrouping,
    block_visible,
    create_swin,
    gather_rows,
    grouping_to,
    inverse_index,
    is_swin,
    mask_unit,
    merge_visible,
    stage_groupings,
    storage_coords,
    visible_ids_from_units,
)
from repro.models.swin import encoder_state_dict as swin_state_dict
from repro.models.vit import create_vit


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
    elif scale in (0.5, 0.25):
        k = round(1 / scale)
        layers = [nn.AvgPool2d(k, k)]
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


def swin_batch_mask(units: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """One (units,) mask for the whole batch, 1 = masked, with the official count: ``randperm(L) <= int(L * ratio)``
    masks int(L * ratio) + 1 units (37 of 49 at 0.75); at least one unit stays visible."""
    k = min(units - 1, int(units * mask_ratio) + 1)
    order = torch.rand(units, generator=generator, device=generator.device).argsort()
    mask = torch.zeros(units, device=order.device)
    mask[order[:k]] = 1.0
    return mask


def _detach_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].detach(), *args[1:])


class LocalMIM(LocalMIMSpec, PretrainMethod):
    """What the ViT and Swin variants share: the per-scale targets, the weighted loss and its logs. ``LocalMIM(cfg)``
    builds the class of ``cfg``'s arch (``LocalMIMViT`` or ``LocalMIMSwin``)."""

    scales: list[float]
    cells: list[int]  # target cell size in px, per scale
    weights: list[float]
    hog: HOGLayers | None

    def __new__(cls, *args: Any, **kwargs: Any) -> LocalMIM:
        if cls is LocalMIM:  # pick the arch's class; its __init__ then runs as usual
            cfg = args[0] if args else kwargs["cfg"]
            cls = LocalMIMSwin if is_swin(cfg["model"]["arch"]) else LocalMIMViT
        return super().__new__(cls)

    def _targets_and_weights(self, pixel_dims: list[int]) -> list[int]:
        """Build the HOG layers (``target: hog``) and the loss weights; returns each scale's target width
        (``pixel_dims`` for ``target: pixel``)."""
        p = self.params
        if p["target"] == "hog":
            self.hog = HOGLayers(p["hog_bins"], len(self.scales), bias=p["hog_bias"])
            out_dims = [3 * p["hog_bins"]] * len(self.scales)
        else:
            self.hog = None
            out_dims = pixel_dims
        weights = p["loss_weights"]
        self.weights = [1.0] * len(self.scales) if weights is None else [float(w) for w in weights]
        return out_dims

    def targets(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale targets, each (N, (grid*scale)^2, D_scale) in row-major cell order."""
        if self.hog is not None:
            return [t.flatten(2).transpose(1, 2) for t in self.hog.multi_cell(imgs, self.cells)]
        out = []
        for c in self.cells:
            t = patchify(imgs, c)
            out.append(norm_pix(t) if self.params["norm_pix_loss"] else t)
        return out

    def losses(self, imgs: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The masked MSE of every decoder (unweighted), in ``scales`` order."""
        raise NotImplementedError

    def decode_losses(self, *args: Any) -> list[torch.Tensor]:
        """Everything after the encoder (tap norms, fusion, targets, decoders, heads, masked MSEs): one graph under
        ``train.compile_scope=all`` (``run_unit``). Its inputs' shapes are fixed per recipe (the visible count is)."""
        raise NotImplementedError

    def _decode(self, *args: Any) -> list[torch.Tensor]:
        return self.run_unit("decode_losses", *args)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        parts = self.losses(batch[0], generator)
        loss = sum(w * part for w, part in zip(self.weights, parts))
        logs: dict[str, torch.Tensor | float] = {"loss": loss.detach()}
        repeated = len(set(self.scales)) < len(self.scales)  # Swin: scale 1 at every tap -> key by tap
        for i, (s, part) in enumerate(zip(self.scales, parts)):
            logs[f"loss_t{i}" if repeated else f"loss_x{s:g}"] = part.detach()
        return StepOutput(loss, logs)


class LocalMIMViT(LocalMIM):
    """LocalMIM on a ViT: MAE's visible-only encoder, taps on its blocks, one MAE decoder per scale."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
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
        self.cells = [int(self.patch / s) for s in self.scales]
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
        out_dims = self._targets_and_weights([c * c * 3 for c in self.cells])
        dd = p["decoder_dim"]
        self.decoders = nn.ModuleList(
            [MaskedDecoder(dim, dd, p["decoder_depth"], p["decoder_heads"], self.grid, None) for _ in self.scales])
        self.heads = nn.ModuleList([rescale_head(s, dd, o) for s, o in zip(self.scales, out_dims)])
        mae_init_(self)
        if p["grad_isolation"]:
            # Detach the input of the block after every tapped block below the top: each segment learns from its own
            # loss (nothing to isolate when only the top block is read, as in global_multiscale).
            for t in tapped:
                if t + 1 < depth:
                    self.encoder.blocks[t + 1].register_forward_pre_hook(_detach_input)

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """No weight decay on biases and 1-D parameters (the official ViT run_pretrain.py has no skip list: its mask
        tokens are decayed)."""
        return param_groups_weight_decay(self, optim["weight_decay"], no_weight_decay_list=[])

    def losses(self, imgs: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        _, mask, ids_restore, hidden = encode_visible(self.encoder, imgs, self.params["mask_ratio"], generator,
                                                      self.speed_switch("embed_visible", imgs.device))
        return self._decode([hidden[int(t)] for t in self.norms], mask, ids_restore, imgs)

    def decode_losses(self, tapped: list[torch.Tensor], mask: torch.Tensor, ids_restore: torch.Tensor,
                      imgs: torch.Tensor) -> list[torch.Tensor]:
        """``tapped``: the hidden states of the tapped blocks (``norms`` order, before their norms)."""
        normed = {t: norm(h) for (t, norm), h in zip(self.norms.items(), tapped)}
        if self.fuse is not None:
            top = str(self.sources[0])
            feats = [normed[top] + sum(proj(normed[t]) for t, proj in self.fuse.items())]
        else:
            feats = [normed[str(s)] for s in self.sources]
        with torch.no_grad():
            targets = self.targets(imgs)
        out = []
        for x, dec, head, s, tgt in zip(feats, self.decoders, self.heads, self.scales, targets):
            y = dec(x, ids_restore)  # (N, L, d)
            y = y.transpose(1, 2).reshape(y.shape[0], -1, self.grid, self.grid)
            pred = head(y).flatten(2).transpose(1, 2)
            out.append(masked_mse(pred.float(), tgt.float(), scale_mask(mask, self.grid, s)))
        return out


class LocalMIMSwin(LocalMIM):
    """LocalMIM on a Swin (see the module docstring): the same knobs, taps restricted to stage ends."""

    linear_feature = "avg"  # no cls token in a Swin: probe the mean of the last stage's tokens

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        img = cfg["data"]["img_size"]
        self.encoder = create_swin(cfg["model"], img, num_classes=0)
        depths = [len(stage.blocks) for stage in self.encoder.layers]
        n = len(depths)
        ends = swin_stage_ends(depths)
        self.stage_ends = ends
        self.patch = cfg["model"]["patch_size"]
        self.unit_patches = mask_unit(self.encoder)
        self.ugrid = img // (self.patch * self.unit_patches)
        self.official_coords = p["merge_coords"] == "official"
        self.scales = [float(s) for s in p["scales"]]
        fusion = p["feature_fusion"]
        if p["taps"] is not None:
            taps = list(p["taps"])
        else:
            taps = ends if fusion else ends[n - len(self.scales):] if len(self.scales) <= n else []
        if not taps or any(t not in ends for t in taps):
            raise ConfigError(f"method.taps={p['taps']} for a Swin must be stage ends, some of {ends} (one per scale; "
                              f"null: the last len(scales) stages)")
        self.taps = taps
        self.sources = [ends[-1]] * len(self.scales) if p["global_multiscale"] else list(taps)
        if fusion:
            self.sources = [taps[-1]]
        tapped = sorted(set(taps if fusion else self.sources))
        self.tapped = tapped
        self.find_unused_parameters = tapped[-1] < ends[-1]
        embed = int(self.encoder.embed_dim)
        # A tap at stage i reads the output of the merge that follows it (the top stage: its blocks' output).
        stage_of = {e: i for i, e in enumerate(ends)}
        level = {t: min(stage_of[t] + 1, n - 1) for t in ends}
        self.tap_dim = {t: embed * 2 ** level[t] for t in ends}
        self.tap_grid = {t: img // self.patch // 2 ** level[t] for t in ends}
        self.norms = nn.ModuleDict({str(t): self.encoder.norm if t == ends[-1] else
                                    nn.LayerNorm(self.tap_dim[t], eps=1e-6) for t in tapped})
        top = taps[-1]
        self.fuse = None
        if fusion:
            # One linear map per lower tap from its r x r block of tokens per top cell (a stride-r convolution).
            blocks = {t: (self.tap_grid[t] // self.tap_grid[top]) ** 2 for t in taps[:-1]}
            self.fuse = nn.ModuleDict({str(t): nn.Linear(self.tap_dim[t] * k, self.tap_dim[top])
                                       for t, k in blocks.items()})
        self.cells = []
        for t, s in zip(self.sources, self.scales):
            g = self.tap_grid[t] * s
            if g != int(g) or img % int(g):
                raise ConfigError(f"LocalMIM scale {s} does not fit the {self.tap_grid[t]}x{self.tap_grid[t]} grid of "
                                  f"Swin block {t} at {img} px (target grid and cell size must be whole numbers)")
            self.cells.append(img // int(g))
        out_dims = self._targets_and_weights([c * c * 3 for c in self.cells])
        dd, heads = int(p["decoder_dim"]), int(p["decoder_heads"])
        # Official: the decoder of the first stage's output is half as wide (decoder_embed_dim // 2).
        dims = [dd // 2 if stage_of[t] == 0 else dd for t in self.sources]
        if any(d % heads or d % 4 for d in dims):
            raise ConfigError(f"method.decoder_dim={dd}: the Swin decoders are {dims} wide and each must be divisible "
                              f"by 4 and by method.decoder_heads={heads}; use e.g. decoder_dim=128, decoder_heads=4")
        decoders = []
        for t, d in zip(self.sources, dims):
            dec = UnitDecoder(self.tap_dim[t], d, p["decoder_depth"], heads, self.tap_grid[t], d)
            dec.pred = nn.Identity()  # the prediction is rescale_head's 1x1 conv (identical at scale 1)
            decoders.append(dec)
        self.decoders = nn.ModuleList(decoders)
        self.heads = nn.ModuleList([rescale_head(s, d, o) for s, d, o in zip(self.scales, dims, out_dims)])
        mae_init_(self)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for dec in self.decoders:
            nn.init.normal_(dec.mask_token, std=0.02)

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """No weight decay on biases, 1-D parameters and names containing ``position_bias`` or ``token`` (relative
        position tables, decoder mask tokens), as the official Swin/run_pretrain.py."""
        skip = [n for n, _ in self.named_parameters() if "position_bias" in n or "token" in n]
        return param_groups_weight_decay(self, optim["weight_decay"], no_weight_decay_list=skip)

    def _swin_levels(self, imgs: torch.Tensor, ids: torch.Tensor) -> dict[int, SwinTokens]:
        """Visible-only Swin pass (``repro.models.swin`` pieces) returning the tapped levels (before their norms),
        with the input of the next stage detached after each tap under ``grad_isolation``; stops at the highest tap."""
        enc = self.encoder
        ends, want = self.stage_ends, set(self.tapped)
        isolate = bool(self.params["grad_isolation"])
        x = enc.patch_embed(imgs)
        b, h, w, c = x.shape
        dev = x.device
        # The coords, merges and window groupings are worked out where ``ids`` lives (the CPU: no host syncs); only
        # the finished index tensors travel to the device.
        ids = torch.sort(ids).values
        inv = inverse_index(ids, h * w)
        tokens = gather_rows(x.reshape(b, h * w, c), ids.to(dev, non_blocking=True), inv.to(dev, non_blocking=True))
        level = SwinTokens(tokens, torch.stack([ids // w, ids % w], dim=1), (h, w))
        out: dict[int, SwinTokens] = {}
        for i, stage in enumerate(enc.layers):
            if i > 0:
                level = merge_visible(stage.downsample, level)
                prev = ends[i - 1]
                if prev in want:
                    out[prev] = level
                    if isolate:
                        level = SwinTokens(level.tokens.detach(), level.coords, level.grid)
                if len(out) == len(want):
                    return out
            t = level.tokens
            coords = level.coords
            if i > 0 and self.official_coords:  # windows and relative positions from the official code's labels
                coords = storage_coords(coords, level.grid, level.grid[0] // self.ugrid)
            moved: dict[int, WindowGrouping] = {}  # blocks with the same (window, shift) share one grouping
            for blk, g in zip(stage.blocks, stage_groupings(stage, coords)):
                if id(g) not in moved:
                    moved[id(g)] = grouping_to(g, dev)
                t = block_visible(blk, t, moved[id(g)])
            level = SwinTokens(t, level.coords, level.grid)
        out[ends[-1]] = level
        return out

    def losses(self, imgs: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        mask = swin_batch_mask(self.ugrid * self.ugrid, float(self.params["mask_ratio"]), generator).to(imgs.device)
        # The step's one host sync: the (units,) mask comes to the CPU, where the index bookkeeping runs.
        ids = visible_ids_from_units((mask == 0).reshape(self.ugrid, self.ugrid).cpu(), self.unit_patches)
        levels = self._swin_levels(imgs, ids)
        dev = imgs.device
        slots = [levels[t].ids.to(dev, non_blocking=True) for t in self.tapped]
        cells = [] if self.fuse is None else [
            _cell_index(levels[int(t)], levels[self.sources[0]]).to(dev, non_blocking=True) for t in self.fuse]
        return self._decode([levels[t].tokens for t in self.tapped], slots, cells, mask, imgs)

    def decode_losses(self, tapped: list[torch.Tensor], slots: list[torch.Tensor], cells: list[torch.Tensor],
                      mask: torch.Tensor, imgs: torch.Tensor) -> list[torch.Tensor]:
        """``tapped``: the tapped levels' tokens (``self.tapped`` order, before their norms) at grid ids ``slots``;
        ``cells``: for feature fusion, each lower tap's ``_cell_index``; ``mask`` (units,) 1 = masked."""
        n = imgs.shape[0]
        normed = {t: self.norms[str(t)](x) for t, x in zip(self.tapped, tapped)}
        ids = dict(zip(self.tapped, slots))
        if self.fuse is not None:
            top = normed[self.sources[0]]
            fused = top + sum(proj(normed[int(t)][:, idx].reshape(n, top.shape[1], -1))
                              for (t, proj), idx in zip(self.fuse.items(), cells))
            feats = [(fused, self.sources[0])]
        else:
            feats = [(normed[t], t) for t in self.sources]
        with torch.no_grad():
            targets = self.targets(imgs)
        out = []
        for (x, t), dec, head, s, tgt in zip(feats, self.decoders, self.heads, self.scales, targets):
            g = self.tap_grid[t]
            y = dec(x, ids[t])  # (N, g*g, d), raster order
            pred = head(y.transpose(1, 2).reshape(n, -1, g, g)).flatten(2).transpose(1, 2)
            m = scale_mask(mask[None].expand(n, -1), self.ugrid, g * s / self.ugrid)
            out.append(masked_mse(pred.float(), tgt.float(), m))
        return out

    def export(self) -> dict[str, torch.Tensor]:
        return swin_state_dict(self.encoder)


def _cell_index(fine: SwinTokens, top: SwinTokens) -> torch.Tensor:
    """For every top-level cell, the rows of the r x r block of ``fine`` tokens it covers, in raster order: (M * r * r,)
    (``tokens[:, idx].reshape(B, M, r * r * C)``, of which a stride-r convolution is a linear map). Visible cells are
    whole at every level."""
    r = fine.grid[0] // top.grid[0]
    w = fine.grid[1]
    dev = fine.coords.device
    slot = torch.full((fine.grid[0] * w,), -1, dtype=torch.long, device=dev)
    slot[fine.ids] = torch.arange(fine.ids.numel(), device=dev)
    off = torch.stack(torch.meshgrid(torch.arange(r, device=dev), torch.arange(r, device=dev), indexing="ij"), -1)
    pos = top.coords[:, None, :] * r + off.reshape(1, -1, 2)
    return slot[pos[..., 0] * w + pos[..., 1]].reshape(-1)
