"""scikit-learn's bundled handwritten digits (1797 8x8 images, no download) as an ImageFolder dataset.

Layout of ``ensure_digits(...)``'s directory: ``train/<digit>/<index:06d>.png``, ``val/<digit>/<index:06d>.png``
(``index`` is the sample's position in ``load_digits()``), and ``meta.json``. Images are upsampled to ``img_size``
with bicubic interpolation and stored as RGB (grey replicated). The split is stratified: in every class the same
seeded permutation puts ``round(val_fraction * n_class)`` samples in val and the rest in train.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from repro.data._cache import atomic_dir, cache_root

DIGITS_VERSION: int = 1


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of sample indices into (train, val), both sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * idx.size))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def ensure_digits(
    root: str | os.PathLike | None = None,
    *,
    img_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Return the digits dataset directory, writing it atomically on first use (see module docstring)."""
    from sklearn.datasets import load_digits  # imported lazily: only needed on first use

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8, got {img_size}")
    # val_fraction changes the split, so it is part of the name unless it is the default.
    frac = "" if val_fraction == 0.2 else f"-val{val_fraction:g}"
    final = cache_root(root) / f"digits-v{DIGITS_VERSION}-{img_size}px{frac}-s{seed}"
    if final.is_dir():
        return final

    data = load_digits()
    images = np.clip(data.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # values 0..16 -> 0..255
    labels = np.asarray(data.target)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    classes = [str(c) for c in range(10)]
    with atomic_dir(final) as tmp:
        for split in ("train", "val"):
            for name in classes:
                (tmp / split / name).mkdir(parents=True)
        jobs = [("train", int(i)) for i in train_idx] + [("val", int(i)) for i in val_idx]
        show = progress and sys.stderr.isatty()  # a bar on a terminal; never carriage returns in a log file
        for split, i in tqdm(jobs, desc=f"digits {final.name}", disable=not show, unit="img"):
            img = Image.fromarray(images[i]).resize((img_size, img_size), Image.Resampling.BICUBIC).convert("RGB")
            img.save(tmp / split / str(labels[i]) / f"{i:06d}.png")
        meta = {
            "name": "sklearn-digits",
            "version": DIGITS_VERSION,
            "classes": classes,
            "img_size": img_size,
            "val_fraction": val_fraction,
            "n_train": int(train_idx.size),
            "n_val": int(val_idx.size),
            "seed": seed,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
    return final
