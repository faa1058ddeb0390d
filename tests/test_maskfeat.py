"""MaskFeat (repro.methods.maskfeat): BEiT block-wise masking, the mask token in the encoder, HOG targets per patch,
the tiny rule and a micro overfit (its tiny chain: test_chain_smoke.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from repro.config import ConfigError
from repro.methods.maskfeat import MaskFeat, blockwise_mask
from repro.models.mim import masked_mse
from repro.resolve import resolve
from repro.scales import TinyRule


def make(**method: Any) -> MaskFeat:
    """vit_micro, 32-px images, 4-px patches (8 x 8 grid), 2-px HOG cells: 2 x 2 cells x 27 = 108 values a patch."""
    torch.manual_seed(0)
    return MaskFeat(resolve("maskfeat", "tiny", {"method": method}))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def components(mask: torch.Tensor, h: int, w: int) -> list[int]:
    """Sizes of the 4-connected components of a flat (h*w) 0/1 mask."""
    grid = mask.view(h, w).tolist()
    seen: set[tuple[int, int]] = set()
    sizes = []
    for i in range(h):
        for j in range(w):
            if grid[i][j] and (i, j) not in seen:
                stack, n = [(i, j)], 0
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    n += 1
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < h and 0 <= d < w and grid[c][d] and (c, d) not in seen:
                            seen.add((c, d))
                            stack.append((c, d))
                sizes.append(n)
    return sizes


def test_blockwise_ratio_close_to_target() -> None:
    target = round(0.4 * 196)  # 78
    m = blockwise_mask(200, 14, 14, target, gen(), min_num=16)
    assert m.shape == (200, 196) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    counts = m.sum(1)
    assert counts.max() == target  # never over the target
    assert counts.mean() >= target - 1.5  # short by at most a patch or two on average
    assert counts.min() >= target - 10


def test_blockwise_masks_are_blocks() -> None:
    m = blockwise_mask(100, 14, 14, 78, gen(1), min_num=16)
    sizes = [components(row, 14, 14) for row in m]
    assert sum(len(s) for s in sizes) / len(sizes) <= 3  # a random 40% mask has ~25 components
    assert min(max(s) for s in sizes) >= 16
    # A budget of one 3 x 3 block (area 9, aspect fixed at 1) gives one filled 3 x 3 square, anywhere in the grid.
    single = blockwise_mask(200, 14, 14, 9, gen(2), min_num=9, min_aspect=1.0)
    corners = set()
    for row in single:
        grid = row.view(14, 14)
        rows, cols = grid.sum(1).nonzero().flatten(), grid.sum(0).nonzero().flatten()
        assert len(rows) == len(cols) == 3 and int(row.sum()) == 9
        assert int(rows[-1] - rows[0]) == int(cols[-1] - cols[0]) == 2
        corners.add((int(rows[0]), int(cols[0])))
    assert {r for r, _ in corners} == set(range(12)) and {c for _, c in corners} == set(range(12))


def test_blockwise_randomness_from_generator() -> None:
    a = blockwise_mask(8, 14, 14, 78, gen(5))
    b = blockwise_mask(8, 14, 14, 78, gen(5))
    c = blockwise_mask(8, 14, 14, 78, gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The generator advances by a fixed amount (one (n, 10 * (target + 1), 4) float64 draw), whatever the masks.
    g, ref = gen(5), gen(5)
    blockwise_mask(8, 14, 14, 78, g)
    torch.rand(8, 10 * 79, 4, generator=ref, dtype=torch.float64)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


def test_masked_patches_do_not_reach_the_encoder() -> None:
    m = make()
    imgs = torch.randn(2, 3, 32, 32, generator=gen(1))
    mask = m.mask(2, gen(2))
    pred = m.predict(imgs, mask)
    assert pred.shape == (2, 64, 108)
    # Change the pixels of one masked and one visible patch of image 0.
    masked = int(mask[0].nonzero()[0])
    visible = int((mask[0] == 0).nonzero()[0])
    for idx, should_change in ((masked, False), (visible, True)):
        other = imgs.clone()
        r, c = divmod(idx, 8)
        other[0, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 3.0
        changed = not torch.allclose(m.predict(other, mask), pred, atol=1e-6)
        assert changed == should_change


def test_target_and_loss() -> None:
    m = make()
    imgs = torch.randn(2, 3, 32, 32, generator=gen(3))
    tgt = m.target(imgs)
    assert tgt.shape == (2, 64, 108)
    # Each patch holds 2 x 2 cells x 3 channels of unit-norm 9-bin histograms.
    per_cell = tgt.view(2, 64, 3, 9, 4).norm(dim=3)
    assert torch.allclose(per_cell, torch.ones_like(per_cell), atol=1e-5)
    out = m((imgs, None), gen(4))
    mask = m.mask(2, gen(4))
    with torch.no_grad():
        expect = masked_mse(m.predict(imgs, mask).float(), tgt, mask)
    assert torch.allclose(out.loss, expect)
    assert abs(float(out.logs["mask_ratio"]) - float(mask.mean())) < 1e-6


def test_validation_and_tiny_rule() -> None:
    with pytest.raises(ConfigError, match="mask_ratio"):
        resolve("maskfeat", "tiny", {"method": {"mask_ratio": 0.0}})
    with pytest.raises(ConfigError, match="min_aspect"):
        resolve("maskfeat", "tiny", {"method": {"min_aspect": 2.0}})
    with pytest.raises(ConfigError, match="cells_per_patch"):
        make(cells_per_patch=3)
    t = MaskFeat.tiny(dict(MaskFeat.defaults), TinyRule("vit_base"))
    assert t["min_block"] is None  # SlowFast's rule follows the grid: 26 // 5 = 5 of 64
    assert MaskFeat.tiny({**MaskFeat.defaults, "min_block": 16}, TinyRule("vit_base"))["min_block"] == 5  # by area
    paper = resolve("maskfeat", "paper")
    assert paper["optim"]["epochs"] == 1600 and paper["method"]["min_block"] is None
    tiny_model = make()
    assert (tiny_model.num_mask, tiny_model.min_block) == (26, 5)
    # SlowFast datasets/imagenet.py at 224 px / patch 16: round(196 * 0.4) = 78 masked, blocks of >= 78 // 5 = 15.
    paper_model = MaskFeat(paper)
    assert (paper_model.grid, paper_model.num_mask, paper_model.min_block) == (14, 78, 15)
    assert make(min_block=3).min_block == 3
    # SlowFast config: 256 images and lr 2e-4 (warm-up start, cosine end 1e-6) per shard; 2048 = 8 shards scales all.
    o, shards = paper["optim"], paper["optim"]["batch_size"] // 256
    assert shards == 8 and o["blr"] * o["batch_size"] / 256 == pytest.approx(2e-4 * shards)
    assert o["min_lr"] == pytest.approx(1e-6 * shards) and o["warmup_lr"] == pytest.approx(1e-6 * shards)
    assert "ASSUMED" in paper["source"] and "NUM_SHARDS 1" in paper["source"]


def test_overfits_fixed_batch() -> None:
    m = make()
    imgs = torch.randn(2, 3, 32, 32, generator=gen(1))
    # The best constant prediction over the masked patches: the bar a memorising model must clear.
    mask, tgt = m.mask(2, gen(7))[..., None], m.target(imgs)
    mean = (tgt * mask).sum((0, 1)) / mask.sum()
    baseline = float(((tgt - mean) ** 2 * mask).sum() / (mask.sum() * tgt.shape[-1]))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = m((imgs, None), gen(7)).loss  # the same block mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::30]
    assert losses[-1] < 0.5 * baseline, (losses[-1], baseline)


def test_slowfast_init() -> None:
    """SlowFast's MViT init: N(0, 0.02) weights, 0.02 Linear / LayerNorm biases, N(0, 0.02) trained positions; the
    final norm (the prediction head's LayerNorm) at (1, 0)."""
    m = make().requires_grad_(False)
    enc = m.encoder
    blk = enc.blocks[0]
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
        assert torch.all(lin.bias == 0.02)
        assert 0.01 < float(lin.weight.std()) < 0.03
    assert torch.all(blk.norm1.bias == 0.02) and torch.all(blk.norm1.weight == 1.0)
    assert torch.all(enc.norm.bias == 0.0) and torch.all(enc.norm.weight == 1.0)
    assert make().encoder.pos_embed.requires_grad and 0.01 < float(enc.pos_embed.std()) < 0.03
    assert float(enc.pos_embed[0, 1:, 0].abs().max()) < 0.1  # not a sin-cos table (values up to 1)
    assert torch.all(m.head.bias == 0.0)
    fixed = MaskFeat(resolve("maskfeat", "tiny", {"model": {"pos_embed": "sincos"}}))
    assert not fixed.encoder.pos_embed.requires_grad and float(fixed.encoder.pos_embed.abs().max()) > 0.5


def test_mask_block_shape_is_cost_free() -> None:
    """The blocks' minimum size and aspect shape which patches are masked, not how much work a step does (every
    patch is encoded): stored cost profiles stay valid when they change."""
    from repro.profile.projection import cost_key
    from repro.profile.tables import resolve_row

    base = cost_key(resolve_row("maskfeat", {}))
    assert cost_key(resolve_row("maskfeat", {"method.min_block": 16, "method.min_aspect": 0.5})) == base
    assert cost_key(resolve_row("maskfeat", {"method.hog_bins": 18})) != base
