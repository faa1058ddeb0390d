"""ExtreMA: multi-masking, EMA teacher, losses, instance head round trip, augmentation pairs, learning (its tiny
chain: test_chain_smoke.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from repro.config import ConfigError
from repro.evals.features import features
from repro.methods.extrema import (
    ExtreMA,
    PairTransform,
    byol_loss,
    infonce_loss,
    momentum_at,
    multi_mask,
)
from repro.models.vit import create_vit
from repro.resolve import resolve

IMG = 32  # patch 4 -> 64 tokens


def make_cfg(**method: Any) -> dict[str, Any]:
    params = dict(ExtreMA.defaults)
    params.update({"proj_hidden": 48, "proj_dim": 16, "pred_hidden": 48, "num_masks": 2})
    params.update(method)
    ExtreMA.validate(params)
    class_token = params["cls_design"] == "vit_cls"
    return {
        "model": {"arch": "vit_micro", "patch_size": 4, "drop_path": 0.0, "class_token": class_token},
        "data": {"img_size": IMG, "crop_scale": [0.2, 1.0], "hflip": 0.5, "interpolation": "bicubic"},
        "method": params,
    }


def build(seed: int = 0, **method: Any) -> ExtreMA:
    torch.manual_seed(seed)
    return ExtreMA(make_cfg(**method))


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def batch(n: int = 4, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 3, IMG, IMG, generator=g)
    t = torch.randn(n, 3, IMG, IMG, generator=g)
    return (s, t), torch.zeros(n, dtype=torch.long)


def teacher_params(m: ExtreMA) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in m.named_parameters() if n.startswith("t_")]


def student_params(m: ExtreMA) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in m.named_parameters() if not n.startswith("t_")]


# ---------------------------------------------------------------------------------------------------------- masks


def test_multi_mask_disjoint_chunks_of_the_right_size() -> None:
    ids = multi_mask(6, 196, 0.8, 5, gen())
    assert ids.shape == (5, 6, 39)  # int(196 * 0.2) = 39
    for b in range(6):
        flat = ids[:, b].reshape(-1)
        assert flat.unique().numel() == 5 * 39  # disjoint across masks, no repeats inside one
        assert int(flat.min()) >= 0 and int(flat.max()) < 196
    # Different images get different masks.
    assert not torch.equal(ids[:, 0].sort(dim=1).values, ids[:, 1].sort(dim=1).values)
    # Reproducible from the generator.
    assert torch.equal(ids, multi_mask(6, 196, 0.8, 5, gen()))


def test_multi_mask_union_covers_every_token_when_chunks_tile() -> None:
    ids = multi_mask(3, 196, 0.75, 4, gen(1))  # 4 x 49 = 196
    for b in range(3):
        assert torch.equal(ids[:, b].reshape(-1).sort().values, torch.arange(196))
    ids = multi_mask(3, 64, 0.8, 5, gen(2))  # tiny scale: 5 x 12 of 64
    assert ids.shape == (5, 3, 12) and all(ids[:, b].reshape(-1).unique().numel() == 60 for b in range(3))


def test_multi_mask_independent_sampling_option() -> None:
    ids = multi_mask(4, 64, 0.5, 3, gen(3), disjoint=False)
    assert ids.shape == (3, 4, 32)
    assert all(ids[k, b].unique().numel() == 32 for k in range(3) for b in range(4))
    overlap = [np.intersect1d(ids[0, b].numpy(), ids[1, b].numpy()).size for b in range(4)]
    assert max(overlap) > 0  # 32 + 32 of 64: independent masks must overlap


def test_too_many_masks_rejected() -> None:
    with pytest.raises(ConfigError, match="num_masks"):
        build(num_masks=6)  # 6 x 12 > 64 tokens
    with pytest.raises(ConfigError, match="class_token"):
        cfg = make_cfg()
        cfg["model"]["class_token"] = True
        ExtreMA(cfg)
    with pytest.raises(ConfigError, match="aug"):
        ExtreMA.validate({**ExtreMA.defaults, "aug": "blur"})


# ------------------------------------------------------------------------------------------------------------ EMA


def test_momentum_schedule() -> None:
    assert momentum_at(0, 1000, 0.996) == pytest.approx(0.996, abs=1e-12)
    assert momentum_at(500, 1000, 0.996) == pytest.approx(0.998, abs=1e-12)
    assert momentum_at(1000, 1000, 0.996) == pytest.approx(1.0, abs=1e-12)
    t = 123
    assert momentum_at(t, 1000, 0.99) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * t / 1000)) * 0.01)


def test_teacher_starts_as_student_and_ema_update_is_exact() -> None:
    m = build()
    s_named = dict(student_params(m))
    pairs = [(s_named[n[2:]], p) for n, p in teacher_params(m)]
    # Every encoder / head / projector parameter has a teacher twin equal at init; the predictor has none.
    assert len(pairs) == len(s_named) - len(list(m.predictor.parameters()))
    assert all(torch.equal(s, t) for s, t in pairs)
    with torch.no_grad():
        for s, _ in pairs:
            s.add_(torch.randn_like(s))
    old = [t.detach().clone() for _, t in pairs]
    mom = momentum_at(300, 1000, 0.996)
    m.after_step(300, 1000)
    for (s, t), o in zip(pairs, old, strict=True):
        assert torch.equal(t.detach(), torch.add(o * mom, s.detach(), alpha=1.0 - mom))
        exact = o.double() * mom + s.detach().double() * (1.0 - mom)
        torch.testing.assert_close(t.detach().double(), exact, rtol=1e-6, atol=1e-7)
    # m = 1 at the end of the schedule: the teacher no longer moves.
    frozen = [t.detach().clone() for _, t in pairs]
    m.after_step(1000, 1000)
    assert all(torch.equal(t, f) for (_, t), f in zip(pairs, frozen, strict=True))


def test_no_gradient_reaches_the_teacher() -> None:
    m = build()
    out = m(batch(), gen())
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for _, p in teacher_params(m))
    grads = {n: p.grad for n, p in student_params(m) if p.requires_grad}
    assert all(g is not None for g in grads.values())
    for name in ("head.cls_token", "encoder.blocks.0.attn.qkv.weight", "predictor.0.weight", "projector.0.weight"):
        assert grads[name].abs().sum() > 0, name
    groups = m.param_groups({"weight_decay": 0.1})
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.head.cls_token) in no_decay and id(m.encoder.blocks[0].attn.qkv.weight) not in no_decay
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("design", ["vit_cls", "avgpool"])
def test_other_cls_designs_train(design: str) -> None:
    m = build(cls_design=design)
    seen: list[tuple[int, ...]] = []
    m.encoder.blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(tuple(a[0].shape)))
    out = m(batch(4), gen())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert seen == [(2 * 4, 12 + int(design == "vit_cls"), 64)]  # the ViT cls token rides in the sequence
    if design == "vit_cls":
        assert m.encoder.cls_token.grad is not None and m.encoder.cls_token.grad.abs().sum() > 0


def test_teacher_sees_all_tokens_once_and_student_the_stacked_masks() -> None:
    m = build(num_masks=3, mask_ratio=0.75)
    seen: dict[str, list[tuple[int, ...]]] = {"t": [], "s": []}
    m.t_encoder.blocks[0].register_forward_pre_hook(lambda mod, a: seen["t"].append(tuple(a[0].shape)))
    m.encoder.blocks[0].register_forward_pre_hook(lambda mod, a: seen["s"].append(tuple(a[0].shape)))
    m(batch(4), gen())
    assert seen["t"] == [(4, 64, 64)]
    assert seen["s"] == [(3 * 4, 16, 64)]


# ----------------------------------------------------------------------------------------------------------- loss


def test_byol_loss_hand_values() -> None:
    q = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[0.0, 2.0], [1.0, 0.0], [5.0, 0.0]])
    per = torch.tensor([2.0, 0.0, 2.0 - math.sqrt(2.0)])  # 2 - 2 cos
    assert byol_loss(q, k).item() == pytest.approx(per.mean().item(), abs=1e-6)


def test_loss_is_the_mean_over_masks_of_per_mask_losses() -> None:
    m = build(num_masks=3, mask_ratio=0.75)
    m.eval()
    (s, t), _ = batch(4)
    out = m(((s, t), None), gen(5))
    ids = multi_mask(4, 64, 0.75, 3, gen(5))
    with torch.no_grad():
        k = m.t_projector(m.t_head(m.t_encoder.forward_features(t)))
        per = [byol_loss(m.predictor(m.projector(m.head(m._tokens_visible(s, ids[i:i + 1])))), k) for i in range(3)]
    assert out.loss.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)


def test_infonce_hand_value_and_method_option() -> None:
    q = torch.eye(4) * 3.0
    temp = 0.2
    expected = math.log(1 + 3 * math.exp(-1 / temp)) * 2 * temp  # positive logit 1/T, negatives 0
    assert infonce_loss(q, torch.eye(4), temp).item() == pytest.approx(expected, rel=1e-5)
    m = build(loss="infonce")
    out = m(batch(), gen())
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert m.predictor[0].weight.grad is not None


# ------------------------------------------------------------------------------------------------ instance head


def eval_cfg(m: ExtreMA) -> dict[str, Any]:
    return {"model": dict(m.cfg["model"]), "data": {"img_size": IMG}, "feature": "instance"}


@pytest.mark.parametrize(("design", "branch", "blocks"), [("cait", "student", 2), ("cait", "teacher", 3),
                                                          ("avgpool", "student", 2), ("vit_cls", "student", 2)])
def test_instance_head_from_extras_reproduces_the_method(design: str, branch: str, blocks: int) -> None:
    m = build(cls_design=design, export_branch=branch, ca_blocks=blocks)
    with torch.no_grad():  # make the teacher differ from the student
        for p in m.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.eval()
    x = torch.randn(3, 3, IMG, IMG)
    ref = m.instance_features(x)
    cfg = eval_cfg(m)
    vit = create_vit(cfg["model"], IMG)
    res = vit.load_state_dict(m.export(), strict=False)
    assert not res.unexpected_keys and all(k.startswith(("fc_norm.", "head.")) for k in res.missing_keys)
    assert (vit.cls_token is None) == (design != "vit_cls")
    extras = m.extras()
    assert all(k.startswith("instance_head.") for k in extras)
    if design == "cait":
        assert len({k.split(".")[2] for k in extras if ".blocks." in k}) == blocks
    head = ExtreMA.instance_head(cfg, extras).eval()
    with torch.no_grad():
        out = features(vit.eval(), x, "instance", head)
    assert out.shape == (3, 64)
    assert torch.equal(out, ref)


def test_masked_path_with_every_token_equals_the_full_image_path() -> None:
    m = build()
    m.eval()
    x = torch.randn(2, 3, IMG, IMG)
    ids = torch.arange(64).expand(1, 2, 64)
    with torch.no_grad():
        a = m.head(m._tokens_visible(x, ids))
    torch.testing.assert_close(a, m.instance_features(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- augmentation


def pattern_image() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr)


def pair(mode: str, seed: int, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return PairTransform(mode, IMG, **kw)(pattern_image())


@pytest.mark.parametrize("mode", ["none", "color", "crop", "crop_color_1view"])
def test_one_view_modes_give_both_branches_the_same_image(mode: str) -> None:
    for seed in range(3):
        s, t = pair(mode, seed, jitter_p=1.0)
        assert s.shape == (3, IMG, IMG) and torch.equal(s, t)


def test_shared_crop_keeps_the_geometry_and_redraws_the_colour() -> None:
    for seed in range(4):
        s, t = pair("shared_crop_2colors", seed, jitter_p=0.0, gray_p=0.0)
        assert torch.equal(s, t)  # colour off: only the (shared) crop remains
    assert any(not torch.equal(*pair("shared_crop_2colors", seed, jitter_p=1.0)) for seed in range(4))
    # The crop is random (differs between images drawn with different seeds).
    assert not torch.equal(pair("shared_crop_2colors", 0, jitter_p=0.0, gray_p=0.0)[0],
                           pair("shared_crop_2colors", 1, jitter_p=0.0, gray_p=0.0)[0])


def test_two_view_modes_augment_the_branches_independently() -> None:
    for mode in ("crop_2views", "crop_color_2views"):
        assert all(not torch.equal(*pair(mode, seed, jitter_p=0.0, gray_p=0.0)) for seed in range(3)), mode
    # Colour-only two views: same centre crop, so identical with colour off and different with it on.
    assert torch.equal(*pair("color_2views", 0, jitter_p=0.0, gray_p=0.0))
    assert any(not torch.equal(*pair("color_2views", seed, jitter_p=1.0)) for seed in range(4))
    # none: a deterministic centre crop.
    assert torch.equal(pair("none", 0)[0], pair("none", 1)[0])


def test_method_transform_follows_the_aug_knob() -> None:
    m = build(aug="crop_2views")
    tf = m.train_transform()
    assert isinstance(tf, PairTransform) and tf.mode == "crop_2views"


def test_recipes_crop_bilinear_as_the_official_augment() -> None:
    """Official lib/augment.py: RandomResizedCrop without an interpolation argument (torchvision: bilinear)."""
    for recipe in ("extrema", "extrema_vit_small", "extrema_in22k", "extrema_infonce"):
        cfg = resolve(recipe, "paper")
        assert cfg["data"]["interpolation"] == "bilinear", recipe
    tf = PairTransform("shared_crop_2colors", IMG, interpolation=resolve("extrema", "tiny")["data"]["interpolation"])
    crop = tf.geometry.transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert crop.interpolation == transforms.RandomResizedCrop(IMG).interpolation == InterpolationMode.BILINEAR


# ------------------------------------------------------------------------------------------------------ learning


def test_overfits_a_fixed_batch_without_collapsing() -> None:
    m = build(num_masks=2, mask_ratio=0.75, ema_base=0.996)
    n = 8
    low = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = torch.nn.functional.interpolate(low, size=IMG, mode="bilinear", align_corners=False)  # smooth images
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)
    g = gen()
    steps = 200
    losses = []
    for step in range(steps):
        out = m(((x, x), None), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.after_step(step + 1, steps)
        losses.append(out.loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first / 10, (first, last)
    # A zero BYOL loss is also reached by collapse; check the features still tell the images apart.
    m.eval()
    with torch.no_grad():
        f = m.instance_features(x)
        ids = multi_mask(n, 64, 0.75, 1, gen(99))  # masks never used in training
        q = m.predictor(m.projector(m.head(m._tokens_visible(x, ids))))
        k = m.t_projector(m.t_head(m.t_encoder.forward_features(x)))
    assert f.std(dim=0).mean() > 0.05  # a collapsed run sits near 0.02 here
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).t()
    hits = sim.argmax(dim=1).eq(torch.arange(n)).sum().item()
    assert hits >= 4, hits  # a masked view finds its own image among 8 (chance: 1)
