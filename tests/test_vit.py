"""ViT backbone: the fixed 2-D sin-cos table, timm interoperability of exported encoders, relative positions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch

from repro.models.vit import (
    create_vit,
    encoder_state_dict,
    grid_coords,
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
