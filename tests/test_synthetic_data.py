"""Tests for the generated datasets: synthetic shapes (repro.data.synthetic) and sklearn digits (repro.data.digits)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.datasets import ImageFolder

from repro.data import synthetic as S
from repro.data._cache import cache_root
from repro.data.digits import ensure_digits
from repro.data.synthetic import CLASSES, ensure_synthetic, load_objects, mask_to_rle, render_scene, rle_to_mask

SMALL = {"img_size": 32, "n_train": 60, "n_val": 20, "num_classes": 10, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A medium dataset shared by the layout and classifier tests."""
    root = tmp_path_factory.mktemp("shapes")
    return ensure_synthetic(root, img_size=32, n_train=1000, n_val=300, num_classes=10, seed=0, progress=False)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_across_roots_and_workers(tmp_path: Path) -> None:
    a = ensure_synthetic(tmp_path / "a", **SMALL)
    b = ensure_synthetic(tmp_path / "b", **SMALL, workers=2)
    assert a.name == b.name == f"synthetic-v{S.SYNTH_VERSION}-10c-32px-60-20-s3"
    fa, fb = _files(a), _files(b)
    assert len(fa) == 60 + 20 + 3 and fa == fb
    c = ensure_synthetic(tmp_path / "c", **{**SMALL, "seed": 4})
    assert _files(c)["train/arrow/000000.png"] != fa["train/arrow/000000.png"]


def test_render_scene_contract() -> None:
    img, objs = render_scene(np.random.default_rng(0), 48, 5)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert objs[0]["category"] == 5 and 1 <= len(objs) <= 3
    assert all(o["mask"].shape == (48, 48) and o["mask"].dtype == bool for o in objs)
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), 32, 3, num_classes=3)


def test_imagefolder_layout(shapes: Path) -> None:
    assert len(CLASSES) >= 10
    meta = json.loads((shapes / "meta.json").read_text())
    assert meta["version"] == S.SYNTH_VERSION and meta["classes"] == list(CLASSES[:10]) and meta["seed"] == 0
    for split, n in (("train", 1000), ("val", 300)):
        ds = ImageFolder(str(shapes / split))
        assert ds.classes == list(CLASSES[:10])  # sorted names: ImageFolder index == category
        assert len(ds) == n
        counts = np.bincount(ds.targets, minlength=10)
        assert counts.min() == counts.max() == n // 10
        img, _ = ds[0]
        assert img.size == (32, 32) and img.mode == "RGB"


def test_objects_json(shapes: Path) -> None:
    for split in ("train", "val"):
        objs = load_objects(shapes, split, decode_masks=True)
        assert len(objs) == len(list((shapes / split).rglob("*.png")))
        for rel, lst in objs.items():
            assert (shapes / rel).is_file()
            assert lst[0]["category"] == CLASSES.index(Path(rel).parent.name)
            for o in lst:
                m = o["mask"]
                assert m.shape == (32, 32) and m.any() and o["area"] == int(m.sum())
                x, y, w, h = o["bbox"]
                assert min(x, y) >= 0 and x + w <= 32 and y + h <= 32
                rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
                assert abs(cols[0] - x) <= 1 and abs(cols[-1] + 1 - (x + w)) <= 1
                assert abs(rows[0] - y) <= 1 and abs(rows[-1] + 1 - (y + h)) <= 1
            main = lst[0]["mask"]
            assert all(not (o["mask"] & main).any() for o in lst[1:])  # the labelled object is never occluded


def test_rle_round_trip() -> None:
    rng = np.random.default_rng(0)
    cases = [np.zeros((5, 7), bool), np.ones((4, 3), bool), np.eye(6, dtype=bool)]
    cases += [rng.random((h, w)) < p for h, w, p in [(1, 1, 0.5), (9, 13, 0.3), (32, 32, 0.5), (17, 40, 0.9)]]
    for m in cases:
        rle = mask_to_rle(m)
        assert rle["size"] == list(m.shape) and sum(rle["counts"]) == m.size
        assert json.loads(json.dumps(rle)) == rle
        assert np.array_equal(rle_to_mask(rle), m)
    # COCO convention: column-major, counts start with a run of zeros (possibly empty).
    assert mask_to_rle(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]


def _colour_features(root: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = ImageFolder(str(root))
    feats = []
    for path, _ in ds.samples:
        px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3)
        hist = [np.histogram(px[:, k], bins=8, range=(0, 256))[0] / len(px) for k in range(3)]
        feats.append(np.concatenate([px.mean(0) / 255, *hist]))
    return np.array(feats), np.array(ds.targets)


def test_colour_statistics_do_not_solve_it(shapes: Path) -> None:
    xtr, ytr = _colour_features(shapes / "train")
    xva, yva = _colour_features(shapes / "val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    assert clf.score(xva, yva) < 0.35  # chance is 0.10


def _shape_features(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Rotation/scale-invariant descriptors of the labelled object's mask: radial profile, fill ratio, extremes."""
    feats, labels = [], []
    for _, lst in sorted(load_objects(root, split, decode_masks=True).items()):
        m = lst[0]["mask"]
        ys, xs = np.nonzero(m)
        rad = np.hypot(ys - ys.mean(), xs - xs.mean()) / np.sqrt(m.sum())
        prof = np.histogram(rad, bins=10, range=(0, 1.5))[0] / m.sum()
        feats.append(np.concatenate([prof, [m.sum() / (lst[0]["bbox"][2] * lst[0]["bbox"][3]), rad.min(), rad.max()]]))
        labels.append(lst[0]["category"])
    return np.array(feats), np.array(labels)


def test_shapes_are_geometrically_separable(shapes: Path) -> None:
    xtr, ytr = _shape_features(shapes, "train")
    xva, yva = _shape_features(shapes, "val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    assert clf.score(xva, yva) > 0.6


def test_atomic_and_cached(tmp_path: Path) -> None:
    name = S.dataset_dirname(img_size=32, n_train=60, n_val=20, num_classes=10, seed=3)
    crashed = tmp_path / f".{name}.tmp-12345-deadbeef"  # a crashed run's half-written temp dir
    (crashed / "train" / "arrow").mkdir(parents=True)
    (crashed / "train" / "arrow" / "000000.png").write_bytes(b"truncated")
    d = ensure_synthetic(tmp_path, **SMALL)
    assert d == tmp_path / name and (d / "meta.json").is_file()
    assert Image.open(d / "train" / "arrow" / "000000.png").size == (32, 32)
    stamp = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    assert ensure_synthetic(tmp_path, **SMALL) == d
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p != crashed]  # no new leftovers


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(S, "render_scene", boom)
    with pytest.raises(RuntimeError):
        ensure_synthetic(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("REPRO_CACHE")
    assert cache_root(None) == Path(os.path.expanduser("~")) / ".cache" / "repro"


def test_too_many_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(len(CLASSES))):
        ensure_synthetic(tmp_path, num_classes=len(CLASSES) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_digits(tmp_path: Path) -> None:
    d = ensure_digits(tmp_path, img_size=32, seed=0, progress=False)
    assert d.name == "digits-v1-32px-s0"
    train, val = ImageFolder(str(d / "train")), ImageFolder(str(d / "val"))
    assert train.classes == val.classes == [str(k) for k in range(10)]
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) <= 10
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["n_train"], meta["n_val"]) == (len(train), len(val))
    vc = np.bincount(val.targets, minlength=10)
    assert vc.min() >= 34 and vc.max() <= 38  # stratified: about 20% of each class (~180 per class)
    img, _ = train[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    names = {p.name for p in (d / "train").rglob("*.png")} | {p.name for p in (d / "val").rglob("*.png")}
    assert len(names) == 1797  # disjoint splits
    assert ensure_digits(tmp_path, img_size=32, seed=0, progress=False) == d
