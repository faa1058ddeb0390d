"""MAE: per-sample random masking, what the encoder/decoder see, the masked norm-pix loss, paper values, overfitting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import repro.methods.mae as mae_mod
from repro.data.synthetic import render_scene
from repro.methods.mae import MAE
from repro.models.mim import norm_pix, patchify, random_masking, unpatchify
from repro.resolve import resolve

L = 64  # 32 px, patch 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6, 0.75, 0.9])
def test_random_masking_counts(ratio: float) -> None:
    n, length = 6, 50
    ids_keep, ids_restore, mask = random_masking(n, length, ratio, _gen(0))
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (n, keep) and ids_restore.shape == (n, length) and mask.shape == (n, length)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # The kept ids are exactly the unmasked positions, without duplicates.
    for i in range(n):
        assert sorted(ids_keep[i].tolist()) == torch.nonzero(mask[i] == 0).flatten().tolist()


def test_random_masking_per_sample_and_deterministic() -> None:
    _, _, m1 = random_masking(8, L, 0.75, _gen(123))
    _, _, m2 = random_masking(8, L, 0.75, _gen(123))
    _, _, m3 = random_masking(8, L, 0.75, _gen(124))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    rows = {tuple(r.tolist()) for r in m1}
    assert len(rows) == 8, "every sample must get its own mask"


def test_ids_restore_inverts_the_shuffle() -> None:
    n, length, ratio = 4, 16, 0.5
    ids_keep, ids_restore, mask = random_masking(n, length, ratio, _gen(5))
    x = torch.randn(n, length, 3)
    # Rebuild the shuffled sequence as MAE's decoder does: kept tokens then the others, then unshuffle.
    gen = _gen(5)
    noise = torch.rand(n, length, generator=gen)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle[:, : ids_keep.shape[1]], ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 3))
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored, x)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))
    # mask (original order) says masked exactly where the shuffled position is >= len_keep
    assert torch.equal(mask, (ids_restore >= ids_keep.shape[1]).float())


def test_patchify_roundtrip_and_order() -> None:
    imgs = torch.randn(2, 3, 8, 8)
    p = patchify(imgs, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(unpatchify(p, 4), imgs)
    # patch 1 is the top-right one; its first value is pixel (0, 4) channel 0, then channel 1 (MAE 'nhwpqc').
    assert p[0, 1, 0] == imgs[0, 0, 0, 4] and p[0, 1, 1] == imgs[0, 1, 0, 4]


def test_norm_pix_zero_mean_unit_unbiased_var() -> None:
    t = torch.randn(3, 10, 48) * 5 + 2
    z = norm_pix(t)
    assert torch.allclose(z.mean(-1), torch.zeros(3, 10), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=True), torch.ones(3, 10), atol=1e-4)
    # Biased variance would give (n-1)/n, not 1.
    assert not torch.allclose(z.var(-1, unbiased=False), torch.ones(3, 10), atol=1e-3)


@pytest.fixture(scope="module")
def tiny_cfg() -> dict[str, Any]:
    return resolve("mae", "tiny")


def _model(cfg: dict[str, Any], seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    return MAE(cfg)


def test_mae_token_counts(tiny_cfg: dict[str, Any]) -> None:
    assert tiny_cfg["model"]["arch"] == "vit_micro" and tiny_cfg["data"]["img_size"] == 32
    model = _model(tiny_cfg)
    seen: dict[str, list[tuple[int, ...]]] = {"enc": [], "dec": []}
    for blk in model.encoder.blocks:
        blk.register_forward_pre_hook(lambda m, a: seen["enc"].append(tuple(a[0].shape)))
    for blk in model.decoder.blocks:
        blk.register_forward_pre_hook(lambda m, a: seen["dec"].append(tuple(a[0].shape)))
    imgs = torch.randn(3, 3, 32, 32)
    out = model((imgs, torch.zeros(3, dtype=torch.long)), _gen(0))
    ratio = tiny_cfg["method"]["mask_ratio"]
    assert ratio == 0.75
    assert seen["enc"] == [(3, int(L * (1 - ratio)) + 1, 64)] * len(model.encoder.blocks)
    dec_dim = tiny_cfg["method"]["decoder_dim"]
    assert seen["dec"] == [(3, L + 1, dec_dim)] * tiny_cfg["method"]["decoder_depth"]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_mae_loss_only_on_masked_patches(tiny_cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_cfg).eval()
    imgs = torch.randn(2, 3, 32, 32)
    batch = (imgs, torch.zeros(2, dtype=torch.long))
    _, _, mask = random_masking(2, L, tiny_cfg["method"]["mask_ratio"], _gen(7))  # the mask forward will draw

    def loss_with_target_delta(delta: torch.Tensor) -> torch.Tensor:
        monkeypatch.setattr(mae_mod, "patchify", lambda x, p: patchify(x, p) + delta)
        with torch.no_grad():
            return model(batch, _gen(7)).loss

    base = loss_with_target_delta(torch.zeros(2, L, 48))
    noise = torch.randn(2, L, 48) * 3
    visible_only = loss_with_target_delta(noise * (1 - mask)[..., None])
    assert torch.equal(visible_only, base)
    one_masked = torch.zeros(2, L, 48)
    i = int(torch.nonzero(mask[1])[0])
    one_masked[1, i] = noise[1, i]
    assert not torch.allclose(loss_with_target_delta(one_masked), base)
    # And the images really are what the encoder sees: a change in a visible patch changes the loss too.
    monkeypatch.undo()
    j = int(torch.nonzero(mask[0] == 0)[0])
    imgs2 = imgs.clone()
    r, c = divmod(j, 8)
    imgs2[0, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model((imgs2, batch[1]), _gen(7)).loss, base)


def test_mae_paper_scale_values() -> None:
    cfg = resolve("mae", "paper")
    m = cfg["method"]
    assert (m["decoder_dim"], m["decoder_depth"], m["decoder_heads"]) == (512, 8, 16)
    assert m["mask_ratio"] == 0.75 and m["norm_pix_loss"] is True
    assert cfg["model"]["arch"] == "vit_base" and cfg["model"]["patch_size"] == 16
    assert cfg["optim"]["batch_size"] == 4096 and cfg["optim"]["blr"] == 1.5e-4
    assert cfg["optim"]["epochs"] == 800 and cfg["optim"]["warmup_epochs"] == 40
    assert tuple(cfg["optim"]["betas"]) == (0.9, 0.95)


def test_mae_overfits_one_batch(tiny_cfg: dict[str, Any]) -> None:
    model = _model(tiny_cfg, seed=0).train()
    rng = np.random.default_rng(0)  # 8 procedural scenes (white noise has nothing to learn from the context)
    imgs = torch.stack([torch.from_numpy(render_scene(rng, 32, i)[0]).permute(2, 0, 1).float() / 255 for i in range(8)])
    imgs = (imgs - 0.45) / 0.25
    batch = (imgs, torch.zeros(8, dtype=torch.long))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator()
    losses = []
    for _ in range(150):
        gen.manual_seed(0)  # the same masks every step
        loss = model(batch, gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * 3 <= losses[0], (losses[0], losses[-1])
