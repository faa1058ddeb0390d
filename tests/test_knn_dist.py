"""The kNN stage on 2 CPU processes (gloo): each rank embeds its shard (items rank::2), the gallery is gathered
back into dataset order, each rank votes for its own queries and the hits are summed: the same features, labels and
accuracies as one process. End to end: the stage through the suite's ``--devices 2`` path (torchrun) gives the
one-process metrics and accounts for both processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from repro.evals.knn import extract, knn_accuracy

KS = (1, 5, 200)
CLASSES = 4


def _data() -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
    """A 37-image gallery and 13 queries (neither divisible by 2) and the weights of a per-image feature map."""
    g = torch.Generator().manual_seed(0)
    gallery = TensorDataset(torch.randn(37, 3, 4, 4, generator=g), torch.randint(0, CLASSES, (37,), generator=g))
    query = TensorDataset(torch.randn(13, 3, 4, 4, generator=g), torch.randint(0, CLASSES, (13,), generator=g))
    return gallery, query, torch.randn(48, 8, generator=g)


def _run(env: object | None, workers: int = 0) -> dict:
    gallery, query, w = _data()
    fn = lambda x: x.flatten(1) @ w  # noqa: E731 - one image's feature never depends on its batch
    cpu = torch.device("cpu")
    gf, gy = extract(fn, gallery, 4, cpu, num_workers=workers, env=env, to_cpu=False)
    qf, qy = extract(fn, query, 3, cpu, env=env, gather=False, to_cpu=False)
    all_qf, all_qy = extract(fn, query, 3, cpu, env=env)
    acc = knn_accuracy(gf, gy, qf, qy, CLASSES, KS, env=env)  # type: ignore[arg-type]
    return {"gallery": gf, "gallery_labels": gy, "query_shard": qf, "query": all_qf, "query_labels": all_qy,
            "acc": acc}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from repro.engine.dist import setup

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    env = setup("cpu")
    try:
        torch.save(_run(env, workers=1 if rank == 0 else 0), f"{out}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_features_and_accuracies(tmp_path: Path) -> None:
    one = _run(None)
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r, res in enumerate(ranks):
        assert torch.equal(res["gallery"], one["gallery"]) and torch.equal(res["gallery_labels"],
                                                                           one["gallery_labels"])
        assert torch.equal(res["query"], one["query"]) and torch.equal(res["query_labels"], one["query_labels"])
        assert torch.equal(res["query_shard"], one["query"][r::2])  # the vote's share: items r, r + 2, ...
        assert res["acc"] == one["acc"]
    assert set(one["acc"]) == {f"knn_top1_k{k}" for k in KS}


@pytest.mark.slow
def test_knn_stage_on_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.pipeline.execute import LocalExecutor
    from repro.pipeline.stage import RESULT, Stage
    from repro.resolve import resolve

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    cfg = resolve("default", "tiny", ["model.depth=1", "data.synthetic_train=64", "data.synthetic_val=30",
                                      "batch_size=16"], kind="knn")
    results = {}
    for devices in (1, 2):
        stage, runs = Stage("knn", cfg), tmp_path / f"runs{devices}"
        status = LocalExecutor(devices=devices, stream=False, jobs=devices).run([stage], runs)
        d = stage.dir(runs)
        assert status == {stage.key: "done"}, (d / "log.txt").read_text()[-3000:] if (d / "log.txt").is_file() \
            else status
        results[devices] = json.loads((d / RESULT).read_text())
    one, two = results[1], results[2]
    assert two["metrics"] == one["metrics"] and set(one["metrics"]) == {"knn_top1_k20", "knn_top1_k200"}
    acct = two["accounting"]
    assert acct["world_size"] == 2 and acct["images"] == 94 and one["accounting"]["world_size"] == 1
    assert acct["device_hours"] == pytest.approx(2 * acct["wall_s"] / 3600)
    assert acct["images_per_s"] == pytest.approx(94 / acct["wall_s"])
