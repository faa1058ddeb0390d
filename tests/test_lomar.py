"""LoMaR (repro.methods.lomar): window geometry and masks, resolution-independent encoder cost, the iRPE bucket function
and attention, masked-only loss, the encoder-decoder and sin-cos variants, export into the fine-tuning ViT, validation,
the tiny rule and a micro overfit (its tiny chain: test_chain_smoke.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from repro.config import ConfigError
from repro.evals.features import load_encoder
from repro.methods.lomar import LoMaR, window_assignment
from repro.models.irpe import IRPEAttention, irpe_buckets_per_axis, irpe_piecewise, irpe_product_bucket
from repro.models.mim import patchify
from repro.models.relpos import grid_coords
from repro.models.vit import create_vit
from repro.resolve import resolve
from repro.scales import TinyRule

MICRO: dict[str, Any] = {"arch": "vit_micro", "patch_size": 4, "rel_pos": "irpe", "pos_embed": "none"}


def make(img: int = 32, model: dict[str, Any] | None = None, **method: Any) -> LoMaR:
    """vit_micro (64-d, 4 blocks); 32-px images with 4-px patches give an 8 x 8 grid."""
    torch.manual_seed(0)
    params = {**LoMaR.defaults, "window_size": 4, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **method}
    LoMaR.validate(params)
    return LoMaR({"model": {**MICRO, **(model or {})}, "data": {"img_size": img}, "method": params})


def images(n: int = 4, img: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ windows and masks


def test_windows_are_squares_inside_the_grid_and_shared_by_default() -> None:
    m = make(num_windows=4, window_pairing="all")
    coords = m.sample_windows(5, gen())
    assert coords.shape == (5, 4, 16, 2)
    assert coords.min() >= 0 and coords.max() <= 7
    for img in range(5):
        for w in range(4):
            c = coords[img, w]
            top, left = c[0].tolist()
            expected = grid_coords(4, 4) + torch.tensor([top, left])  # K x K square in raster order
            assert torch.equal(c, expected)
    assert all(torch.equal(coords[0], coords[i]) for i in range(5))  # same windows for the whole batch
    tops, lefts = coords[0, :, 0, 0], coords[0, :, 0, 1]
    assert len(set(tops.tolist())) == 4 and len(set(lefts.tolist())) == 4  # one permutation each, as randperm


def test_per_image_windows_differ_across_images() -> None:
    m = make(num_windows=2, window_placement="per_image", window_pairing="all")
    coords = m.sample_windows(16, gen(1))
    firsts = {tuple(coords[i, :, 0].flatten().tolist()) for i in range(16)}
    assert len(firsts) > 1
    assert coords.min() >= 0 and coords.max() <= 7


def official_table(n: int, w: int) -> list[list[int]]:
    """The official forward's pairing, by reasoning from its code: the patch features are repeated window-major
    (``x.unsqueeze(0).repeat(W, 1, 1, 1).view(N*W, ...)``: sequence r holds image r % N) and the window patch indices
    image-major (``idx.unsqueeze(0).expand(N, W, T).view(N*W, T)``: sequence r holds window r % W). Per image, the
    windows of its sequences in increasing r."""
    table: list[list[int]] = [[] for _ in range(n)]
    for r in range(n * w):
        table[r % n].append(r % w)
    return table


def test_official_window_pairing_table() -> None:
    # Written out for N = 6, W = 4: gcd 2, so image i sees the two windows of i's parity, each twice.
    assert window_assignment(6, 4, 6).tolist() == [[0, 2, 0, 2], [1, 3, 1, 3], [2, 0, 2, 0], [3, 1, 3, 1],
                                                   [0, 2, 0, 2], [1, 3, 1, 3]]
    for n, w in ((6, 4), (4, 4), (5, 3), (8, 6), (3, 9), (256, 4), (256, 9)):
        assert window_assignment(n, w, n).tolist() == official_table(n, w), (n, w)
    # The README's per-GPU batch 256: at 224 (4 windows) one window four ways, at 448 (9) all nine.
    assert all(len(set(r)) == 1 for r in window_assignment(256, 4, 256).tolist())
    assert all(sorted(r) == list(range(9)) for r in window_assignment(256, 9, 256).tolist())
    # The pairing comes from the official batch, not this run's: a device batch of 10 pairs like the official 256.
    assert window_assignment(10, 4, 256).tolist() == official_table(256, 4)[:10]
    assert window_assignment(3, 4, None).tolist() == [[0, 1, 2, 3]] * 3  # the paper's reading


def test_forward_pairs_images_with_windows_officially_by_default() -> None:
    assert LoMaR.defaults["window_pairing"] == "official" and LoMaR.defaults["official_per_gpu_batch"] == 256
    assert resolve("lomar", "paper")["method"]["official_per_gpu_batch"] == 256
    m = make(num_windows=4, official_per_gpu_batch=6)
    drawn = make(num_windows=4, window_pairing="all").sample_windows(6, gen(3))[0]  # the 4 windows drawn
    coords = m.sample_windows(6, gen(3))  # the same draws, paired
    for i, wins in enumerate(official_table(6, 4)):
        for k, w in enumerate(wins):
            assert torch.equal(coords[i, k], drawn[w])
    one = make(num_windows=4).sample_windows(5, gen(3))  # official batch 256: one window per image
    assert all(torch.equal(one[i, 0], one[i, k]) for i in range(5) for k in range(4))
    assert not torch.equal(one[0, 0], one[1, 0])


def test_pairing_keeps_the_profile_cost_key() -> None:
    from repro.profile.bench import cost_key

    cfg = resolve("lomar", "paper")
    assert cost_key(cfg) == cost_key(resolve("lomar", "paper", {"method": {"window_pairing": "all"}}))
    assert cost_key(cfg) != cost_key(resolve("lomar", "paper", {"method": {"num_windows": 6}}))


def test_more_windows_than_offsets_cycle_the_permutation() -> None:
    m = make(window_size=6, num_windows=5, window_pairing="all")  # only 3 offsets per axis on an 8 x 8 grid
    coords = m.sample_windows(2, gen())
    tops = coords[0, :, 0, 0].tolist()
    assert coords.max() <= 7 and sorted(tops[:3]) == [0, 1, 2]


@pytest.mark.parametrize(("k", "ratio"), [(4, 0.8), (7, 0.8), (5, 0.6)])
def test_mask_count_per_window(k: int, ratio: float) -> None:
    m = make(img=64, window_size=k, mask_ratio=ratio)
    keep, restore, mask = m.window_masking(12, gen())
    assert mask.shape == (12, k * k)
    assert (mask.sum(1) == int(k * k * ratio)).all()  # 39 of 49 at the paper's 7 x 7 / 0.8
    assert keep.shape == (12, k * k - int(k * k * ratio))
    assert (torch.gather(mask, 1, keep) == 0).all()
    assert len({tuple(r) for r in mask.tolist()}) > 1  # per-window masks


def test_window_embedding_matches_full_image_patch_embedding() -> None:
    m = make()
    x = images(2)
    full = m.encoder.patch_embed(x)  # (2, 64, D), conv on the whole image
    ours = m.embed_windows(patchify(x, 4))
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- encoder cost and the loss


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_encoder_tokens_do_not_depend_on_resolution(arch: str) -> None:
    seen: list[tuple[int, ...]] = []
    for img in (64, 128):  # patch 8: 8 x 8 and 16 x 16 grids
        m = make(img=img, model={"patch_size": 8}, num_windows=3, arch=arch)
        m.encoder.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
        m((images(2, img), None), gen())
    keep = 16 - int(16 * 0.8)
    tokens = 16 + 1 if arch == "encoder" else keep + 1
    assert seen == [(2 * 3, tokens, 64)] * 2


def test_loss_only_on_masked_patches() -> None:
    m = make()
    captured: dict[str, torch.Tensor] = {}
    orig = m.window_masking

    def spy(n: int, g: torch.Generator) -> Any:
        out = orig(n, g)
        captured["mask"] = out[2]
        return out

    m.window_masking = spy  # type: ignore[method-assign]

    def keep_pred(mod: Any, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["pred"] = out

    m.pred.register_forward_hook(keep_pred)
    out = m((images(3), None), gen())
    out.loss.backward()
    grad, mask = captured["pred"].grad, captured["mask"].bool()
    assert grad.shape[:2] == mask.shape == (3 * 4, 16)
    assert torch.count_nonzero(grad[~mask]) == 0
    assert (grad[mask].abs().sum(-1) > 0).all()


def test_loss_target_is_the_window_pixels() -> None:
    """With the head forced to predict the true normalised pixels of each window, the loss is ~0."""
    m = make(norm_pix_loss=False)
    x = images(2)
    captured: dict[str, torch.Tensor] = {}
    orig = m.sample_windows

    def spy(n: int, g: torch.Generator) -> torch.Tensor:
        captured["coords"] = orig(n, g)
        return captured["coords"]

    m.sample_windows = spy  # type: ignore[method-assign]

    def oracle(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        c = captured["coords"].reshape(-1, 16, 2)
        flat = c[..., 0] * 8 + c[..., 1]
        patches = patchify(x, 4).repeat_interleave(4, dim=0)  # image n's windows are rows n*w ... n*w + w - 1
        return torch.gather(patches, 1, flat[..., None].expand(-1, -1, 48)) + 0 * out

    m.pred.register_forward_hook(oracle)
    assert m((x, None), gen()).loss.item() < 1e-10


# ---------------------------------------------------------------------------------------------------------- iRPE


def test_irpe_piecewise_function() -> None:
    x = torch.arange(-40, 41)
    g = irpe_piecewise(x)
    assert g[40] == 0  # offset 0 -> bucket 0
    assert torch.equal(g, -g.flip(0))  # odd
    assert (g[1:] >= g[:-1]).all()  # monotone
    assert g.abs().max() == 3 and g[-1] == 3  # capped at int(beta) = int(3.8)
    assert irpe_piecewise(torch.tensor([1])).item() == 1  # exact for |x| <= alpha = 1.9
    # beyond alpha: round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)) with gamma = 15.2
    for v in (2, 3, 4, 6, 9):
        ref = min(3, round(1.9 + math.log(v / 1.9) / math.log(8) * 1.9))
        assert irpe_piecewise(torch.tensor([v])).item() == ref
    rel = torch.tensor([[0, 0], [1, -1], [-13, 13]])
    s = irpe_buckets_per_axis()
    assert s == 7
    assert irpe_product_bucket(rel).tolist() == [3 * 7 + 3, 4 * 7 + 2, 0 * 7 + 6]


def irpe_layer(seed: int = 0) -> IRPEAttention:
    torch.manual_seed(seed)
    att = IRPEAttention(32, 2, 4)
    with torch.no_grad():
        att.rpe_k.normal_(std=1.0)  # iRPE starts at zero; random here so positions show
    return att


def test_irpe_attention_uses_positions_and_cls_has_its_own_bucket() -> None:
    att = irpe_layer()
    x = torch.randn(2, 1 + 16, 32)
    coords = grid_coords(4, 4)[None].expand(2, -1, -1)
    out = att(x, coords=coords)
    perm = torch.randperm(16, generator=gen(3))
    assert not torch.allclose(att(x, coords=coords[:, perm]), out, atol=1e-4)  # position matters
    # relative: a translated window gives the same output
    torch.testing.assert_close(att(x, coords=coords + 5), out)
    # Bias terms: contextual q . r_bucket; the cls row and column use one extra bucket, whatever the coordinates.
    q = torch.randn(2, 2, 17, 16)
    bias = att.position_term(q, 17, coords[:, perm])
    r_cls = att.rpe_k[-1]
    torch.testing.assert_close(bias[:, :, :, 0], q @ r_cls)
    torch.testing.assert_close(bias[:, :, 0, 1:], (q[:, :, 0] @ r_cls)[..., None].expand(2, 2, 16))
    c = coords[0, perm]
    i, j = 5, 11
    b = irpe_product_bucket(c[i] - c[j])
    torch.testing.assert_close(bias[:, :, 1 + i, 1 + j], q[:, :, 1 + i] @ att.rpe_k[b])
    with torch.no_grad():
        att.rpe_k[-1].zero_()
    # zero table row -> zero cls bias
    assert torch.count_nonzero(att.position_term(q, 17, coords[:, perm])[:, :, 0]) == 0
    assert not hasattr(att, "rel_table")


def test_irpe_without_coords_uses_the_full_grid() -> None:
    att = irpe_layer()
    x = torch.randn(1, 1 + 16, 32)
    ref = att(x, coords=grid_coords(4, 4)[None])
    torch.testing.assert_close(att(x), ref)


def test_create_vit_with_irpe_forward_on_full_image() -> None:
    vit = create_vit({**MICRO, "rel_pos": "irpe"}, 32, num_classes=5, global_pool="avg")
    assert all(isinstance(b.attn, IRPEAttention) for b in vit.blocks)
    assert vit.pos_embed is None
    for b in vit.blocks:
        with torch.no_grad():
            b.attn.rpe_k.normal_()
    x = images(2)
    logits = vit(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(vit.forward_head(vit.forward_features(x)), logits)  # no coords: full grid assumed
    logits.sum().backward()
    assert vit.blocks[0].attn.rpe_k.grad is not None


# ------------------------------------------------------------------------------------------------ variants, export


def test_sincos_position_adds_the_absolute_table() -> None:
    m = make(position="sincos", model={"rel_pos": "none", "pos_embed": "sincos"})
    assert m.encoder.pos_embed is not None and not m.encoder.pos_embed.requires_grad
    seen: list[torch.Tensor] = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m((images(2), None), gen())
    with torch.no_grad():
        m.encoder.pos_embed.zero_()
    m((images(2), None), gen())
    assert not torch.allclose(seen[0], seen[1])


def test_export_loads_into_the_finetuning_vit(tmp_path: Path) -> None:
    m = make()
    for p in m.parameters():
        p.data.normal_(std=0.05)
    state = m.export()
    assert not any(k.startswith(("pred", "mask_token", "decoder")) for k in state)
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    ft = create_vit(MICRO, 32, num_classes=10, global_pool="avg")
    res = load_encoder(ft, str(path))
    assert sorted(res["missing"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    # The all-zero table (unused without one) and the final norm (avg pooling uses fc_norm instead, as in MAE).
    assert sorted(res["unexpected"]) == ["norm.bias", "norm.weight", "pos_embed"]
    torch.testing.assert_close(ft.blocks[1].attn.rpe_k, m.encoder.blocks[1].attn.rpe_k)
    # An evaluation ViT with a fixed sin-cos table gets the exported all-zero table: the same features.
    plain = create_vit(MICRO, 32)
    knn = create_vit({**MICRO, "pos_embed": "sincos"}, 32)
    load_encoder(plain, str(path))
    load_encoder(knn, str(path))
    x = images(2)
    torch.testing.assert_close(knn.forward_features(x), plain.forward_features(x))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="window_size"):
        make(window_size=9)  # 8 x 8 grid
    with pytest.raises(ConfigError, match="rel_pos=irpe"):
        make(model={"rel_pos": "none"})
    with pytest.raises(ConfigError, match="pos_embed"):
        make(position="sincos")
    with pytest.raises(ConfigError, match="mask_ratio"):
        LoMaR.validate({**LoMaR.defaults, "mask_ratio": 1.0})
    with pytest.raises(ConfigError, match="masks 0"):
        LoMaR.validate({**LoMaR.defaults, "window_size": 2, "mask_ratio": 0.2})
    with pytest.raises(ConfigError, match="window_placement"):
        LoMaR.validate({**LoMaR.defaults, "window_placement": "random"})
    with pytest.raises(ConfigError, match="window_pairing"):
        LoMaR.validate({**LoMaR.defaults, "window_pairing": "random"})
    with pytest.raises(ConfigError, match="official_per_gpu_batch"):
        LoMaR.validate({**LoMaR.defaults, "official_per_gpu_batch": 0})


def test_tiny_rule_scales_the_window_with_the_grid() -> None:
    rule = TinyRule("vit_base")
    got = {k: LoMaR.tiny({**LoMaR.defaults, "window_size": k}, rule)["window_size"] for k in (5, 7, 9, 11, 14)}
    assert got == {5: 3, 7: 4, 9: 5, 11: 6, 14: 8}
    cfg = resolve("lomar", "tiny")
    assert cfg["method"]["window_size"] == 4 and cfg["data"]["img_size"] == 32 and cfg["model"]["patch_size"] == 4
    paper = resolve("lomar", "paper")
    assert paper["method"]["window_size"] == 7 and int(49 * paper["method"]["mask_ratio"]) == 39
    assert resolve("lomar_448", "paper")["method"]["num_windows"] == 9
    assert resolve("lomar_encdec", "tiny")["method"]["decoder_dim"] == rule.dim(512)


# ------------------------------------------------------------------------------------------------ learning, chain


def test_micro_lomar_overfits_one_batch() -> None:
    m = make()
    x = images(8, seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        out = m((x, None), gen(7))  # the same windows and masks every step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 3, losses[::25]
    assert losses[-1] < 0.5, losses[::25]  # well below the ~0.9 plateau of predicting each window's mean
