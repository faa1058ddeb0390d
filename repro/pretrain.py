"""The pretraining stage: build the method, train it with the engine (with a kNN curve when asked), count its FLOPs
and export the encoder for the evaluations (``repro.engine.pretrain``). It lives outside ``repro.engine`` because it
uses the evaluations and the profiler, which the engine never imports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from repro.data.datasets import build_split, crop_flip_transform, eval_transform
from repro.data.device_input import train_split
from repro.engine.dist import DistEnv, setup
from repro.engine.fit import fit
from repro.engine.hooks import EpochEval
from repro.engine.pretrain import export_encoder
from repro.evals.features import features
from repro.evals.knn import extract, knn_accuracy
from repro.methods import get_method


def knn_curve(task: Any, cfg: Mapping[str, Any], env: DistEnv, every: int) -> Callable[[int], dict[str, float]]:
    """kNN top-1 (k=20, T=0.07) on the val split every ``every`` epochs, for learning curves (an ``EpochEval``, run
    by every process): as the kNN stage runs it, with the recipe's loader workers, each rank embedding its share of
    both splits and the vote on the device."""
    tf = eval_transform(cfg["data"])
    gallery = build_split(cfg["data"], "train", tf)
    query = build_split(cfg["data"], "val", tf)
    workers = int(cfg["train"].get("num_workers", 0))

    def measure(epoch: int) -> dict[str, float]:
        if epoch % every:
            return {}
        fn = getattr(task, "instance_features", None) or (lambda x: features(task.encoder, x, task.linear_feature))
        gf, gy = extract(fn, gallery, 256, env.device, "knn gallery", num_workers=workers, env=env, to_cpu=False)
        qf, qy = extract(fn, query, 256, env.device, "knn query", num_workers=workers, env=env, gather=False,
                         to_cpu=False)
        return knn_accuracy(gf, gy, qf, qy, cfg["data"]["num_classes"], ks=(20,), env=env)

    return measure


def step_flops_per_image(method: Any, train: Any, device: torch.device) -> float | None:
    """FLOPs (fwd + bwd, attention counted) of one training step per image, on one training image, after training
    (so the count never touches the training RNG streams); None if counting fails."""
    from torch.utils.data import default_collate

    from repro.profile.flops import flops_per_image

    try:
        batch = default_collate([train[0]])
        if hasattr(train, "to_device"):  # data.decode=device: the batch is finished on the device
            batch = train.to_device(batch, device)
        else:
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
    train = train_split(cfg["data"], tf, seed=cfg["seed"])  # data.decode: cpu (build_split) or device
    every = cfg["train"].get("knn_every") or 0
    hooks = [EpochEval(knn_curve(method, cfg, env, every))] if every else []
    acct = fit(method, train, cfg, out_dir, desc=f"pretrain {method.name}", env=env, hooks=hooks)
    acct["flops_per_image"] = step_flops_per_image(method, train, env.device)
    acct["device_count"] = env.world_size
    artifacts = export_encoder(method, cfg, Path(out_dir)) if acct["completed"] and env.is_main else {}
    hist = acct["history"]
    metrics = {"final_loss": hist[-1]["loss"]} if hist else {}
    for rec in reversed(hist):
        if "knn_top1_k20" in rec:
            metrics["knn_top1_k20"] = rec["knn_top1_k20"]
            break
    return {"metrics": metrics, "accounting": acct, "artifacts": artifacts}
