"""ViT backbone: the fixed 2-D sin-cos table, timm interoperability of exported encoders, relative positions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch

from repro.models.relpos import attention, grid_coords
from repro.models.vit import (
    create_vit,
    encoder_state_dict,
    run_blocks,
    set_fused_attn,
    sincos_2d,
    timm_kwargs,
    timm_name,
)

MICRO: dict[str, Any] = {"arch": "vit_micro", "patch_size": 4}
BASE: dict[str, Any] = {"arch": "vit_base", "patch_size": 16}


def mae_sincos_numpy(dim: int, gh: int, gw: int) -> np.ndarray:
    """Independent reference of MAE's get_2d_sincos_pos_embed (with a zero cls row first), written per element."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    out = np.zeros((gh * gw + 1, dim))
    for r in range(gh):
        for c in range(gw):
            row = 1 + r * gw + c
            out[row, 0 * quarter : 1 * quarter] = np.sin(c * omega)  # x (column): sin, cos
            out[row, 1 * quarter : 2 * quarter] = np.cos(c * omega)
            out[row, 2 * quarter : 3 * quarter] = np.sin(r * omega)  # y (row): sin, cos
            out[row, 3 * quarter : 4 * quarter] = np.cos(r * omega)
    return out


@pytest.mark.parametrize(("dim", "gh", "gw"), [(16, 3, 5), (64, 8, 8), (768, 14, 14)])
def test_sincos_2d_matches_mae_formula(dim: int, gh: int, gw: int) -> None:
    ours = sincos_2d(dim, gh, gw, cls_token=True)
    ref = mae_sincos_numpy(dim, gh, gw)
    assert ours.shape == (gh * gw + 1, dim) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    assert torch.count_nonzero(ours[0]) == 0
    no_cls = sincos_2d(dim, gh, gw, cls_token=False)
    assert torch.equal(no_cls, ours[1:])


def test_sincos_2d_rejects_bad_dim() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(18, 2, 2)


def test_create_vit_fixed_sincos_pos_embed() -> None:
    vit = create_vit(MICRO, 32)
    assert vit.pos_embed.requires_grad is False
    expected = sincos_2d(64, 8, 8, cls_token=True)[None]
    assert torch.equal(vit.pos_embed.detach(), expected)
    learned = create_vit({**MICRO, "pos_embed": "learned"}, 32)
    assert learned.pos_embed.requires_grad is True
    assert torch.equal(learned.pos_embed.detach(), expected)  # learned tables start from the sin-cos table


def _timm_load(cfg: dict[str, Any], img: int, **kw: Any) -> tuple[Any, Any]:
    enc = create_vit(cfg, img)
    state = encoder_state_dict(enc)
    assert not any(k.startswith(("head.", "fc_norm.")) for k in state)
    model = timm.create_model(timm_name(cfg["arch"], cfg["patch_size"]), pretrained=False,
                              **timm_kwargs(cfg, img, **kw))
    return model, state


@pytest.mark.parametrize(("cfg", "img"), [(MICRO, 32), (BASE, 224)], ids=["micro", "vit_base_paper"])
def test_encoder_loads_into_timm_avg_pool_classifier(cfg: dict[str, Any], img: int) -> None:
    model, state = _timm_load(cfg, img, num_classes=10, global_pool="avg")
    res = model.load_state_dict(state, strict=False)
    assert res.missing_keys, "the new classifier must be missing"
    assert all(k.startswith(("head.", "fc_norm.")) for k in res.missing_keys), res.missing_keys
    assert all(k.startswith("norm.") for k in res.unexpected_keys), res.unexpected_keys
    # Every loaded tensor really is the encoder's.
    own = model.state_dict()
    for k, v in state.items():
        if k in own:
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize(("cfg", "img"), [(MICRO, 32), (BASE, 224)], ids=["micro", "vit_base_paper"])
def test_encoder_loads_strictly_into_timm_token_pool_backbone(cfg: dict[str, Any], img: int) -> None:
    model, state = _timm_load(cfg, img, num_classes=0, global_pool="token")
    model.load_state_dict(state, strict=True)
    if cfg is MICRO:
        enc = create_vit(cfg, img).eval()
        enc.load_state_dict(state)
        x = torch.randn(2, 3, img, img)
        with torch.no_grad():
            assert torch.allclose(enc(x), model.eval()(x), atol=1e-5)


def test_rel_pos_bias_full_image_and_token_subset() -> None:
    torch.manual_seed(0)
    vit = create_vit({**MICRO, "rel_pos": "bias"}, 32).eval()
    with torch.no_grad():
        for blk in vit.blocks:  # make the relative term large enough to matter
            blk.attn.rel_table.normal_(0, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = vit.forward_features(x)
    assert full.shape == (2, 65, 64) and torch.isfinite(full).all()

    coords = grid_coords(8, 8)
    with torch.no_grad():
        tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)

        def run(tok: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
            h = torch.cat([cls, tok], dim=1)
            for blk in vit.blocks:
                h = blk(h, coords=xy)
            return vit.norm(h)

        # Calling the blocks ourselves with every coordinate reproduces timm's own forward.
        assert torch.allclose(run(tokens, coords[None]), full, atol=1e-5)

        # A token subset (per-sample) works, and shuffling tokens together with their coordinates only permutes
        # the outputs: the relative term follows the coordinates, not the token order.
        g = torch.Generator().manual_seed(1)
        keep = torch.stack([torch.randperm(64, generator=g)[:16] for _ in range(2)])
        sub_tok = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, 64))
        out = run(sub_tok, coords[keep])
        assert out.shape == (2, 17, 64) and torch.isfinite(out).all()
        perm = torch.randperm(16, generator=g)
        out_perm = run(sub_tok[:, perm], coords[keep][:, perm])
        assert torch.allclose(out_perm[:, 1:], out[:, 1:][:, perm], atol=1e-5)
        assert torch.allclose(out_perm[:, 0], out[:, 0], atol=1e-5)
        # Wrong coordinates change the result (the bias is used).
        wrong = run(sub_tok, coords[keep.flip(1)])
        assert not torch.allclose(wrong, out, atol=1e-3)
        # A full-image pass after a subset pass (stale coordinates) uses the full grid again; forward_features is
        # what the kNN / linear evaluations call, bypassing the model's forward().
        assert torch.allclose(vit.forward_features(x), full, atol=1e-5)
        assert torch.allclose(vit.forward_head(vit.forward_features(x)), vit(x), atol=1e-5)


def test_rel_pos_without_coords_is_refused() -> None:
    vit = create_vit({**MICRO, "rel_pos": "bias"}, 32)
    h = torch.randn(1, 5, 64)
    with pytest.raises(RuntimeError, match="without their coords"):
        vit.blocks[0](h)


def test_unknown_rel_pos_lists_valid() -> None:
    with pytest.raises(ValueError, match="valid: none, bias"):
        create_vit({**MICRO, "rel_pos": "nope"}, 32)


def test_rel_pos_bias_is_a_unit_stride_mask_of_the_offsets_table_rows() -> None:
    """CUDA's fused SDPA kernels take a float mask only with unit stride along the keys (otherwise SDPA falls back to
    its explicit math path, in fp32): the bias is built so, in fp32 and bf16, on the full grid and on per-sample
    token subsets, and entry (s, h, i, j) is the table row of the offset between tokens i and j (cls: its own rows)."""
    torch.manual_seed(0)
    att = create_vit({**MICRO, "rel_pos": "bias"}, 32).blocks[0].attn
    with torch.no_grad():
        att.rel_table.normal_()
    span = 2 * 8 - 1
    table = att.rel_table.detach()
    sub = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:6] for i in range(2)])
    for xy in (None, grid_coords(8, 8)[sub]):
        n = 65 if xy is None else 7
        q = torch.zeros(2, att.num_heads, n, att.head_dim)
        bias = att.position_term(q, n, xy)
        assert bias.shape == ((1 if xy is None else 2), att.num_heads, n, n)
        assert bias.stride(-1) == 1 and bias.to(torch.bfloat16).stride(-1) == 1
        pos = grid_coords(8, 8)[None] if xy is None else xy
        for s in range(bias.shape[0]):
            torch.testing.assert_close(bias[s, :, 0, 0], table[span * span + 2], rtol=0, atol=0)
            for i in range(1, n, 3):
                torch.testing.assert_close(bias[s, :, 0, i], table[span * span], rtol=0, atol=0)
                torch.testing.assert_close(bias[s, :, i, 0], table[span * span + 1], rtol=0, atol=0)
                for j in range(1, n, 5):
                    dy, dx = (pos[s, i - 1] - pos[s, j - 1]).tolist()
                    torch.testing.assert_close(bias[s, :, i, j], table[(dy + 7) * span + dx + 7], rtol=0, atol=0)


def test_rel_pos_vit_through_sdpa_equals_the_explicit_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative-bias ViT (BEiT / SimMIM) with every attention layer through SDPA (the bias as its float mask) gives
    the explicit softmax(QK^T / sqrt(d) + bias)V's output and gradients in fp32 on the CPU, on the full grid and on a
    token subset; every mask SDPA receives has unit stride along the keys (see the test above)."""
    torch.manual_seed(0)
    vit = create_vit({**MICRO, "rel_pos": "bias"}, 32)
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.rel_table.normal_(0, 1.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:16] for i in range(2)])
    strides: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("attn_mask") is not None:
            strides.append(kw["attn_mask"].stride(-1))
        return sdpa(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)

    def run(fused: bool) -> list[torch.Tensor]:
        assert set_fused_attn(vit, fused) == 4
        vit.zero_grad(set_to_none=True)
        full = vit.forward_features(x)
        tok = torch.gather(vit.patch_embed(x), 1, keep[..., None].expand(-1, -1, 64))
        part = run_blocks(vit, torch.cat([vit.cls_token.expand(2, -1, -1), tok], 1), grid_coords(8, 8)[keep])
        (full.square().mean() + part.square().mean()).backward()
        return [full.detach(), part.detach()] + [p.grad.clone() for p in vit.parameters() if p.grad is not None]

    fused, explicit = run(True), run(False)
    assert len(fused) == len(explicit) > 2 + 4
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(strides) == 8 and set(strides) == {1}
    # The helper itself hands SDPA a unit-stride mask whatever the layout it is given.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 5, 5, 3, generator=g).permute(0, 3, 1, 2)
    strides.clear()
    torch.testing.assert_close(attention(q, k, v, bias, 0.0, fused=True), attention(q, k, v, bias, 0.0, fused=False))
    assert strides == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA's fused SDPA kernels")
def test_rel_pos_attention_runs_in_cudas_memory_efficient_kernel() -> None:
    """On a GPU, under bf16 autocast, a relative-bias layer (forward and backward) runs with SDPA restricted to the
    memory-efficient kernel: SDPA raises instead of falling back to its fp32 math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    vit = create_vit({"arch": "vit_base", "patch_size": 16, "rel_pos": "bias"}, 224).cuda()
    blk = vit.blocks[0]
    x = torch.randn(4, 197, 768, device="cuda", requires_grad=True)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        out = blk(x)
    out.float().square().mean().backward()
    assert blk.attn.rel_table.grad is not None and torch.isfinite(blk.attn.rel_table.grad).all()
