"""Weighted kNN (DINO protocol) and top-k accuracy on hand-made examples with known answers; the vote bit-identical
to the original CPU code; the shards of a multi-process extraction put back in dataset order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repro.evals.knn import (
    VOTE_BYTES,
    VOTE_CHUNK,
    extract,
    interleave,
    knn_accuracy,
    knn_predict,
    shard_sizes,
    topk_accuracy,
    vote_chunk,
)


def at(*degrees: float, scale: float = 1.0) -> torch.Tensor:
    """2-D features at the given angles (norm ``scale``: the kNN must not care)."""
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1) * scale


# Class 0 near 0 degrees, class 1 near 90, class 2 near 180.
GALLERY = at(0, 10, 20, 85, 95, 100, 175, 185, scale=3.0)
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def test_k1_nearest_neighbour() -> None:
    query = at(3, 89, 182, 50, 140)
    scores = knn_predict(GALLERY, LABELS, query, num_classes=3, k=1)
    # 50 degrees is nearer to 20 (30 away) than to 85 (35 away); 140 nearer to 175 (35) than to 100 (40).
    assert scores.argmax(1).tolist() == [0, 1, 2, 0, 2]
    # With k=1 the only vote is exp(cos(angle to the nearest) / T).
    assert scores[0, 0].item() == pytest.approx(math.exp(math.cos(math.radians(3)) / 0.07), rel=1e-9)
    assert scores[0, 1:].abs().sum() == 0


def test_k3_scores_are_sums_of_exp_sim_over_t() -> None:
    query = at(50)
    t = 0.1
    scores = knn_predict(GALLERY, LABELS, query, num_classes=3, k=3, temperature=t)[0]
    # The 3 nearest to 50 degrees: 20 (class 0, 30 away), 85 (class 1, 35), 10 (class 0, 40).
    w = lambda d: math.exp(math.cos(math.radians(d)) / t)  # noqa: E731
    assert scores[0].item() == pytest.approx(w(30) + w(40), rel=1e-9)
    assert scores[1].item() == pytest.approx(w(35), rel=1e-9)
    assert scores[2].item() == 0.0


def test_weighting_changes_the_answer() -> None:
    gallery = at(0, 40, -40)
    labels = torch.tensor([0, 1, 1])
    query = at(10)
    # Plain majority (huge T: all weights ~1): class 1 has two of the three neighbours.
    majority = knn_predict(gallery, labels, query, num_classes=2, k=3, temperature=1e4)
    assert majority.argmax(1).item() == 1
    # exp(sim / 0.07): the single very close class-0 sample outweighs the two farther class-1 ones.
    weighted = knn_predict(gallery, labels, query, num_classes=2, k=3, temperature=0.07)
    assert weighted.argmax(1).item() == 0
    acc = knn_accuracy(gallery, labels, query, torch.tensor([0]), num_classes=2, ks=(1, 3))
    assert acc == {"knn_top1_k1": 100.0, "knn_top1_k3": 100.0}
    acc_majority = knn_accuracy(gallery, labels, query, torch.tensor([0]), num_classes=2, ks=(3,), temperature=1e4)
    assert acc_majority == {"knn_top1_k3": 0.0}


def test_k_larger_than_gallery_is_capped() -> None:
    query = at(3, 89, 182, 50)
    all_k = knn_predict(GALLERY, LABELS, query, num_classes=3, k=len(GALLERY))
    capped = knn_predict(GALLERY, LABELS, query, num_classes=3, k=1000)
    assert torch.allclose(capped, all_k)
    acc = knn_accuracy(GALLERY, LABELS, query, torch.tensor([0, 1, 2, 0]), num_classes=3, ks=(200,))
    assert set(acc) == {"knn_top1_k200"}


def test_chunking_and_feature_scale_do_not_matter() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(17, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    a = knn_predict(train, labels, test, 4, k=5)
    b = knn_predict(train * 7.0, labels, test * 0.01, 4, k=5, chunk=3)
    assert torch.allclose(a, b, rtol=1e-5)


def test_knn_accuracy_counts() -> None:
    query = at(3, 89, 182, 50, 140)
    acc = knn_accuracy(GALLERY, LABELS, query, torch.tensor([0, 1, 2, 1, 1]), num_classes=3, ks=(1,))
    assert acc["knn_top1_k1"] == pytest.approx(60.0)


def test_topk_accuracy_known_values() -> None:
    logits = torch.tensor([
        [0.9, 0.05, 0.03, 0.01, 0.01, 0.0],  # label 0: top-1 hit
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5 -> top-5 hit only
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: last -> miss
        [0.0, 0.0, 1.0, 0.0, 0.5, 0.0],  # label 4: rank 2
    ])
    labels = torch.tensor([0, 1, 5, 4])
    assert topk_accuracy(logits, labels) == {"top1": 25.0, "top5": 75.0}
    assert topk_accuracy(logits, labels, ks=(2,)) == {"top2": 50.0}
    # k is capped at the number of classes (and the key says so).
    assert topk_accuracy(logits[:, :3], torch.tensor([0, 1, 2, 2]), ks=(1, 5)) == {"top1": 50.0, "top3": 100.0}


# ---------------------------------------------------------------------------------- the vote as it was (reference)
@torch.no_grad()
def _old_knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     num_classes: int, k: int, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """The CPU vote before the kNN stage moved to the GPU, kept verbatim as the reference."""
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


def _old_knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperature=0.07):
    res = {}
    for k in ks:
        pred = _old_knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)
        res[f"knn_top1_k{k}"] = 100.0 * (pred == test_labels).float().mean().item()
    return res


@pytest.mark.parametrize("n_train,n_test,dim,classes", [(5000, 1000, 64, 10), (300, 2500, 16, 7), (40, 3, 8, 3)])
def test_vote_on_the_cpu_is_bit_identical_to_the_original(n_train: int, n_test: int, dim: int, classes: int) -> None:
    """The tiny stage's sizes (5000 gallery, 1000 queries: one 1024-row chunk), several chunks, k above the
    gallery: the same scores to the bit and the same accuracies."""
    g = torch.Generator().manual_seed(n_train)
    train, test = torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    for k in (1, 20, 200):
        assert torch.equal(knn_predict(train, labels, test, classes, k), _old_knn_predict(train, labels, test,
                                                                                          classes, k))
    ks = (20, 200)
    assert knn_accuracy(train, labels, test, test_labels, classes, ks) == _old_knn_accuracy(
        train, labels, test, test_labels, classes, ks)


def test_vote_chunk_bounds_the_similarity_memory() -> None:
    assert vote_chunk(5000) == VOTE_CHUNK == 1024  # tiny: unchanged
    imagenet = vote_chunk(1_281_167)
    assert imagenet == 209 and imagenet * 1_281_167 * 4 <= VOTE_BYTES
    assert vote_chunk(10**12) == 1


# ------------------------------------------------------------------------------------------- shards and gathering
@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (7, 2), (5, 5), (1, 1), (1281, 8)])
def test_interleave_puts_the_shards_back_in_dataset_order(n: int, world: int) -> None:
    rows = torch.arange(n * 2).view(n, 2)
    sizes = shard_sizes(n, world)
    assert sum(sizes) == n and sizes[0] == max(sizes) and max(sizes) - min(sizes) <= 1
    # each rank's shard (items rank::world), padded at its end as all_gather needs it
    parts = []
    for r in range(world):
        shard = rows[r::world]
        parts.append(torch.cat([shard, torch.full((sizes[0] - len(shard), 2), -1)]))
    assert torch.equal(interleave(parts, n), rows)


def test_extract_keeps_the_order_and_the_device_path_is_the_same() -> None:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 3, 4, 4, generator=g), torch.randint(0, 5, (11,), generator=g)
    ds = TensorDataset(x, y)
    w = torch.randn(48, 6, generator=g)
    fn = lambda t: t.flatten(1) @ w  # noqa: E731
    f, lab = extract(fn, ds, 4, torch.device("cpu"))
    assert torch.equal(f, fn(x).float()) and torch.equal(lab, y)
    f2, lab2 = extract(fn, ds, 4, torch.device("cpu"), num_workers=1, to_cpu=False)
    assert torch.equal(f2, f) and torch.equal(lab2, lab)


def test_extract_copies_features_out_of_reused_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that returns the same buffer every batch (a CUDA graph's static output) still gives each batch's
    features, on the CPU path and kept on the device, and every batch starts a CUDA-graph iteration."""
    from torch.utils.data import TensorDataset

    import repro.evals.knn as knn_mod

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 4, 4, generator=g), torch.randint(0, 5, (10,), generator=g)
    w = torch.randn(48, 6, generator=g)
    out = torch.empty(4, 6)
    marks = []
    monkeypatch.setattr(knn_mod, "new_iteration", lambda: marks.append(1))

    def fn(t: torch.Tensor) -> torch.Tensor:
        return out[: len(t)].copy_(t.flatten(1) @ w)

    for to_cpu in (True, False):
        marks.clear()
        f, _ = extract(fn, TensorDataset(x, y), 4, torch.device("cpu"), to_cpu=to_cpu)
        assert torch.allclose(f, x.flatten(1) @ w) and len(marks) == 3


def test_knn_curve_runs_as_the_knn_stage_and_workers_change_nothing() -> None:
    """Pretraining's kNN curve (``train.knn_every``): the epochs it skips return nothing; with loader workers and the
    vote where the features are, the accuracy is the one without workers."""
    from repro.engine.dist import setup
    from repro.methods import get_method
    from repro.pretrain import knn_curve
    from repro.resolve import resolve

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        micro = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
        cfg = resolve("mae", "tiny", [*micro, "train.num_workers=0"], kind="pretrain")
        torch.manual_seed(0)
        method = get_method("mae")(cfg).eval()
        env = setup("cpu")
        assert knn_curve(method, cfg, env, 2)(1) == {}
        got = knn_curve(method, cfg, env, 1)(1)
        cfg2 = resolve("mae", "tiny", [*micro, "train.num_workers=2"], kind="pretrain")
        assert knn_curve(method, cfg2, env, 1)(1) == got
        assert set(got) == {"knn_top1_k20"} and 0.0 <= got["knn_top1_k20"] <= 100.0
    finally:
        torch.set_num_threads(n)
