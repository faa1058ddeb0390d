"""Histograms of oriented gradients as a masked-image-modeling target (MaskFeat, LocalMIM).

The variant both official code bases use (SlowFast ``HOGLayerC``, LocalMIM ``HOGLayer``): per RGB channel, fixed 3x3
Sobel filters with reflect padding; per pixel the gradient magnitude is added, whole, to ONE of ``nbins`` unsigned
orientation bins over [0, pi) (hard binning, no interpolation, no Gaussian window); the histograms are averaged over
square cells and L2-normalised over the bins of each cell and channel. Output channels are ordered
(R bins, G bins, B bins).

Orientation convention (as the official code): with ``gx``/``gy`` the responses of the kernels
``[[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` and its transpose, the angle is ``atan2(gx, gy)``, i.e. it is measured from
the image's vertical axis. Bin ``floor(nbins / 2)`` therefore holds gradients along x (a vertical edge) and bin 0
gradients along y (a horizontal edge).

``bias=True`` (LocalMIM ViT-L's ``--hog_bias``) reproduces the official filters' bias: a fixed random offset added to
(gx, gy), drawn like PyTorch's default Conv2d bias, U(-1/3, 1/3) for a 3x3 single-channel kernel. It is never
trained; here it is drawn from a seeded generator so that every process and every resume gets the same values.
LocalMIM builds one such layer per target scale, each with its own bias draw: ``HOGLayers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn


class HOG(nn.Module):
    """``forward(imgs (N, 3, H, W)) -> (N, 3 * nbins, H / cell, W / cell)``; buffers only, no parameters."""

    def __init__(self, nbins: int = 9, cell: int = 8, bias: bool = False, bias_seed: int = 0) -> None:
        super().__init__()
        if nbins < 1 or cell < 1:
            raise ValueError(f"HOG needs nbins >= 1 and cell >= 1, got nbins={nbins}, cell={cell}")
        self.nbins = nbins
        self.cell = cell
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        # (6, 1, 3, 3): for each RGB channel, its (gx, gy) pair; applied depthwise (groups=3).
        weight = torch.stack([sobel, sobel.t()])[:, None].repeat(3, 1, 1, 1)
        self.register_buffer("weight", weight, persistent=False)
        offset = torch.zeros(2)
        if bias:
            g = torch.Generator().manual_seed(bias_seed)
            offset = (torch.rand(2, generator=g) * 2 - 1) / 3.0
        self.register_buffer("offset", offset.repeat(3), persistent=False)

    @torch.no_grad()
    def pixel_gradients(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel (magnitude, bin index), each (N, 3, H, W), computed in float32."""
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")
        g = F.conv2d(x, self.weight, self.offset, groups=3)  # (N, 6, H, W): R gx, R gy, G gx, ...
        n, _, h, w = g.shape
        g = g.view(n, 3, 2, h, w)
        gx, gy = g[:, :, 0], g[:, :, 1]
        mag = torch.sqrt(gx * gx + gy * gy)
        phase = torch.atan2(gx, gy)  # in [-pi, pi]; folding modulo pi makes it unsigned
        idx = torch.floor(phase / math.pi * self.nbins).long().remainder(self.nbins)
        return mag, idx

    @torch.no_grad()
    def multi_cell(self, imgs: torch.Tensor, cells: Sequence[int]) -> list[torch.Tensor]:
        """HOG maps for several cell sizes from one gradient pass: a list of (N, 3 * nbins, H / c, W / c).

        The histogram is taken once at the greatest common divisor of ``cells`` and average-pooled up from there
        (exact up to float rounding: an average over a cell equals the average of its equal-sized sub-cells)."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            mag, bins = self.pixel_gradients(imgs)
            base = reduce(math.gcd, [int(c) for c in cells])
            n, c, h, w = mag.shape
            for cell in cells:
                if h % cell or w % cell:
                    raise ValueError(f"HOG cell {cell} px does not divide the {h}x{w} image")
            hist = cell_histograms(mag, bins, self.nbins, base)
            out = []
            for cell in cells:
                k = int(cell) // base
                pooled = hist if k == 1 else F.avg_pool2d(hist.flatten(1, 2), k).unflatten(1, (c, self.nbins))
                out.append(F.normalize(pooled, p=2, dim=2).flatten(1, 2))
            return out

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.multi_cell(imgs, [self.cell])[0]


# Elements of the (chunk, 3, nbins, H, W) per-bin maps that cell_histograms holds at a time (512 MiB in fp32).
HIST_CHUNK = 1 << 27


def cell_histograms(mag: torch.Tensor, bins: torch.Tensor, nbins: int, cell: int) -> torch.Tensor:
    """Mean over every ``cell`` x ``cell`` cell of the magnitude per orientation bin: (N, C, H, W) magnitudes and
    int64 bin indices -> (N, C, nbins, H / cell, W / cell). Per batch chunk, every pixel's magnitude is written into its
    bin's plane (a scatter without collisions: deterministic) and the planes are summed over each cell's columns,
    then rows, then divided by cell**2: average pooling per bin, up to the order of the float additions."""
    n, c, h, w = mag.shape
    step = max(1, HIST_CHUNK // max(1, c * nbins * h * w))
    parts = []
    for i in range(0, n, step):
        m, b = mag[i:i + step], bins[i:i + step]
        planes = m.new_zeros(m.shape[0], c, nbins, h, w).scatter_(2, b.unsqueeze(2), m.unsqueeze(2))
        cols = planes.view(-1, c, nbins, h, w // cell, cell).sum(dim=5)
        parts.append(cols.view(-1, c, nbins, h // cell, cell, w // cell).sum(dim=4))
    hist = parts[0] if len(parts) == 1 else torch.cat(parts)
    return hist.div_(cell * cell)


class HOGLayers(nn.Module):
    """One HOG layer per target (LocalMIM's per-scale layers), layer i with bias seed i: with ``bias`` every layer has
    its own independent draw, as the official per-layer Conv2d biases; without it the layers are identical and one
    gradient pass serves every cell size."""

    def __init__(self, nbins: int, num_layers: int, bias: bool = False) -> None:
        super().__init__()
        self.nbins = nbins
        self.layers = nn.ModuleList([HOG(nbins, bias=bias, bias_seed=i) for i in range(num_layers if bias else 1)])

    @torch.no_grad()
    def multi_cell(self, imgs: torch.Tensor, cells: Sequence[int]) -> list[torch.Tensor]:
        """Layer i's HOG map at ``cells[i]``: a list of (N, 3 * nbins, H / c, W / c)."""
        if len(self.layers) == 1:
            return self.layers[0].multi_cell(imgs, cells)
        if len(cells) != len(self.layers):
            raise ValueError(f"{len(self.layers)} HOG layers got {len(cells)} cell sizes")
        return [layer.multi_cell(imgs, [c])[0] for layer, c in zip(self.layers, cells)]


def cells_to_patches(hog: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) cell map -> (N, (H/k)*(W/k), C*k*k): the k x k cells under each patch, patches in row-major order,
    features ordered (channel, cell row, cell col)."""
    n, c, h, w = hog.shape
    x = hog.reshape(n, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // k) * (w // k), c * k * k)
