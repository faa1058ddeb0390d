"""The pretraining stage: build the method, train it with the engine, export the encoder for the evaluations."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from repro.data.datasets import build_split, crop_flip_transform, eval_transform
from repro.engine.dist import setup
from repro.engine.train import fit
from repro.evals.features import features
from repro.evals.knn import extract, knn_accuracy
from repro.io import atomic_json_and_tensors
from repro.methods import get_method

ENCODER_FILE = "encoder.pth"
EXTRAS_FILE = "extras.pth"
META_FILE = "encoder.json"


def knn_hook(task: Any, cfg: Mapping[str, Any], device: torch.device, every: int) -> Any:
    """kNN top-1 (k=20, T=0.07) on the val split every ``every`` epochs, for learning curves."""
    tf = eval_transform(cfg["data"])
    gallery = build_split(cfg["data"], "train", tf)
    query = build_split(cfg["data"], "val", tf)

    def hook(epoch: int) -> dict[str, float]:
        if epoch % every:
            return {}
        fn = getattr(task, "instance_features", None) or (lambda x: features(task.encoder, x, task.linear_feature))
        gf, gy = extract(fn, gallery, 256, device, "knn gallery")
        qf, qy = extract(fn, query, 256, device, "knn query")
        return knn_accuracy(gf, gy, qf, qy, cfg["data"]["num_classes"], ks=(20,))

    return hook


def step_flops_per_image(method: Any, train: Any, device: torch.device) -> float | None:
    """FLOPs (fwd + bwd, attention counted) of one training step per image, on one training image, after training
    (so the count never touches the training RNG streams); None if counting fails."""
    from torch.utils.data import default_collate

    from repro.profile.flops import flops_per_image

    try:
        batch = default_collate([train[0]])
        batch = [b.to(device) if isinstance(b, torch.Tensor) else
                 type(b)(x.to(device) for x in b) if isinstance(b, (list, tuple)) else b for b in batch]
        method.train()
        return flops_per_image(method, batch, torch.Generator(device=device).manual_seed(0))["total"]
    except Exception:  # noqa: BLE001 - accounting must never fail a finished stage
        return None


def run_pretrain(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    env = setup()
    method = get_method(cfg["method"]["name"])(cfg)
    tf = method.train_transform() or crop_flip_transform(cfg["data"])
    train = build_split(cfg["data"], "train", tf, seed=cfg["seed"])
    every = cfg["train"].get("knn_every") or 0
    hook = knn_hook(method, cfg, env.device, every) if every else None
    acct = fit(method, train, cfg, out_dir, epoch_hook=hook, desc=f"pretrain {method.name}", env=env)
    acct["flops_per_image"] = step_flops_per_image(method, train, env.device)
    acct["device_count"] = env.world_size
    artifacts = {}
    if acct["completed"] and env.is_main:
        meta = {"method": method.name, "linear_feature": method.linear_feature, "finetune_pool": method.finetune_pool,
                "model": dict(cfg["model"]), "img_size": cfg["data"]["img_size"]}
        artifacts = atomic_json_and_tensors(out_dir, {ENCODER_FILE: method.export(), EXTRAS_FILE: method.extras()},
                                            META_FILE, meta)
    hist = acct["history"]
    metrics = {"final_loss": hist[-1]["loss"]} if hist else {}
    for rec in reversed(hist):
        if "knn_top1_k20" in rec:
            metrics["knn_top1_k20"] = rec["knn_top1_k20"]
            break
    return {"metrics": metrics, "accounting": acct, "artifacts": artifacts}
