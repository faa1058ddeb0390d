"""Weighted kNN (DINO protocol) and top-k accuracy on hand-made examples with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from repro.evals.knn import knn_accuracy, knn_predict, topk_accuracy


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
