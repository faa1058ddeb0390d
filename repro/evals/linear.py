"""Linear probing (MAE protocol): frozen encoder, BatchNorm1d(affine=False, eps=1e-6) + Linear, LARS."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro.data.datasets import build_split, crop_flip_transform, eval_transform
from repro.engine.fit import fit
from repro.engine.task import StepOutput
from repro.engine.train import new_iteration
from repro.evals.features import eval_encoder, feature_kind, features, instance_head
from repro.evals.knn import topk_accuracy


class LinearProbe(nn.Module):
    def __init__(self, cfg: Mapping[str, Any], num_classes: int) -> None:
        super().__init__()
        self.encoder = eval_encoder(cfg, cfg.get("init"))
        self.encoder.requires_grad_(False)
        self.kind = feature_kind(cfg)
        self.instance = instance_head(cfg, cfg.get("init"))
        if self.instance is not None:
            self.instance.requires_grad_(False)
        with torch.no_grad():
            dim = self._features(torch.zeros(2, 3, cfg["data"]["img_size"], cfg["data"]["img_size"])).shape[1]
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, whatever the engine asks
        if self.instance is not None:
            self.instance.eval()
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return features(self.encoder, x, self.kind, self.instance)

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "weight_decay": optim["weight_decay"]}]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self._features(x)
        return self.head(f.float())

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        x, y = batch
        loss = nn.functional.cross_entropy(self.logits(x), y)
        return StepOutput(loss, {"loss": loss.detach()})


@torch.no_grad()
def evaluate(task: LinearProbe, cfg: Mapping[str, Any], device: torch.device) -> dict[str, float]:
    ds = build_split(cfg["data"], "val", eval_transform(cfg["data"], cfg["aug"].get("eval_crop_pct", 0.875)))
    task.eval()
    logits, labels = [], []
    for x, y in torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False):
        new_iteration()
        logits.append(task.logits(x.to(device)).float().cpu())
        labels.append(y)
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


def run_linear(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    train = build_split(cfg["data"], "train", crop_flip_transform(cfg["data"]), seed=cfg["seed"])
    task = LinearProbe(cfg, cfg["data"]["num_classes"])
    acct = fit(task, train, cfg, out_dir, desc="linear")
    metrics = evaluate(task, cfg, next(task.parameters()).device) if acct["completed"] else {}
    return {"metrics": {f"linear_{k}": v for k, v in metrics.items()}, "accounting": acct}
