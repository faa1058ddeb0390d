"""HOG target (repro.models.hog): orientation bins on hand-made edges, per-cell L2 normalisation, shapes, the filter
bias, the patch grouping, and agreement with a per-pixel reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import repro.models.hog as hog_module
from repro.models.hog import HOG, cell_histograms, cells_to_patches


def edge(size: int, vertical: bool, dark_first: bool = True) -> torch.Tensor:
    """(1, 3, size, size) step image: vertical=True puts the step between the left and right halves."""
    img = torch.zeros(1, 3, size, size)
    lo, hi = (0.0, 1.0) if dark_first else (1.0, 0.0)
    img[:] = lo
    if vertical:
        img[..., size // 2:] = hi
    else:
        img[..., size // 2:, :] = hi
    return img


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("dark_first", [True, False])
def test_vertical_edge_lands_in_middle_bin(nbins: int, dark_first: bool) -> None:
    # A vertical edge has its gradient along x (orientation 0 in the usual convention). The official formula measures
    # the angle from the vertical axis (atan2(gx, gy)), so it lands in bin floor(nbins / 2): 4 of 9, 9 of 18.
    out = HOG(nbins, cell=8)(edge(32, vertical=True, dark_first=dark_first)).view(3, nbins, 4, 4)
    hot = nbins // 2
    for col in (1, 2):  # the cells either side of the step at x = 16
        assert torch.allclose(out[:, hot, :, col], torch.ones(3, 4))
        others = torch.cat([out[:, :hot, :, col], out[:, hot + 1:, :, col]], dim=1)
        assert torch.count_nonzero(others) == 0
    assert torch.count_nonzero(out[:, :, :, [0, 3]]) == 0  # flat cells


@pytest.mark.parametrize("dark_first", [True, False])
def test_horizontal_edge_lands_in_bin_zero(dark_first: bool) -> None:
    # Gradient along y: angle 0 or pi from the vertical axis -> bin 0 (the "pi/2" direction of the usual convention).
    out = HOG(9, cell=8)(edge(32, vertical=False, dark_first=dark_first)).view(3, 9, 4, 4)
    for row in (1, 2):
        assert torch.allclose(out[:, 0, row, :], torch.ones(3, 4))
        assert torch.count_nonzero(out[:, 1:, row, :]) == 0
    assert torch.count_nonzero(out[:, :, [0, 3], :]) == 0


def test_diagonal_edge_between_axes() -> None:
    # A 45-degree step (gx = gy in magnitude): angle pi/4 or 3pi/4 from the vertical -> bin 2 or 6 of 9, not 0 or 4.
    n = 32
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    img = (xs + ys >= n).float()[None, None].repeat(1, 3, 1, 1)
    out = HOG(9, cell=8)(img).view(3, 9, 4, 4)
    energy = out.pow(2).sum(dim=(0, 2, 3))
    assert energy[[2, 6]].sum() > 0.99 * energy.sum()


def test_cells_are_l2_normalised_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    img[1, :, :16, :16] = 0.5  # one flat quadrant: a 2 x 2 block of flat 4-px cells inside it
    out = HOG(9, cell=4)(img).view(2, 3, 9, 8, 8)
    norms = out.norm(dim=2)
    assert torch.allclose(norms[0], torch.ones(3, 8, 8), atol=1e-5)
    flat = norms[1, :, :3, :3]  # cells 0-2 never see the random pixels (the Sobel reaches one pixel past them)
    assert torch.count_nonzero(flat) == 0
    rest = norms[1].clone()
    rest[:, :3, :3] = 1.0
    assert torch.allclose(rest, torch.ones(3, 8, 8), atol=1e-5)
    assert (out >= 0).all()


@pytest.mark.parametrize("cell", [4, 8, 16, 32])
def test_output_shape_and_multi_cell(cell: int) -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 64, 64, generator=g)
    hog = HOG(9, cell=cell)
    out = hog(img)
    assert out.shape == (2, 27, 64 // cell, 64 // cell)
    # The shared-gradient path (pooled once at the gcd of the cells, then averaged up) equals the direct one.
    multi = HOG(9).multi_cell(img, [4, 8, 16, 32])
    assert torch.allclose(multi[[4, 8, 16, 32].index(cell)], out, atol=1e-6)


def test_no_grad_no_parameters_and_fp32_under_autocast() -> None:
    hog = HOG(9, cell=8)
    assert list(hog.parameters()) == []
    img = torch.randn(1, 3, 16, 16, requires_grad=True)
    out = hog(img)
    assert not out.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf = hog(img)
    assert out_bf.dtype == torch.float32 and torch.equal(out_bf, out)


def reference_hog(img: np.ndarray, nbins: int, cell: int) -> np.ndarray:
    """Per-pixel loops: Sobel with reflect padding, angle atan2(gx, gy), hard bin, mean per cell, L2 per cell."""
    c, h, w = img.shape
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    ky = kx.T
    out = np.zeros((c, nbins, h // cell, w // cell))
    for ch in range(c):
        pad = np.pad(img[ch], 1, mode="reflect")
        for y in range(h):
            for x in range(w):
                win = pad[y:y + 3, x:x + 3]
                gx, gy = float((win * kx).sum()), float((win * ky).sum())
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                out[ch, b, y // cell, x // cell] += math.hypot(gx, gy) / cell**2
    norm = np.sqrt((out**2).sum(axis=1, keepdims=True))
    return (out / np.maximum(norm, 1e-12)).reshape(c * nbins, h // cell, w // cell)


def test_matches_per_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    # Dyadic pixel values keep every filter response exact in float32 and float64, so the hard bin boundaries
    # (e.g. gx == 0 at a reflect-padded border, angle exactly pi) are decided identically by both.
    img = np.round(rng.normal(size=(3, 16, 16)) * 64) / 64
    ours = HOG(9, cell=4)(torch.from_numpy(img).float()[None])[0].numpy()
    np.testing.assert_allclose(ours, reference_hog(img, 9, 4), atol=1e-4)


def test_bias_option() -> None:
    flat = torch.zeros(1, 3, 16, 16)
    assert torch.count_nonzero(HOG(18, cell=8)(flat)) == 0
    biased = HOG(18, cell=8, bias=True)
    assert biased.offset.abs().max() <= 1 / 3
    out = biased(flat).view(3, 18, 2, 2)
    # A constant offset gives every flat pixel the same gradient: one hot bin per cell, norm 1.
    assert torch.allclose(out.norm(dim=1), torch.ones(3, 2, 2))
    assert torch.count_nonzero(out) == 3 * 2 * 2
    assert torch.equal(HOG(18, bias=True, bias_seed=0).offset, biased.offset)
    assert not torch.equal(HOG(18, bias=True, bias_seed=1).offset, biased.offset)


def test_cells_to_patches_order() -> None:
    c, h, w, k = 2, 4, 6, 2
    cells = torch.arange(c * h * w, dtype=torch.float32).view(1, c, h, w)
    patches = cells_to_patches(cells, k)
    assert patches.shape == (1, (h // k) * (w // k), c * k * k)
    # Patch 1 (row 0, col 1) holds cells rows 0-1, cols 2-3 of channel 0, then the same of channel 1.
    expect = torch.cat([cells[0, ch, 0:2, 2:4].reshape(-1) for ch in range(c)])
    assert torch.equal(patches[0, 1], expect)
    # Patch 3 is the first of the second patch row.
    assert torch.equal(patches[0, 3, :4], cells[0, 0, 2:4, 0:2].reshape(-1))


def pooled_reference(hog: HOG, img: torch.Tensor, cells: list[int]) -> list[torch.Tensor]:
    """The previous multi_cell: one masked map and one average pool per bin at the gcd cell, pooled up from there."""
    mag, idx = hog.pixel_gradients(img)
    base = math.gcd(*cells)
    hist = torch.stack([F.avg_pool2d(mag * (idx == b), base) for b in range(hog.nbins)], dim=2)
    out = []
    for cell in cells:
        k = cell // base
        pooled = hist if k == 1 else F.avg_pool2d(hist.flatten(1, 2), k).unflatten(1, (3, hog.nbins))
        out.append(F.normalize(pooled, p=2, dim=2).flatten(1, 2))
    return out


@pytest.mark.parametrize(("nbins", "bias", "cells", "size"), [(9, False, [4, 8, 16, 32], 64), (18, True, [8], 64),
                                                            (18, True, [32], 96), (7, False, [1, 2, 3], 12)])
def test_histograms_equal_per_bin_pooling(nbins: int, bias: bool, cells: list[int], size: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Same tensors as the per-bin avg_pool2d version up to the order of the float additions (observed: <= 2 ulp).
    hog = HOG(nbins, bias=bias, bias_seed=3)
    img = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(nbins))
    want = pooled_reference(hog, img, cells)
    got = hog.multi_cell(img, cells)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    monkeypatch.setattr(hog_module, "HIST_CHUNK", 1)  # one image per chunk: the same numbers
    assert all(torch.equal(a, b) for a, b in zip(hog.multi_cell(img, cells), got))


def test_cell_histograms_sum_the_magnitudes_per_bin() -> None:
    mag = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    bins = (torch.arange(16) % 3).view(1, 1, 4, 4)
    hist = cell_histograms(mag, bins, 3, 2)  # (1, 1, 3, 2, 2)
    for b in range(3):
        want = F.avg_pool2d(mag * (bins == b), 2)[0, 0]
        assert torch.equal(hist[0, 0, b], want)
