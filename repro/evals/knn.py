"""Weighted k-nearest-neighbour classification (DINO protocol) on L2-normalised features.

At scale (ImageNet: 1.28M gallery images) the stage runs on every GPU of its job: each rank embeds a disjoint shard
of each split (items ``rank, rank + world, ...``) with the recipe's loader workers; the gallery shards are gathered
back into dataset order on every rank and kept on the device; each rank votes for its own query shard in chunks of
bounded memory, and the hit counts are summed over ranks. In one process on the CPU the arithmetic is the original
one, op for op.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from repro.config import ConfigError
from repro.engine.dist import DistEnv
from repro.engine.train import new_iteration

# Query rows per vote chunk: at most this many, and fewer when their similarity rows (rows x gallery, fp32) would
# pass VOTE_BYTES (ImageNet's 1.28M gallery: 209 rows, 1 GiB); a tiny gallery keeps the full 1024.
VOTE_CHUNK = 1024
VOTE_BYTES = 1 << 30


def _sharded(env: DistEnv | None) -> bool:
    return env is not None and env.distributed


def shard_sizes(n: int, world: int) -> list[int]:
    """Items of each rank's shard when rank r takes items r, r + world, ... of ``n``."""
    return [len(range(r, n, world)) for r in range(world)]


def interleave(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """The ``n`` rows of the dataset from the ranks' shards (rank r: items r, r + world, ...), each shard padded
    at its end to one length (as ``all_gather`` needs); the padding is dropped."""
    world = len(parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, (part, size) in enumerate(zip(parts, shard_sizes(n, world))):
        out[r::world] = part[:size]
    return out


def gather_shards(local: torch.Tensor, n: int, env: DistEnv) -> torch.Tensor:
    """Every rank's shard of an ``n``-row dataset (this rank's: ``local``), all-gathered in dataset order."""
    sizes = shard_sizes(n, env.world_size)
    if local.shape[0] != sizes[env.rank]:
        raise ValueError(f"rank {env.rank} holds {local.shape[0]} rows, its shard of {n} has {sizes[env.rank]}")
    padded = local.new_zeros((sizes[0], *local.shape[1:]))  # shard 0 is the longest
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    torch_dist.all_gather(parts, padded)
    return interleave(parts, n)


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, batch_size: int, device: torch.device,
            desc: str = "features", *, num_workers: int = 0, env: DistEnv | None = None, gather: bool = True,
            to_cpu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and labels of ``ds`` in its order. ``num_workers`` loader workers (pinned memory on
    CUDA). With ``env`` of several processes each rank embeds its shard (items ``rank::world``); ``gather``: the
    shards are all-gathered into dataset order, else this rank's shard is returned. ``to_cpu=False`` keeps the
    result on ``device``."""
    sharded = _sharded(env)
    n = len(ds)  # type: ignore[arg-type]
    if sharded:
        assert env is not None
        if n < env.world_size:
            raise ConfigError(f"{desc}: {n} images cannot be shared by {env.world_size} processes")
        ds = Subset(ds, range(env.rank, n, env.world_size))
    keep = device if sharded or not to_cpu else torch.device("cpu")  # a gather runs on the device (NCCL)
    pin = device.type == "cuda"
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin,
                        persistent_workers=False)
    quiet = not sys.stderr.isatty() or (env is not None and not env.is_main)  # no carriage returns in a log file
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=quiet):
        new_iteration()  # CUDA graphs: each batch is an iteration; its features are copied out of their buffers
        feats.append(fn(x.to(device, non_blocking=pin)).to(keep, torch.float32, copy=True))
        labels.append(y if keep.type == "cpu" else y.to(keep))
    f, y = torch.cat(feats), torch.cat(labels)
    if sharded and gather:
        assert env is not None
        f, y = gather_shards(f, n, env), gather_shards(y, n, env)
    return (f.cpu(), y.cpu()) if to_cpu else (f, y)


def vote_chunk(gallery: int, bytes_per_sim: int = 4) -> int:
    """Query rows per vote chunk for a gallery of ``gallery`` rows (``VOTE_CHUNK``, ``VOTE_BYTES``)."""
    return max(1, min(VOTE_CHUNK, VOTE_BYTES // max(1, gallery * bytes_per_sim)))


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int, temperature: float = 0.07, chunk: int | None = None) -> torch.Tensor:
    """Class scores (N_test, C): each of the k most cosine-similar training samples votes exp(sim / T) for its
    label. Computed on the training features' device, ``chunk`` query rows at a time (default ``vote_chunk``)."""
    train = F.normalize(train_feats, dim=1)
    test = F.normalize(test_feats, dim=1).to(train.device)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    chunk = chunk or vote_chunk(train.shape[0], train.element_size())
    out = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i : i + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=top.dtype, device=top.device)
        votes.scatter_add_(1, labels[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: Iterable[int] = (20, 200),
                 temperature: float = 0.07, env: DistEnv | None = None) -> dict[str, float]:
    """Top-1 (%) of the weighted kNN vote for each k. With ``env`` of several processes ``test_*`` are this
    rank's share of the queries (every rank holds the whole gallery): the hits and counts are summed over ranks."""
    res = {}
    for k in ks:
        pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)
        hit = pred == test_labels.to(pred.device)
        if _sharded(env):
            counts = torch.stack([hit.sum(), torch.tensor(hit.numel(), device=hit.device)])
            torch_dist.all_reduce(counts)
            hits, total = counts.tolist()
            # as mean() on one process: the float32 count divided by the number of queries
            res[f"knn_top1_k{k}"] = 100.0 * (torch.tensor(float(hits)) / total).item()
        else:
            res[f"knn_top1_k{k}"] = 100.0 * hit.float().mean().item()
    return res


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    res = {}
    for k in ks:
        k = min(k, logits.shape[1])
        hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        res[f"top{k}"] = 100.0 * hit.float().mean().item()
    return res


def run_knn(cfg: dict, out_dir: object) -> dict:
    """kNN stage: features of the train split (gallery) and val split with the evaluation transform, embedded and
    voted on by every process of the stage (module docstring)."""
    import time

    from repro.data.datasets import build_split, eval_transform
    from repro.engine.dist import setup
    from repro.engine.hooks import peak_memory_mb
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
    workers = int(cfg.get("train", {}).get("num_workers", 0))
    bs = cfg["batch_size"]
    # the gallery gathered on every rank, the queries left in each rank's shard; both stay on the device
    tr_f, tr_y = extract(fn, gallery, bs, env.device, "gallery", num_workers=workers, env=env, to_cpu=False)
    te_f, te_y = extract(fn, query, bs, env.device, "query", num_workers=workers, env=env, gather=False,
                         to_cpu=False)
    t1 = time.perf_counter()
    metrics = knn_accuracy(tr_f, tr_y, te_f, te_y, cfg["data"]["num_classes"], cfg["k"], cfg["temperature"],
                           env=env)
    wall = time.perf_counter() - t0
    images = len(gallery) + len(query)
    return {"metrics": metrics, "accounting": {"wall_s": wall, "images": images, "images_per_s": images / wall,
                                               "extract_s": t1 - t0,  # model, data and both splits' forward
                                               "vote_s": wall - (t1 - t0),
                                               "peak_memory_mb": peak_memory_mb(env.device),
                                               "device": env.device.type, "world_size": env.world_size,
                                               "completed": True}}
