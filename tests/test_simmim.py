"""SimMIM (repro.methods.simmim): the 32-px unit mask (exact count, upsampled onto patches), the mask token, the
pixel-shuffle decoder, the L1 loss on masked pixels only, the shared relative position bias and its export, the tiny
rule and a micro overfit (its tiny chain: test_chain_smoke.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from repro.config import ConfigError
from repro.methods.simmim import SimMIM, masked_l1, unit_mask, upsample_mask
from repro.models.relpos import RelPosAttention
from repro.models.vit import create_vit, set_fused_attn
from repro.resolve import resolve
from repro.scales import TinyRule


def make(**method: Any) -> SimMIM:
    """vit_micro (64-d, 4 blocks), 32-px images, 4-px patches (8 x 8 grid), 8-px mask units (4 x 4 units)."""
    torch.manual_seed(0)
    return SimMIM(resolve("simmim", "tiny", {"method": method}))


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("units", "ratio"), [(7, 0.6), (6, 0.6), (4, 0.6), (4, 0.5), (7, 0.75)])
def test_unit_mask_exact_count(units: int, ratio: float) -> None:
    m = unit_mask(64, units, ratio, gen())
    assert m.shape == (64, units, units)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    k = math.ceil(units * units * ratio)  # the official MaskGenerator's count (224/32: 30 of 49; 192/32: 22 of 36)
    assert (m.flatten(1).sum(1) == k).all()
    assert len({tuple(r.flatten().tolist()) for r in m}) > 32  # a fresh random subset per image
    assert torch.equal(unit_mask(64, units, ratio, gen()), m)  # reproducible from the generator


def test_mask_upsampled_onto_patches() -> None:
    m = make()
    assert (m.units, m.unit_patches, m.grid, m.stride) == (4, 2, 8, 4)
    mask = m.mask(8, gen(1))
    assert mask.shape == (8, 8, 8)
    blocks = mask.view(8, 4, 2, 4, 2)  # (n, unit row, sub row, unit col, sub col)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant over every unit's 2 x 2 patches
    assert torch.allclose(mask.mean((1, 2)), torch.full((8,), 10 / 16))  # ceil(16 * 0.6) = 10 units
    up = upsample_mask(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), 3)
    assert torch.equal(up[0], torch.tensor([[1.0] * 3 + [0.0] * 3] * 3 + [[0.0] * 3 + [1.0] * 3] * 3))


def test_paper_geometry() -> None:
    cfg = resolve("simmim", "paper")
    assert cfg["method"]["mask_patch_size"] == 32 and cfg["method"]["mask_ratio"] == 0.6
    assert cfg["model"]["pos_embed"] == "none" and cfg["model"]["rel_pos"] == "bias"
    assert cfg["data"]["crop_scale"] == [0.67, 1.0]
    # 224 px / 32 = 7 x 7 units, each 2 x 2 patches of 16 px; the tiny rule keeps 2 x 2 patches per unit.
    assert SimMIM.tiny(dict(cfg["method"]), TinyRule("vit_base"))["mask_patch_size"] == 8


def test_masked_l1_ignores_visible_pixels() -> None:
    imgs = images(2)
    pixel_mask = upsample_mask(unit_mask(2, 4, 0.6, gen()), 8)
    pred = torch.randn(2, 3, 32, 32, generator=gen(5))
    loss = masked_l1(pred, imgs, pixel_mask)
    w = pixel_mask.unsqueeze(1).expand_as(imgs).bool()
    assert torch.allclose(loss, (pred - imgs).abs()[w].mean(), atol=1e-6)
    other = pred.clone()
    other[~w] = 100.0  # visible pixels: no effect
    assert torch.allclose(masked_l1(other, imgs, pixel_mask), loss)
    other[w] += 1.0  # masked pixels: every one counts
    assert masked_l1(other, imgs, pixel_mask) > loss


def test_decoder_is_pixel_shuffle_of_each_cell() -> None:
    m = make()
    feats = torch.randn(2, 64, 8, 8, generator=gen())
    out = m.decoder(feats)
    assert out.shape == (2, 3, 32, 32)
    bumped = feats.clone()
    bumped[:, :, 2, 5] += 1.0  # one cell of the last feature map -> only its 4 x 4 pixel block changes
    diff = (m.decoder(bumped) - out).abs().sum((0, 1)) > 0
    expect = torch.zeros(32, 32, dtype=torch.bool)
    expect[8:12, 20:24] = True
    assert torch.equal(diff, expect)


def test_masked_patches_enter_as_the_mask_token() -> None:
    m = make().eval()
    imgs = images(2)
    mask = m.mask(2, gen(3))
    pixel_mask = upsample_mask(mask, 4).unsqueeze(1).bool().expand_as(imgs)
    with torch.no_grad():
        z = m.encode(imgs, mask)
        changed = imgs.clone()
        changed[pixel_mask] = torch.randn(int(pixel_mask.sum()), generator=gen(9))
        assert torch.allclose(m.encode(changed, mask), z, atol=1e-5)  # masked content never reaches the encoder
        changed[~pixel_mask] += 1.0
        assert not torch.allclose(m.encode(changed, mask), z, atol=1e-3)
    assert z.shape == (2, 64, 8, 8)


def test_shared_relative_bias_and_export() -> None:
    m = make()
    tables = [mod.rel_table for mod in m.encoder.modules() if isinstance(mod, RelPosAttention)]
    assert len(tables) == 4 and all(t is tables[0] for t in tables)
    assert m.encoder.pos_embed is None  # no absolute table
    assert float(tables[0].detach().abs().sum()) == 0.0  # zero-initialised bias, as the official shared table
    assert all(float(blk.ls1.gamma.detach().mean()) == pytest.approx(0.1) for blk in m.encoder.blocks)
    m((images(), None), gen()).loss.backward()
    assert tables[0].grad is not None and tables[0].grad.abs().sum() > 0
    # The export holds one copy per block and loads, complete, into the fine-tuning ViT (per-block tables).
    state = m.export()
    assert all(torch.equal(state[f"blocks.{i}.attn.rel_table"], state["blocks.0.attn.rel_table"]) for i in range(4))
    ft = resolve("simmim_vit_base", "tiny", kind="finetune")
    vit = create_vit(ft["model"], ft["data"]["img_size"], num_classes=0)
    res = vit.load_state_dict(state, strict=False)
    # Mean pooling: timm swaps the final norm for fc_norm (a fresh one, as the official fine-tuning does).
    assert set(res.missing_keys) <= {"fc_norm.weight", "fc_norm.bias"}
    assert set(res.unexpected_keys) <= {"norm.weight", "norm.bias"}
    assert torch.equal(vit.blocks[3].attn.rel_table, state["blocks.0.attn.rel_table"])
    unshared = make(shared_rel_pos=False).encoder.blocks
    assert unshared[1].attn.rel_table is not unshared[0].attn.rel_table


def test_attention_masks_reach_sdpa_with_unit_key_stride(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's fused SDPA kernels take a float mask only with unit stride along the keys (otherwise SDPA runs its
    explicit math path in fp32: the bmm / softmax / fp32 GEMMs of the H200 trace): every block's relative bias does,
    and the step's loss is the explicit attention's."""
    masks: list[torch.Tensor] = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args: Any, **kw: Any) -> torch.Tensor:
        masks.append(kw["attn_mask"])
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    m = make()
    with torch.no_grad():
        m.encoder.blocks[0].attn.rel_table.normal_()  # the shared table, so that positions matter
    loss = m((images(), None), gen()).loss
    assert len(masks) == 4 and all(b.stride(-1) == 1 and b.shape == (1, 2, 65, 65) for b in masks)
    set_fused_attn(m, False)
    torch.testing.assert_close(m((images(), None), gen()).loss, loss, rtol=1e-5, atol=0)
    assert len(masks) == 4


@pytest.mark.parametrize(("override", "match"), [
    ({"method": {"mask_ratio": 1.0}}, "mask_ratio"),
    ({"method": {"mask_patch_size": 0}}, "mask_patch_size"),
])
def test_validation(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve("simmim", "tiny", override)


@pytest.mark.parametrize("unit", [6, 12])  # not a multiple of the 4-px patch / does not divide 32 px
def test_bad_unit_geometry(unit: int) -> None:
    with pytest.raises(ConfigError, match="mask_patch_size"):
        make(mask_patch_size=unit)


def smooth_images(n: int = 2, seed: int = 1) -> torch.Tensor:
    """Low-frequency images (a 4 x 4 random field upsampled): masked units are partly predictable from context."""
    field = torch.randn(n, 3, 4, 4, generator=gen(seed))
    return 2 * F.interpolate(field, size=32, mode="bilinear", align_corners=False)


def test_overfits_fixed_batch() -> None:
    torch.manual_seed(0)
    m = SimMIM(resolve("simmim", "tiny", {"model": {"drop_path": 0.0}}))
    imgs = smooth_images()
    # The bar to beat: the best constant prediction (per-channel median of the masked pixels).
    mask = upsample_mask(m.mask(2, gen(7)), 4)
    w = mask.unsqueeze(1).expand_as(imgs).bool()
    median = torch.stack([imgs[:, c][w[:, c]].median() for c in range(3)]).view(1, 3, 1, 1)
    baseline = float(masked_l1(median.expand_as(imgs), imgs, mask))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        loss = m((imgs, None), gen(7)).loss  # same seed every step: the same mask
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::50]
    assert losses[-1] < 0.5 * baseline, (losses[-1], baseline)


def make_swin(**model: Any) -> SimMIM:
    """swin_micro (32-d, 4 stages), 24-px images, 1-px patches, window 3: 8-px units = the last stage's cell."""
    torch.manual_seed(0)
    return SimMIM(resolve("simmim_swin_base", "tiny", {"model": model}))


def test_swin_geometry_mask_token_and_decoder() -> None:
    paper = resolve("simmim_swin_base", "paper")
    geometry = (paper["data"]["img_size"], paper["model"]["window_size"], paper["method"]["mask_patch_size"])
    assert geometry == (192, 6, 32)
    m = make_swin().eval()
    assert (m.units, m.unit_patches, m.stride, m.grid) == (3, 8, 8, 24)
    imgs = torch.randn(2, 3, 24, 24, generator=gen())
    mask = m.mask(2, gen(2))
    assert mask.shape == (2, 24, 24) and (mask.flatten(1).sum(1) == 6 * 64).all()  # ceil(9 * 0.6) = 6 units
    with torch.no_grad():
        z = m.encode(imgs, mask)
        assert z.shape == (2, 256, 3, 3) and m.decoder(z).shape == (2, 3, 24, 24)
        changed = imgs.clone()
        w = mask.unsqueeze(1).bool().expand_as(imgs)
        changed[w] = 5.0
        assert torch.allclose(m.encode(changed, mask), z, atol=1e-5)
    # No weight decay on the mask token or the relative position tables (official Swin no_weight_decay sets).
    groups = m.param_groups({"weight_decay": 0.05})
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(m.mask_token) in no_decay
    assert all(id(p) in no_decay for n, p in m.named_parameters() if "relative_position_bias_table" in n)
    assert set(m.export()) == set(m.encoder.state_dict()) - {k for k in m.encoder.state_dict() if k.startswith("head.")}


@pytest.mark.slow
def test_swin_overfits_fixed_batch() -> None:
    m = make_swin(drop_path=0.0)
    imgs = 2 * F.interpolate(torch.randn(2, 3, 3, 3, generator=gen(1)), size=24, mode="bilinear",
                             align_corners=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = m((imgs, None), gen(7)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses[::40]
