"""The timm Swin backbone and its visible-only forward with grouped window attention (repro.models.swin).

The strongest check: with nothing masked, ``forward_visible`` (grouped / single-group attention by window ids, no
cyclic roll) equals timm's own ``forward_features`` on the same weights at every stage -- relative-bias indexing,
shifted windows (GreenMIM's window ids give exactly the regions of Swin's roll + mask) and patch merging. With
masking, every block's grouped attention equals timm's dense window attention with the invisible keys masked out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer import window_partition, window_reverse

from repro.config import ConfigError
from repro.models.swin import (
    SwinTokens,
    create_swin,
    encoder_state_dict,
    forward_visible,
    grouped_attention,
    knapsack,
    make_grouping,
    merge_visible,
    pack_windows,
    storage_coords,
    timm_kwargs,
    timm_name,
    visible_ids_from_units,
    window_ids,
)

MICRO = {"arch": "swin_micro", "patch_size": 1, "window_size": 2, "drop_path": 0.0}


def model(img: int = 16, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_swin({**MICRO, **kw}, img).eval()
    with torch.no_grad():  # non-trivial relative position tables, so that wrong indexing shows
        for name, p in m.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(std=1.0)
    return m


def grid_coords(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], 1)


@pytest.mark.parametrize(("img", "window", "mode"), [(16, 2, "auto"), (16, 2, "group"), (16, 2, "single"),
                                                     (32, 4, "group")])
def test_unmasked_visible_forward_equals_timm(img: int, window: int, mode: str) -> None:
    m = model(img, window_size=window)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, norm=False)
        out = forward_visible(m, x, mode=mode)
    # Shifted windows are exercised: every stage but the last has a grid larger than the window.
    assert [blk.shift_size[0] for blk in m.layers[0].blocks] == [0, window // 2]
    for i, ref in enumerate(inter):
        got = out.stages[i]
        h, w = got.grid
        assert (h, w) == tuple(ref.shape[-2:])
        assert torch.allclose(got.tokens, ref.permute(0, 2, 3, 1).reshape(2, h * w, -1), atol=1e-5), i
    assert torch.allclose(out.out.tokens, final.reshape(2, -1, final.shape[-1]), atol=1e-5)
    assert [s.grid for s in out.merged] == [s.grid for s in out.stages[1:]]
    assert torch.equal(out.stages[1].coords, out.merged[0].coords)


def test_knapsack_is_optimal_and_packing_covers_each_window_once() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        sizes = torch.randint(1, 9, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        cap = max(sizes) + int(torch.randint(0, 6, (1,), generator=g))
        total, pick = knapsack(cap, sizes)
        best = max(sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r) if sum(c) <= cap)
        assert total == best == sum(sizes[i] for i in pick)
        assert pick == sorted(set(pick))
        groups = pack_windows(cap, sizes)
        assert sorted(i for grp in groups for i in grp) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in grp) <= cap for grp in groups)


@pytest.mark.parametrize("shift", [0, 2])
def test_grouping_covers_every_visible_token_once(shift: int) -> None:
    g = torch.Generator().manual_seed(1)
    coords = grid_coords(16, 16)
    for keep in (0.1, 0.3, 0.6):
        vis = coords[torch.rand(256, generator=g) < keep]
        grp = make_grouping(vis, 4, shift, mode="group")
        n, gs = vis.shape[0], grp.group_size
        assert gs <= 16 and grp.index.numel() % gs == 0
        assert torch.equal(grp.index[grp.restore], torch.arange(n))  # every token has one slot, the right one
        real = torch.zeros(grp.index.numel(), dtype=torch.bool)
        real[grp.restore] = True
        assert real.sum() == n  # no token in two slots
        wid = window_ids(vis, 4, shift)
        slot_w = torch.full((grp.index.numel(),), -1)
        slot_w[grp.restore] = wid
        per_group = slot_w.view(-1, gs)
        for w in wid.unique():  # a window lies in exactly one group
            assert ((per_group == w).any(1)).sum() == 1
        # Allowed pairs are exactly the same-window pairs of real tokens.
        allowed = ~grp.blocked.reshape(-1, gs, gs)
        same = (per_group[:, :, None] == per_group[:, None, :]) & (per_group[:, :, None] >= 0)
        assert torch.equal(allowed & (per_group[:, :, None] >= 0), same)


def dense_window_attention(blk: torch.nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """timm's own shifted-window attention on the full grid with the invisible keys masked out."""
    b, h, w, c = x.shape
    ws, s = blk.window_size, blk.shift_size
    x = torch.roll(x, (-s[0], -s[1]), (1, 2)) if any(s) else x
    vis = torch.roll(visible, (-s[0], -s[1]), (0, 1)) if any(s) else visible
    xw = window_partition(x, ws).view(-1, ws[0] * ws[1], c)
    vw = window_partition(vis[None, :, :, None].float(), ws).view(-1, ws[0] * ws[1])
    mask = torch.zeros(vw.shape[0], vw.shape[1], vw.shape[1]) if blk.attn_mask is None else blk.attn_mask.clone()
    mask = mask.masked_fill(vw[:, None, :] == 0, -1e4)
    out = window_reverse(blk.attn(xw, mask=mask).view(-1, ws[0], ws[1], c), ws, h, w)
    return torch.roll(out, s, (1, 2)) if any(s) else out


@pytest.mark.parametrize(("block", "mode"), [(0, "group"), (1, "group"), (1, "single")])
def test_grouped_attention_equals_window_by_window(block: int, mode: str) -> None:
    m = model(16, window_size=4)
    blk = m.layers[0].blocks[block]
    assert blk.shift_size[0] == (2 if block else 0)
    g = torch.Generator().manual_seed(2)
    visible = torch.rand(16, 16, generator=g) < 0.4  # any pattern: attention needs no unit alignment
    x = torch.randn(2, 16, 16, blk.norm1.normalized_shape[0], generator=g)
    coords = grid_coords(16, 16)[visible.reshape(-1)]
    with torch.no_grad():
        ref = dense_window_attention(blk, x, visible)[:, visible]
        got = grouped_attention(blk, x[:, visible], make_grouping(coords, 4, blk.shift_size[0], mode))
    assert torch.allclose(got, ref, atol=1e-5)


def test_merge_visible_equals_timm_patch_merging() -> None:
    m = model(16)
    merge = m.layers[1].downsample
    x = torch.randn(2, 16, 16, merge.dim)
    units = torch.rand(8, 8) < 0.5
    ids = visible_ids_from_units(units, 2)
    coords = torch.stack([ids // 16, ids % 16], 1)
    with torch.no_grad():
        ref = merge(x).reshape(2, 64, -1)
        got = merge_visible(merge, SwinTokens(x.reshape(2, 256, -1)[:, ids], coords, (16, 16)))
    assert got.grid == (8, 8)
    assert torch.equal(got.ids, torch.nonzero(units.reshape(-1)).squeeze(1))
    assert torch.allclose(got.tokens, ref[:, got.ids], atol=1e-6)
    with pytest.raises(ValueError):  # a 2x2 cell half visible cannot be merged
        merge_visible(merge, SwinTokens(x.reshape(2, 256, -1)[:, ids[1:]], coords[1:], (16, 16)))


@pytest.mark.parametrize(("grid", "unit"), [(28, 4), (14, 2), (7, 1), (16, 4), (8, 8)])
def test_storage_coords_are_the_official_labels(grid: int, unit: int) -> None:
    # The official LocalMIM Swin: tokens stored unit-major (units in raster order, raster inside a unit), a visible
    # subset kept, and the kept slots labelled with the raster coordinates of the full grid (coords[mask]).
    g = torch.Generator().manual_seed(grid + unit)
    units = grid // unit
    unit_major = grid_coords(grid, grid).view(units, unit, units, unit, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
    visible_units = torch.rand(units * units, generator=g) < 0.4
    kept = visible_units.repeat_interleave(unit * unit)
    true = unit_major[kept]  # the stored tokens' own coordinates, in storage order
    labels = grid_coords(grid, grid)[kept]  # the official code's
    assert torch.equal(storage_coords(true, (grid, grid), unit), labels)
    if unit in (1, grid):  # one token per unit, or one unit: storage order is raster order
        assert torch.equal(labels, true)
    with pytest.raises(ValueError, match="does not tile"):
        storage_coords(true, (grid, grid), grid + 1)


def test_masked_forward_shapes_and_block_gradients() -> None:
    m = model(16)
    m.train()
    units = torch.zeros(2, 2, dtype=torch.bool)
    units[0, 1] = units[1, 0] = True
    out = forward_visible(m, torch.randn(3, 3, 16, 16), visible_ids_from_units(units, 8))
    assert [s.tokens.shape[1] for s in out.stages] == [128, 32, 8, 2]
    assert [tuple(s.tokens.shape[-1:]) for s in out.stages] == [(32,), (64,), (128,), (256,)]
    assert out.out.grid == (2, 2) and out.out.ids.tolist() == [1, 2]
    out.out.tokens.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "head" not in n)


def test_state_dict_loads_into_timm_and_geometry_is_checked() -> None:
    cfg = {**MICRO, "window_size": 4}
    m = create_swin(cfg, 32)
    ref = timm.create_model(timm_name("swin_micro"), pretrained=False, **timm_kwargs(cfg, 32))
    ref.load_state_dict(m.state_dict(), strict=True)
    base = timm_kwargs({"arch": "swin_base", "patch_size": 4}, 224)
    assert base["embed_dim"] == 128 and base["depths"] == (2, 2, 18, 2) and base["num_heads"] == (4, 8, 16, 32)
    assert base["window_size"] == 7 and timm_name("swin_base") == "swin_base_patch4_window7_224"
    large = timm_kwargs({"arch": "swin_large", "patch_size": 4, "window_size": 14}, 224)
    assert large["embed_dim"] == 192 and large["num_heads"] == (6, 12, 24, 48) and large["window_size"] == 14
    with pytest.raises(ConfigError, match="window_size"):
        timm_kwargs({**MICRO, "window_size": 3}, 32)  # 32-px grid not a multiple of 3
    with pytest.raises(ConfigError, match="img_size"):
        timm_kwargs(MICRO, 20)  # 20 / 1 is not divisible by 8 (three merges)
    with pytest.raises(ConfigError, match="depth"):
        timm_kwargs({**MICRO, "depth": 4}, 32)


def test_evaluations_build_load_and_pool_a_swin(tmp_path: Path) -> None:
    from timm.optim import param_groups_layer_decay

    from repro.evals.features import eval_encoder, features

    mcfg = {**MICRO, "window_size": 4, "global_pool": "token"}
    enc = create_swin(mcfg, 32)
    torch.save(encoder_state_dict(enc), tmp_path / "encoder.pth")
    m = eval_encoder({"model": mcfg, "data": {"img_size": 32}}, str(tmp_path / "encoder.pth"), num_classes=5).eval()
    assert torch.equal(m.layers[2].blocks[1].attn.qkv.weight, enc.layers[2].blocks[1].attn.qkv.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = features(m, x, "avg")
        assert torch.allclose(f, enc.forward_features(x).mean(dim=(1, 2)), atol=1e-6)  # last stage, after norm
        assert m(x).shape == (2, 5)
    with pytest.raises(ConfigError, match="class token"):
        features(m, x, "cls")
    # Another window (SimMIM: 192 px / window 6 -> 224 px / window 7): timm's filter resizes the bias tables.
    m8 = eval_encoder({"model": {**mcfg, "window_size": 8}, "data": {"img_size": 32}}, str(tmp_path / "encoder.pth"))
    assert m8.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 1)
    groups = param_groups_layer_decay(m, 0.05, no_weight_decay_list=m.no_weight_decay(), layer_decay=0.9)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 8 and scales[-1] == 1.0 and scales[0] < 0.5  # one depth per block (+ stem, merges)
