"""End-to-end fine-tuning (MAE/BEiT protocol): layer-wise lr decay, drop path, Mixup/CutMix, label smoothing,
RandAugment, random erasing, average-pooled patch tokens; all from timm."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from repro.data.datasets import build_split, eval_transform
from repro.engine.fit import fit
from repro.engine.task import StepOutput
from repro.engine.train import new_iteration
from repro.evals.features import eval_encoder
from repro.evals.knn import topk_accuracy


def _posterize_compat() -> None:
    """timm's increasing-level RandAugment posterize can ask for 0 bits at full magnitude; Pillow >= 11 refuses
    where older Pillow returned a black image. Give the old result so the MAE recipe runs unchanged."""
    from PIL import Image
    from timm.data import auto_augment as aa

    def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return orig(img, bits_to_keep)

    orig = aa.posterize
    if getattr(orig, "_repro_compat", False):
        return
    posterize._repro_compat = True  # type: ignore[attr-defined]
    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is orig:
            aa.NAME_TO_OP[name] = posterize
    aa.posterize = posterize


def train_transform(cfg: Mapping[str, Any]) -> Any:
    _posterize_compat()
    d, a = cfg["data"], cfg["aug"]
    return create_transform(d["img_size"], is_training=True, scale=tuple(d["crop_scale"]), hflip=d["hflip"],
                            color_jitter=a.get("color_jitter"), auto_augment=a.get("rand_aug"),
                            interpolation=d.get("interpolation", "bicubic"), re_prob=a["reprob"], re_mode="pixel",
                            re_count=1)


class Classifier(nn.Module):
    def __init__(self, cfg: Mapping[str, Any], num_classes: int) -> None:
        super().__init__()
        self.model = eval_encoder(cfg, cfg.get("init"), num_classes=num_classes,
                                  global_pool=cfg["model"]["global_pool"])
        nn.init.trunc_normal_(self.model.get_classifier().weight, std=2e-5)  # ViT: head, Swin: head.fc
        a = cfg["aug"]
        self.mixup = None
        if a["mixup"] > 0 or a["cutmix"] > 0:
            self.mixup = Mixup(mixup_alpha=a["mixup"], cutmix_alpha=a["cutmix"], prob=a["mixup_prob"],
                               switch_prob=a["mixup_switch_prob"], label_smoothing=a["smoothing"],
                               num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif a["smoothing"] > 0:
            self.criterion = LabelSmoothingCrossEntropy(a["smoothing"])
        else:
            self.criterion = nn.CrossEntropyLoss()

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        return param_groups_layer_decay(self.model, optim["weight_decay"],
                                        no_weight_decay_list=self.model.no_weight_decay(),
                                        layer_decay=optim["layer_decay"] or 1.0)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        loss = self.criterion(self.model(x), y)
        return StepOutput(loss, {"loss": loss.detach()})


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Mapping[str, Any], device: torch.device) -> dict[str, float]:
    ds = build_split(cfg["data"], "val", eval_transform(cfg["data"], cfg["aug"].get("eval_crop_pct", 0.875)))
    model.eval()
    logits, labels = [], []
    for x, y in torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False):
        new_iteration()
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


def run_finetune(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    train = build_split(cfg["data"], "train", train_transform(cfg), seed=cfg["seed"])
    task = Classifier(cfg, cfg["data"]["num_classes"])
    acct = fit(task, train, cfg, out_dir, desc="finetune")
    metrics = evaluate(task.model, cfg, next(task.parameters()).device) if acct["completed"] else {}
    return {"metrics": metrics, "accounting": acct}
