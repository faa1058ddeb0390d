"""Scales, declared in one place.

``paper``: the recipe exactly as the paper / official code has it.
``tiny``: the same code paths made small by ONE rule applied to every recipe, so relative comparisons inside a table
keep their meaning: ViT-S/B/L -> nano/micro/mini, patch 16 -> 4 (8 -> 2), resolution / 7 (224 -> 32), effective
batch / 32 (at least 8, at most 256) with the paper's absolute lr (Adam at 1.5e-3 - 3e-3 learns at batch 32; the
lr was measured insensitive between 2e-3 and 4e-3), decoders shrunk by the encoder's width and depth ratios,
ImageNet-like datasets -> the embedded procedural dataset (v2: light backgrounds, dark objects) at 5,000 training /
1,000 validation images (1,000 keeps one seed's top-1 noise near 1.5 points).
Budget in training images, hence optimisation steps, not epochs of the tiny set (a stage must take enough steps to
learn whatever its data size): images = paper epochs x IMAGES_PER_EPOCH[kind] (pretraining 64: 800 ep -> 51,200
images = 400 steps at batch 128; fine-tuning 128: 100 ep at batch 32 -> 400 steps, scratch 300 ep at 128 -> 300;
linear 256: 90 ep at 256 -> 90 steps), steps = ceil(images / batch), epochs = ceil(steps / (train images // batch)),
so rows that vary the paper's epochs keep their ratios (a label fraction's epoch is that fraction of the images);
warm-up and milestones keep their fraction of the schedule.
Regularisation scaled to the budget by REG_FACTOR (0.25), never removed (the same code paths run): Mixup/CutMix
alphas, label smoothing, random-erasing probability, drop path and the RandAugment magnitude x 0.25, and the random
resized crop's lower area bound moved 75% of the way to 1 (0.08 -> 0.77, 0.2 -> 0.8).
Swin (archs ``swin_*``): Swin-T/S -> swin_nano, Swin-B -> swin_micro, Swin-L -> swin_mini, patch 4 -> 1 (the same
/ 4), resolution / 7 rounded to a multiple of patch x 2**(stages - 1) (224 -> 32, 192 -> 24) so the three merges fit,
window scaled with the patch grid (7 at 56 -> 4 at 32, 14 -> 8, 6 at 48 -> 3 at 24), so every stage keeps its number of
windows; a method's 32-px mask unit follows the patch rule (32 -> 8, the last stage's cell in both cases); width and
depth ratios (for decoders) from the stage-1 width and the total depth. Swin fine-tuning's absolute lr is capped at
SWIN_FINETUNE_LR (5e-4): at the papers' 2.5e-3 - 5e-3 the micro Swin at batch 32 never left chance (loss flat at
ln 10, top-1 10.0 in 9 of 9 main-job runs); measured on localmim_swin_base_100ep at tiny (468 steps, top-1 from
random init / from a tiny LocalMIM Swin encoder): 5e-3 10.0 / 10.0, 2e-3 32.3 / 23.0, 1e-3 44.0, 38.4 / 23.9,
22.3, 5e-4 44.0, 41.4 / 37.2, 20.7, 2e-4 40.8 / 23.4; at 5e-4 localmim_swin_base 40.4 and Swin-L (swin_mini) 38.6
from random init.
A recipe may override the result only through ``tiny_overrides`` with a ``tiny_reason``.
"""

from __future__ import annotations

import math
from typing import Any

from repro.config import ConfigError, deep_merge
from repro.models.archs import ARCHS, SWIN_ARCHS, is_swin

SWIN_FINETUNE_LR = 5.0e-4  # the cap on a Swin fine-tuning's absolute lr at tiny (measured: the module docstring)

TINY_ARCH = {"vit_small": "vit_nano", "vit_base": "vit_micro", "vit_large": "vit_mini", "vit_huge": "vit_mini",
             "swin_tiny": "swin_nano", "swin_small": "swin_nano", "swin_base": "swin_micro", "swin_large": "swin_mini"}
TINY_PATCH = {16: 4, 14: 4, 8: 2}
IMAGES_PER_EPOCH = {"pretrain": 64, "finetune": 128, "linear": 256}  # tiny training images per paper epoch
TINY_TRAIN, TINY_VAL = 5000, 1000  # embedded training / validation images at tiny
REG_FACTOR = 0.25  # regularisation strengths x this at tiny
BATCH_FACTOR = 32
RES_FACTOR = 7
REAL_DATASETS = ("imagenet1k", "imagenet22k", "inat2018", "inat2019")


def _width_depth(arch: str) -> tuple[int, int]:
    """(width, depth) of an arch for the tiny rule's ratios: a Swin's stage-1 width and total depth."""
    if is_swin(arch):
        dim, depths, _, _, _ = SWIN_ARCHS[arch]
        return dim, sum(depths)
    dim, depth, _, _ = ARCHS[arch]
    return dim, depth


class TinyRule:
    """The paper -> tiny mapping for one recipe (knows the paper arch, for width/depth ratios)."""

    def __init__(self, paper_arch: str) -> None:
        self.paper_arch = paper_arch
        self.tiny_arch = TINY_ARCH.get(paper_arch, paper_arch)
        pd, pdepth = _width_depth(paper_arch)
        td, tdepth = _width_depth(self.tiny_arch)
        self.width = td / pd
        self.depth = tdepth / pdepth

    @staticmethod
    def steps(paper_epochs: float, kind: str, batch: int, fraction: float = 1.0) -> int:
        """Optimizer steps for ``paper_epochs`` (an epoch of a label fraction is that fraction of the images)."""
        per = IMAGES_PER_EPOCH.get(kind, IMAGES_PER_EPOCH["finetune"]) * min(1.0, fraction)
        return max(1, math.ceil(paper_epochs * per / batch))

    @staticmethod
    def epochs(steps: int, steps_per_epoch: int) -> int:
        return max(1, math.ceil(steps / max(1, steps_per_epoch)))

    @staticmethod
    def reg(value: float) -> float:
        return value * REG_FACTOR

    @staticmethod
    def crop_low(low: float) -> float:
        return 1.0 - (1.0 - low) * REG_FACTOR

    @staticmethod
    def rand_aug(spec: str) -> str:
        """timm's ``rand-m9-...``: magnitude x REG_FACTOR (rounded, at least 1); other fields unchanged."""
        return "-".join(f"m{max(1, round(int(f[1:]) * REG_FACTOR))}" if f[:1] == "m" and f[1:].isdigit() else f
                        for f in spec.split("-"))

    @staticmethod
    def batch(b: int) -> int:
        # / 32, capped at 256 so that even linear probing (16384) takes several steps per epoch on 2k images
        return min(256, max(8, b // BATCH_FACTOR))

    @staticmethod
    def patch(p: int) -> int:
        return TINY_PATCH.get(p, max(1, p // 4))

    @staticmethod
    def img(size: int, tiny_patch: int) -> int:
        return max(tiny_patch * 4, round(size / RES_FACTOR / tiny_patch) * tiny_patch)

    def dim(self, d: int, multiple: int = 16) -> int:
        return max(multiple, round(d * self.width / multiple) * multiple)

    def layers(self, n: int) -> int:
        return max(1, math.ceil(n * self.depth))

    @staticmethod
    def heads(dim: int) -> int:
        return max(1, dim // 32)

    def decoder(self, params: dict[str, Any], dim_key: str, depth_key: str, heads_key: str) -> dict[str, Any]:
        out = dict(params)
        out[dim_key] = self.dim(params[dim_key])
        out[depth_key] = self.layers(params[depth_key])
        out[heads_key] = self.heads(out[dim_key])
        return out


def _scale_regularisation(cfg: dict[str, Any], rule: TinyRule) -> None:
    """Regularisation strengths x REG_FACTOR in place (never to zero from non-zero: the same code paths run)."""
    m, d, a = cfg["model"], cfg["data"], cfg.get("aug")
    if m.get("drop_path"):
        m["drop_path"] = rule.reg(m["drop_path"])
    if d.get("crop_scale"):
        d["crop_scale"] = [round(rule.crop_low(d["crop_scale"][0]), 4), d["crop_scale"][1]]
    if a:
        for k in ("mixup", "cutmix", "smoothing", "reprob"):
            if a.get(k):
                a[k] = rule.reg(a[k])
        if a.get("rand_aug"):
            a["rand_aug"] = rule.rand_aug(a["rand_aug"])


def apply_scale(cfg: dict[str, Any], scale: str, method_cls: Any = None) -> dict[str, Any]:
    """Return ``cfg`` at ``scale`` (a new dict); ``method_cls`` (the method's spec, ``repro.methods.registry``)
    shrinks the method's own size knobs."""
    if scale == "paper":
        return cfg
    if scale != "tiny":
        raise ConfigError(f"unknown scale '{scale}'; valid scales: paper, tiny")
    from repro.kinds import recipe_kind

    own = recipe_kind(str(cfg.get("kind", ""))) if cfg.get("kind") else None
    rule_of_kind = own.tiny_rule() if own is not None else None
    if rule_of_kind is not None:  # a kind with a tiny rule of its own (StageKind.tiny: segment)
        return rule_of_kind(cfg)
    out = deep_merge(cfg, {})
    m, d, o, t = out["model"], out["data"], out.get("optim"), out["train"]
    rule = TinyRule(m["arch"])
    m["arch"] = rule.tiny_arch
    for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        m[k] = None
    paper_grid = d["img_size"] / m["patch_size"]
    m["patch_size"] = rule.patch(m["patch_size"])
    if is_swin(rule.tiny_arch):
        _, depths, _, window, _ = SWIN_ARCHS[rule.paper_arch]
        unit = m["patch_size"] * 2 ** (len(depths) - 1)
        d["img_size"] = max(unit, round(d["img_size"] / RES_FACTOR / unit) * unit)
        m["window_size"] = max(1, round((m.get("window_size") or window) * d["img_size"] / m["patch_size"]
                                        / paper_grid))
    else:
        d["img_size"] = rule.img(d["img_size"], m["patch_size"])
    if d["dataset"] in REAL_DATASETS:
        d["dataset"] = "synthetic"
        d["path"] = None
    if d["dataset"] == "synthetic":
        d["num_classes"] = d["synthetic_classes"]
    elif d["dataset"] == "digits":
        d["num_classes"] = 10
    if d["dataset"] == "synthetic":
        d["synthetic_train"], d["synthetic_val"] = TINY_TRAIN, TINY_VAL
    _scale_regularisation(out, rule)
    if o is not None:
        paper_batch = o["batch_size"]
        o["batch_size"] = rule.batch(paper_batch)
        frac = float(d.get("train_fraction", 1.0))
        n_train = d["synthetic_train"] if d["dataset"] == "synthetic" else TINY_TRAIN  # digits: ~that size
        if frac < 1.0 and d["dataset"] == "synthetic":
            # A label fraction (semi-supervised rows) of the embedded set: at least 4 steps per epoch.
            o["batch_size"] = max(8, min(o["batch_size"], int(n_train * frac) // 4 // 8 * 8))
        # The paper's epochs -> a number of steps -> whole epochs of the tiny training set; warm-up and milestones
        # keep their fraction of the schedule.
        paper_epochs = o["epochs"]
        per_epoch = max(1, int(n_train * frac) // o["batch_size"])
        steps = rule.steps(paper_epochs, out.get("kind", "pretrain"), o["batch_size"], frac)
        o["epochs"] = rule.epochs(steps, per_epoch)
        ratio = o["epochs"] / paper_epochs
        o["warmup_epochs"] = o["warmup_epochs"] * ratio
        if o.get("milestones"):  # multistep: at the same fraction of the schedule (700 of 800 -> 7/8)
            o["milestones"] = [m * ratio for m in o["milestones"]]
        # Keep the paper's absolute lr: with blr x batch / 256 alone, a 32x smaller batch would also take a 32x
        # smaller Adam step, and a tiny run of a few hundred steps would not leave its initialisation.
        if o.get("lr") is None:
            o["blr"] = o["blr"] * paper_batch / o["batch_size"]
        if out.get("kind") == "finetune" and is_swin(str(out.get("model", {}).get("arch", ""))):
            absolute = o["lr"] if o.get("lr") is not None else o["blr"] * o["batch_size"] / 256
            o["lr"] = min(float(absolute), SWIN_FINETUNE_LR)
        t["batch_per_device"] = min(o["batch_size"], 256)
    t["num_workers"] = 0
    if t.get("compile") is None:  # a tiny stage runs for seconds: compiling its blocks would cost more than it saves
        t["compile"] = False
    t["log_every"] = 10
    t["keep_every"] = 0
    if method_cls is not None and "method" in out:
        out["method"] = method_cls.tiny(dict(out["method"]), rule)
    return with_tiny_overrides(out)


def with_tiny_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The last step of every tiny rule: a recipe's ``tiny_overrides`` over the result, only with a ``tiny_reason``."""
    overrides = cfg.get("tiny_overrides") or {}
    if not overrides:
        return cfg
    if not cfg.get("tiny_reason"):
        raise ConfigError(f"recipe {cfg.get('recipe')}: tiny_overrides need a tiny_reason saying why")
    return deep_merge(cfg, overrides)

