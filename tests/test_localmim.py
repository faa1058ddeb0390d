"""LocalMIM (repro.methods.localmim): taps, rescale heads, per-scale targets and masks, gradient isolation, global
multi-scale and feature-fusion variants, validation, the tiny rule and a micro overfit (tiny chains:
test_chain_smoke.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from repro.config import ConfigError
from repro.methods.localmim import LocalMIM, default_taps, rescale_head, scale_mask, swin_batch_mask
from repro.models.mim import encode_visible
from repro.models.swin import forward_visible, visible_ids_from_units
from repro.resolve import resolve
from repro.scales import TinyRule


def make(**method: Any) -> LocalMIM:
    """vit_micro (64-d, 4 blocks), 32-px images, 4-px patches: an 8 x 8 grid; taps default to [0, 1, 2, 3]."""
    torch.manual_seed(0)
    cfg = resolve("localmim", "tiny", {"method": method})
    return LocalMIM(cfg)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_default_taps() -> None:
    assert default_taps(12) == [1, 3, 9, 11]  # the paper's layers 2, 4, 10, 12 of ViT-B
    assert default_taps(24) == [1, 3, 21, 23]  # ViT-L: 2, 4, 22, 24
    assert default_taps(4) == [0, 1, 2, 3]  # tiny vit_micro / vit_nano
    assert default_taps(6) == [1, 2, 4, 5]  # tiny vit_mini
    assert default_taps(12, 2) == [5, 11]
    with pytest.raises(ConfigError):
        default_taps(3, 4)


@pytest.mark.parametrize(("scale", "side"), [(4.0, 32), (2.0, 16), (1.0, 8), (0.5, 4)])
def test_rescale_head_shapes(scale: float, side: int) -> None:
    head = rescale_head(scale, 16, 27)
    out = head(torch.randn(2, 16, 8, 8))
    assert out.shape == (2, 27, side, side)


def test_structure_and_target_shapes() -> None:
    m = make()
    assert m.taps == [0, 1, 2, 3] and m.sources == [0, 1, 2, 3]
    assert len(m.decoders) == len(m.heads) == len(m.taps) == 4
    assert m.norms["3"] is m.encoder.norm  # the top tap's norm is the exported encoder norm
    assert all(m.norms[str(t)] is not m.encoder.norm for t in (0, 1, 2))
    targets = m.targets(images())
    # Grids 32, 16, 8, 4 (cells of 1, 2, 4, 8 px), 3 x 9 HOG values each.
    assert [tuple(t.shape) for t in targets] == [(2, 1024, 27), (2, 256, 27), (2, 64, 27), (2, 16, 27)]
    pix = make(target="pixel")
    assert [tuple(t.shape) for t in pix.targets(images())] == [
        (2, 1024, 3), (2, 256, 12), (2, 64, 48), (2, 16, 192)]
    out = pix((images(), None), gen())
    assert torch.isfinite(out.loss)


def test_scale_masks() -> None:
    grid = 4
    mask = torch.zeros(1, grid * grid)
    mask[0, [0, 1, 4, 10]] = 1.0  # patches (0,0), (0,1), (1,0), (2,2)
    fine = scale_mask(mask, grid, 2.0).view(8, 8)
    expect = mask.view(grid, grid).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(fine, expect)
    assert torch.equal(scale_mask(mask, grid, 1.0), mask)
    coarse = scale_mask(mask, grid, 0.5).view(2, 2)
    assert torch.allclose(coarse, torch.tensor([[0.75, 0.0], [0.0, 0.25]]))
    rand = (torch.rand(3, 64, generator=gen()) < 0.75).float()
    c = scale_mask(rand, 8, 0.5)
    assert ((c >= 0) & (c <= 1)).all() and torch.allclose(c.mean(1), rand.mean(1))


def _block_grads(m: LocalMIM) -> list[float]:
    out = []
    for blk in m.encoder.blocks:
        grads = [p.grad.abs().sum().item() for p in blk.parameters() if p.grad is not None]
        out.append(sum(grads))
    return out


@pytest.mark.parametrize("isolate", [False, True])
def test_grad_isolation_stops_gradients(isolate: bool) -> None:
    m = make(grad_isolation=isolate)
    parts = m.losses(images(), gen())
    parts[-1].backward()  # the top tap (block 3); the previous tap is block 2
    g = _block_grads(m)
    assert g[3] > 0
    if isolate:
        assert g[0] == g[1] == g[2] == 0.0
        assert m.encoder.patch_embed.proj.weight.grad is None
    else:
        assert min(g) > 0
    m.zero_grad(set_to_none=True)
    parts = m.losses(images(), gen())
    parts[1].backward()  # tap at block 1: with isolation only block 1 learns from it; block 0 only without
    g = _block_grads(m)
    assert g[1] > 0 and g[2] == g[3] == 0.0
    assert (g[0] == 0.0) == isolate


def test_global_multiscale_uses_only_the_top_hidden_state() -> None:
    m = make(global_multiscale=True)
    assert m.sources == [3, 3, 3, 3] and list(m.norms) == ["3"]
    seen: list[torch.Tensor] = []
    hooks = [d.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach())) for d in m.decoders]
    imgs = images()
    parts = m.losses(imgs, gen())
    for h in hooks:
        h.remove()
    _, _, _, hidden = encode_visible(m.encoder, imgs, 0.75, gen())
    top = m.encoder.norm(hidden[-1]).detach()
    assert len(seen) == 4 and all(torch.allclose(s, top) for s in seen)
    assert not any(blk._forward_pre_hooks for blk in make(global_multiscale=True, grad_isolation=True).encoder.blocks)
    # The finest-scale loss now trains the top block (in the local model it stops at block 0).
    parts[0].backward()
    assert _block_grads(m)[3] > 0
    local = make()
    local.losses(imgs, gen())[0].backward()
    assert _block_grads(local)[1:] == [0.0, 0.0, 0.0]


def test_feature_fusion() -> None:
    with pytest.raises(ConfigError, match="scales"):
        make(feature_fusion=True)
    m = make(feature_fusion=True, scales=[1])
    assert len(m.decoders) == 1 and m.taps == [0, 1, 2, 3] and m.sources == [3]
    assert sorted(m.fuse) == ["0", "1", "2"]
    out = m((images(), None), gen())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fuse.parameters())
    assert m.norms["0"].weight.grad.abs().sum() > 0


def test_loss_is_weighted_sum_and_logged_per_scale() -> None:
    m = make(loss_weights=[1.0, 2.0, 0.0, 0.5])
    parts = m.losses(images(), gen(3))
    out = m((images(), None), gen(3))
    expect = parts[0] + 2 * parts[1] + 0.5 * parts[3]
    assert torch.allclose(out.loss, expect)
    assert set(out.logs) == {"loss", "loss_x4", "loss_x2", "loss_x1", "loss_x0.5"}
    assert torch.allclose(out.logs["loss_x2"], parts[1].detach())
    m = make(scales=[1, 1, 1, 1])  # as the Swin recipes: one scale at every tap -> one log key per tap, none lost
    parts = m.losses(images(), gen(3))
    out = m((images(), None), gen(3))
    assert set(out.logs) == {"loss", "loss_t0", "loss_t1", "loss_t2", "loss_t3"}
    assert torch.allclose(out.logs["loss_t2"], parts[2].detach())


@pytest.mark.parametrize(("override", "match"), [
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"scales": [4, 3]}, "scales"),
    ({"scales": []}, "scales"),
    ({"taps": [0, 1, 2]}, "one entry per scale"),
    ({"taps": [3, 2, 1, 0]}, "increasing"),
    ({"loss_weights": [1, 1]}, "loss_weights"),
    ({"target": "dino"}, "target"),
    ({"global_multiscale": True, "feature_fusion": True}, "exclusive"),
    ({"decoder_dim": 18, "decoder_heads": 2}, "divisible by 4"),
])
def test_validation(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve("localmim", "tiny", {"method": override})


def test_taps_beyond_depth_rejected() -> None:
    with pytest.raises(ConfigError, match="taps"):
        make(taps=[1, 3, 9, 11])  # the ViT-B layers do not exist in the 4-block tiny encoder


def test_unused_blocks_flagged_for_ddp() -> None:
    assert make().find_unused_parameters is False
    m = make(taps=[0, 1, 1, 2])  # block 3 and the encoder norm are never reached by a loss
    assert m.find_unused_parameters is True
    m((images(), None), gen()).loss.backward()
    assert all(p.grad is None for p in m.encoder.blocks[3].parameters())
    assert m.encoder.norm.weight.grad is None


def test_tiny_rule() -> None:
    rule = TinyRule("vit_base")
    p = dict(LocalMIM.defaults)
    t = LocalMIM.tiny(p, rule)
    assert t["taps"] is None and t["decoder_dim"] == 16 and t["decoder_depth"] == 1 and t["decoder_heads"] == 1
    assert LocalMIM.tiny({**p, "taps": [2, 5, 8, 11]}, rule)["taps"] == [0, 1, 2, 3]  # uniform 3/6/9/12
    paper = resolve("localmim", "paper")
    assert paper["method"]["taps"] is None and paper["optim"]["batch_size"] == 2048


def test_overfits_fixed_batch() -> None:
    m = make(decoder_dim=64, decoder_heads=2)
    imgs = images(2, seed=1)
    # The best constant prediction (per-scale mean target over the masked cells) as the bar to beat: a falling loss
    # alone could just be the randomly initialised heads learning the mean.
    _, mask, _, _ = encode_visible(m.encoder, imgs, 0.75, gen(7))
    baseline = 0.0
    for s, tgt in zip(m.scales, m.targets(imgs)):
        w = scale_mask(mask, 8, s)[..., None]
        mean = (tgt * w).sum((0, 1)) / w.sum()
        baseline += float(((tgt - mean) ** 2 * w).sum() / (w.sum() * tgt.shape[-1]))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = m((imgs, None), gen(7)).loss  # same seed every step: the same mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::50]
    assert losses[-1] < 0.7 * baseline, (losses[-1], baseline)


# ---- Swin ------------------------------------------------------------------------------------------------------------

def make_swin(**method: Any) -> LocalMIM:
    """swin_micro (32-d, stages of 2 blocks: ends [1, 3, 5, 7]), 32 px, 1-px patches, window 4, 8-px mask units."""
    torch.manual_seed(0)
    return LocalMIM(resolve("localmim_swin_base", "tiny", {"method": method}))


def test_swin_batch_mask_official_count() -> None:
    for units, k in ((49, 37), (16, 13), (36, 28)):  # int(L * 0.75) + 1, as randperm(L) <= int(L * 0.75)
        m = swin_batch_mask(units, 0.75, gen(units))
        assert m.shape == (units,) and int(m.sum()) == k


def test_swin_paper_geometry() -> None:
    torch.manual_seed(0)
    m = LocalMIM(resolve("localmim_swin_base", "paper"))
    assert m.taps == [1, 3, 21, 23]  # the paper's layers 2, 4, 22, 24
    assert [m.tap_grid[t] for t in m.taps] == [28, 14, 7, 7] and m.cells == [8, 16, 32, 32]
    assert [m.tap_dim[t] for t in m.taps] == [256, 512, 1024, 1024]
    assert [d.embed.out_features for d in m.decoders] == [64, 128, 128, 128]  # official: first decoder d / 2
    assert all(d.blocks[0].attn.num_heads == 4 for d in m.decoders) and m.ugrid == 7
    assert m.hog is not None and m.hog.nbins == 18 and m.norms["23"] is m.encoder.norm
    # Official Swin/run_pretrain.py: no weight decay on the 24 relative position tables and the 4 decoder mask tokens.
    undecayed = no_decay_matrices(m)
    assert len(undecayed) == 28 and sum("relative_position_bias_table" in n for n in undecayed) == 24
    assert sum(n.endswith("mask_token") for n in undecayed) == 4


def no_decay_matrices(m: LocalMIM) -> list[str]:
    """Names of the parameters of >= 2 dimensions in the optimizer's weight-decay-free group."""
    groups = m.param_groups({"weight_decay": 0.05})
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in groups[1]["params"]}
    assert all(p.ndim >= 2 for p in groups[1]["params"])
    assert len(decayed) + len(groups[0]["params"]) == sum(p.requires_grad for p in m.parameters())
    return [names[id(p)] for p in groups[0]["params"] if p.ndim >= 2]


def test_hog_bias_is_one_independent_draw_per_layer() -> None:
    """Official: one HOG Conv2d per target scale, each with its own default-initialised bias (2 values, U(-1/3, 1/3),
    shared by R, G, B)."""
    swin = make_swin()  # the Swin recipe has hog_bias: true
    assert swin.params["hog_bias"] and len(swin.hog.layers) == 4
    offsets = torch.stack([layer.offset for layer in swin.hog.layers])  # (4, 6): (gx, gy) per RGB channel
    assert torch.equal(offsets[:, :2].repeat(1, 3), offsets)
    assert len({tuple(o) for o in offsets[:, :2].tolist()}) == 4 and offsets.abs().max() < 1 / 3
    imgs = images()
    for layer, cell, target in zip(swin.hog.layers, swin.cells, swin.targets(imgs)):
        torch.testing.assert_close(target, layer.multi_cell(imgs, [cell])[0].flatten(2).transpose(1, 2))
    plain = make()  # no bias: one shared gradient pass
    assert not plain.params["hog_bias"] and len(plain.hog.layers) == 1
    assert torch.count_nonzero(plain.hog.layers[0].offset) == 0


def test_weight_decay_groups() -> None:
    swin = make_swin()
    assert sorted(no_decay_matrices(swin)) == sorted(
        n for n, p in swin.named_parameters() if "relative_position_bias_table" in n or n.endswith("mask_token"))
    assert len(no_decay_matrices(swin)) == 8 + 4  # swin_micro: 8 blocks, 4 decoders
    assert no_decay_matrices(make()) == []  # official ViT/run_pretrain.py: decay on every matrix, mask tokens too


def test_swin_taps_and_targets() -> None:
    m = make_swin()
    assert m.taps == [1, 3, 5, 7] and m.cells == [2, 4, 8, 8]
    imgs = images()
    assert [tuple(t.shape) for t in m.targets(imgs)] == [(2, 256, 54), (2, 64, 54), (2, 16, 54), (2, 16, 54)]
    # The tapped levels are the Swin's own visible-only forward (repro.models.swin): merges after stages 0-2, top.
    mask = swin_batch_mask(16, 0.75, gen())
    ids = visible_ids_from_units((mask == 0).reshape(4, 4), 8)
    levels = m._swin_levels(imgs, ids)
    m.official_coords = False  # method.merge_coords=own: a Swin on the visible tokens at their own coordinates
    own = m._swin_levels(imgs, ids)
    ref = forward_visible(m.encoder, imgs, ids)
    for t, want in zip([1, 3, 5, 7], [*ref.merged, ref.stages[-1]]):
        assert levels[t].grid == own[t].grid == want.grid
        assert torch.equal(levels[t].coords, want.coords) and torch.equal(own[t].coords, want.coords)
        assert torch.allclose(own[t].tokens, want.tokens, atol=1e-5)
    # merge_coords=official (default): stage 0 alike; stage 1's windows use the official labels, so tap 3 on differ.
    assert torch.allclose(levels[1].tokens, own[1].tokens, atol=1e-6)
    assert not torch.allclose(levels[3].tokens, own[3].tokens, atol=1e-3)
    assert [lv.tokens.shape[1] for lv in levels.values()] == [3 * 16, 3 * 4, 3, 3]  # 3 of 16 units visible
    pix = make_swin(target="pixel")
    assert [tuple(t.shape) for t in pix.targets(imgs)] == [(2, 256, 12), (2, 64, 48), (2, 16, 192), (2, 16, 192)]
    parts = pix.losses(imgs, gen())
    assert len(parts) == 4 and all(torch.isfinite(p) for p in parts)


@pytest.mark.parametrize(("scales", "taps"), [([1], [7]), ([1, 1], [5, 7]), ([1, 1, 1], [3, 5, 7])])
def test_swin_locations(scales: list[float], taps: list[int]) -> None:
    # Table 4d: [24], [22, 24], [4, 22, 24] of Swin-B = the last 1, 2, 3 stage ends.
    m = make_swin(scales=scales)
    assert m.taps == taps and len(m.decoders) == len(taps)
    assert LocalMIM.tiny({**m.params, "taps": [3, 21, 23]}, TinyRule("swin_base"))["taps"] == [3, 5, 7]
    assert LocalMIM.tiny({**m.params, "taps": [1, 3, 21, 23]}, TinyRule("swin_base"))["taps"] == [1, 3, 5, 7]


def test_swin_taps_must_be_stage_ends() -> None:
    with pytest.raises(ConfigError, match="stage ends"):
        make_swin(taps=[0, 3, 5, 7])


def test_swin_grad_isolation() -> None:
    for isolate in (False, True):
        m = make_swin(grad_isolation=isolate)
        m.losses(images(), gen())[1].backward()  # tap after stage 1 (block 3, merged into stage 2)
        stage0 = sum(p.grad.abs().sum().item() for p in m.encoder.layers[0].parameters() if p.grad is not None)
        stage1 = sum(p.grad.abs().sum().item() for p in m.encoder.layers[1].parameters() if p.grad is not None)
        assert stage1 > 0
        assert (stage0 == 0.0) == isolate


def test_swin_global_multiscale_and_fusion() -> None:
    g = make_swin(global_multiscale=True, scales=[4, 2, 1, 1])  # Table 6 "global multi-scale": 28, 14, 7, 7 at the top
    assert g.sources == [7, 7, 7, 7] and g.cells == [2, 4, 8, 8] and list(g.norms) == ["7"]
    assert torch.isfinite(g((images(), None), gen()).loss)
    f = make_swin(feature_fusion=True, scales=[1])
    assert f.taps == [1, 3, 5, 7] and f.sources == [7] and sorted(f.fuse) == ["1", "3", "5"]
    assert f.fuse["1"].in_features == 64 * 16  # stage-0 output (16 x 16, 64-d): a 4 x 4 block per top cell
    f((images(), None), gen()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.fuse.parameters())


def test_swin_decoder_sizes() -> None:
    # Table 4c: 512D-16H / 256D-8H / 128D-4H are the decoder_dim / decoder_heads knobs.
    paper = resolve("localmim_swin_base", "paper", {"method": {"decoder_dim": 512, "decoder_heads": 16}})
    assert paper["method"]["decoder_dim"] == 512
    with pytest.raises(ConfigError, match="decoder"):
        make_swin(decoder_dim=24, decoder_heads=8)


@pytest.mark.slow
def test_swin_overfits_fixed_batch() -> None:
    m = make_swin()
    imgs = images(2, seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(120):
        loss = m((imgs, None), gen(7)).loss  # same seed every step: the same mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::30]


def test_gather_rows_equals_indexing_forward_and_backward() -> None:
    """gather_rows (backward by the inverse map) = x[:, index] (backward by index_put's scatter), padding slots that
    repeat row 0 included, up to float rounding."""
    from repro.models.swin import gather_rows, inverse_index, make_grouping

    g = gen(5)
    coords = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    coords = coords[torch.randperm(64, generator=g)[:40].sort().values]
    grp = make_grouping(coords, 4, 2, mode="group")
    assert grp.pad.numel() > 0  # the test needs padding slots
    x = torch.randn(2, coords.shape[0], 6, generator=g, requires_grad=True)
    w = torch.randn(2, grp.index.numel(), 6, generator=g)
    ref = x[:, grp.index]
    got = gather_rows(x, grp.index, grp.restore, grp.pad)
    assert torch.equal(got, ref)
    (gr,) = torch.autograd.grad((ref * w).sum(), x)
    (gg,) = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(gg, gr, rtol=1e-6, atol=1e-6)
    # the way back: slots -> tokens (padding slots get no gradient)
    y = torch.randn(2, grp.index.numel(), 6, generator=g, requires_grad=True)
    v = torch.randn(2, coords.shape[0], 6, generator=g)
    (br,) = torch.autograd.grad((y[:, grp.restore] * v).sum(), y)
    (bg,) = torch.autograd.grad((gather_rows(y, grp.restore, grp.slot_token) * v).sum(), y)
    assert torch.equal(bg, br)
    perm = torch.randperm(10, generator=g)
    assert torch.equal(inverse_index(perm[:6], 10)[perm[:6]], torch.arange(6))
    assert (inverse_index(perm[:6], 10)[perm[6:]] == 6).all()


def _indexing_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous operations: plain advanced indexing for the token gathers, per-bin average pooling for HOG."""
    import torch.nn.functional as F

    import repro.methods.localmim as lm
    import repro.models.hog as hog_module
    import repro.models.swin as swin_module

    def plain(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pad: Any = None) -> torch.Tensor:
        return x[:, index]

    def pooled(mag: torch.Tensor, bins: torch.Tensor, nbins: int, cell: int) -> torch.Tensor:
        return torch.stack([F.avg_pool2d(mag * (bins == b), cell) for b in range(nbins)], dim=2)

    monkeypatch.setattr(swin_module, "gather_rows", plain)
    monkeypatch.setattr(lm, "gather_rows", plain)
    monkeypatch.setattr(hog_module, "cell_histograms", pooled)


@pytest.mark.parametrize("recipe", ["localmim", "localmim_swin_base"])
def test_one_step_loss_unchanged_by_the_fast_ops(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 CPU: the training step's loss is identical with the gather/histogram rewrites and the previous indexing /
    pooling, the gradients equal up to float rounding."""
    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        m = LocalMIM(resolve(recipe, "tiny"))
        out = m((images(4, 1),), gen(2))
        out.loss.backward()
        return out.loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    loss, grads = step()
    _indexing_reference(monkeypatch)
    ref_loss, ref_grads = step()
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
