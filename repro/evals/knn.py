"""Weighted k-nearest-neighbour classification (DINO protocol) on L2-normalised features."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, batch_size: int, device: torch.device,
            desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    quiet = not sys.stderr.isatty()  # a bar on a terminal only: no carriage returns in a stage's log file
    for x, y in tqdm(DataLoader(ds, batch_size=batch_size, shuffle=False), desc=desc, leave=False, disable=quiet):
        feats.append(fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C): each of the k most cosine-similar training samples votes exp(sim / T) for its
    label."""
    train = F.normalize(train_feats, dim=1)
    test = F.normalize(test_feats, dim=1)
    k = min(k, train.shape[0])
    out = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i : i + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=top.dtype)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: Iterable[int] = (20, 200),
                 temperature: float = 0.07) -> dict[str, float]:
    res = {}
    for k in ks:
        pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)
        res[f"knn_top1_k{k}"] = 100.0 * (pred == test_labels).float().mean().item()
    return res


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    res = {}
    for k in ks:
        k = min(k, logits.shape[1])
        hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        res[f"top{k}"] = 100.0 * hit.float().mean().item()
    return res


def run_knn(cfg: dict, out_dir: object) -> dict:
    """kNN stage: features of the train split (gallery) and val split with the evaluation transform."""
    import time

    from repro.data.datasets import build_split, eval_transform
    from repro.engine.dist import setup
    from repro.engine.train import peak_memory_mb
    from repro.evals.features import eval_encoder, feature_kind, features, instance_head

    env = setup()
    t0 = time.perf_counter()
    vit = eval_encoder(cfg, cfg.get("init")).to(env.device).eval()
    kind = feature_kind(cfg)
    tf = eval_transform(cfg["data"], cfg["aug"].get("eval_crop_pct", 0.875))
    gallery = build_split(cfg["data"], "train", tf, seed=cfg["seed"])
    query = build_split(cfg["data"], "val", tf)
    head = instance_head(cfg, cfg.get("init"))
    if head is not None:
        head = head.to(env.device).eval()
    fn = lambda x: features(vit, x, kind, head)  # noqa: E731
    tr_f, tr_y = extract(fn, gallery, cfg["batch_size"], env.device, "gallery")
    te_f, te_y = extract(fn, query, cfg["batch_size"], env.device, "query")
    metrics = knn_accuracy(tr_f, tr_y, te_f, te_y, cfg["data"]["num_classes"], cfg["k"], cfg["temperature"])
    wall = time.perf_counter() - t0
    return {"metrics": metrics, "accounting": {"wall_s": wall, "images": len(gallery) + len(query),
                                               "images_per_s": (len(gallery) + len(query)) / wall,
                                               "peak_memory_mb": peak_memory_mb(env.device),
                                               "device": env.device.type, "world_size": 1, "completed": True}}
