"""Deterministic procedural "shapes" dataset in ImageFolder layout, with per-object boxes and masks.

Each image shows one labelled shape (its class) plus 0-2 smaller distractor shapes of other classes (probabilities
``DISTRACTOR_P``), drawn *under* the labelled one so it is never occluded. Colour carries no class information:
background colour and texture (gradient, stripes, blobs or smooth noise), object colour, position, scale
(``MAIN_SCALE``: 50-85% of the image), rotation and aspect jitter are all random and independent of the label, so only
shape identifies the class. Version 2 fixes the contrast's polarity (light backgrounds, dark objects, any hue): with
v1's random polarity a 32-px ViT learnt ~4x slower (measured: 11% vs 38% top-1 after 15k images, same geometry).
Shapes are rasterised with numpy on a supersampled grid and box-filtered down (anti-aliasing).

Layout of ``ensure_synthetic(...)``'s directory::

    meta.json                       version, classes, sizes, seed
    train/<class>/<index:06d>.png   label = index % num_classes
    val/<class>/<index:06d>.png
    train_objects.json              {"train/<class>/<index>.png": [object, ...], ...}
    val_objects.json

Each object is ``{"category": int, "bbox": [x, y, w, h], "area": int, "segmentation": rle}``: ``bbox`` is COCO xywh
in pixels (tight box of the visible mask), ``segmentation`` is COCO's *uncompressed* column-major RLE
``{"size": [h, w], "counts": [...]}`` of the visible mask (see ``mask_to_rle`` / ``rle_to_mask``). The first object
is the labelled one. ``CLASSES`` is sorted so ImageFolder's class index equals ``category``.

Measured generation rate (one process, PNG + json writing included, shared 2-core dev container, load ~2.5):
about 33,000-35,000 images/minute at 32px and 15,000-17,000 images/minute at 64px. A 2-process pool gained
little there, so ``ensure_synthetic`` only uses one for big datasets; its workers are spawned, never forked (the
caller may run torch threads, and a fork after threads can deadlock).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from repro.data._cache import atomic_dir, cache_root

SYNTH_VERSION: int = 2

# Sorted alphabetically so torchvision's ImageFolder (which sorts folder names) assigns index == category.
CLASSES: tuple[str, ...] = (
    "arrow",
    "crescent",
    "cross",
    "disk",
    "frame",
    "heart",
    "hexagon",
    "lshape",
    "ring",
    "square",
    "star",
    "triangle",
)
assert list(CLASSES) == sorted(CLASSES)

SPLITS = ("train", "val")
# Scene difficulty: the labelled object's size as a fraction of the image, and how many distractors (0, 1, 2).
MAIN_SCALE: tuple[float, float] = (0.5, 0.85)
DISTRACTOR_P: tuple[float, float, float] = (0.6, 0.3, 0.1)
# Colour ranges per RGB channel: backgrounds light, objects dark (any hue), so contrast has one polarity.
BG_RANGE: tuple[float, float] = (150.0, 255.0)
FG_RANGE: tuple[float, float] | None = (0.0, 100.0)  # None: v1's random colour contrasting with the background
_Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------- shape definitions
# Every shape is a predicate on local coordinates (u, v), v pointing down, fitting roughly in the unit disk.


def _polygon(verts: Iterable[tuple[float, float]]) -> _Shape:
    """Even-odd point-in-polygon test, vectorised over the edges."""
    p = np.asarray(list(verts), dtype=np.float32)
    x0, y0 = p[:, 0][:, None], p[:, 1][:, None]
    x1, y1 = np.roll(p[:, 0], -1)[:, None], np.roll(p[:, 1], -1)[:, None]

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        uf, vf = u.reshape(1, -1), v.reshape(1, -1)
        straddle = (y0 > vf) != (y1 > vf)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = x0 + (vf - y0) * (x1 - x0) / (y1 - y0)
        return (np.count_nonzero(straddle & (uf < xcross), axis=0) % 2 == 1).reshape(u.shape)

    return inside


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> list[tuple[float, float]]:
    a = phase + 2 * np.pi * np.arange(n) / n
    return list(zip(r * np.cos(a), r * np.sin(a)))


def _star(n: int, r_out: float, r_in: float) -> list[tuple[float, float]]:
    a = -np.pi / 2 + np.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return list(zip(r * np.cos(a), r * np.sin(a)))


def _disk(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rr = u * u + v * v
    return (rr <= 1.0) & (rr >= 0.5**2)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.82) & (m >= 0.45)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.25, -(v * 1.25 - 0.15)  # implicit heart curve, lobes up
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


_SHAPES: dict[str, _Shape] = {
    "arrow": _polygon([(-0.9, -0.22), (0.1, -0.22), (0.1, -0.6), (0.9, 0.0), (0.1, 0.6), (0.1, 0.22), (-0.9, 0.22)]),
    "crescent": _crescent,
    "cross": _polygon(
        [
            (-0.28, -0.9),
            (0.28, -0.9),
            (0.28, -0.28),
            (0.9, -0.28),
            (0.9, 0.28),
            (0.28, 0.28),
            (0.28, 0.9),
            (-0.28, 0.9),
            (-0.28, 0.28),
            (-0.9, 0.28),
            (-0.9, -0.28),
            (-0.28, -0.28),
        ]
    ),
    "disk": _disk,
    "frame": _frame,
    "heart": _heart,
    "hexagon": _polygon(_regular(6, 0.95)),
    "lshape": _polygon([(-0.7, -0.8), (-0.15, -0.8), (-0.15, 0.25), (0.7, 0.25), (0.7, 0.8), (-0.7, 0.8)]),
    "ring": _ring,
    "square": _square,
    "star": _polygon(_star(5, 1.0, 0.42)),
    "triangle": _polygon([(x, y + 0.2) for x, y in _regular(3, 1.05)]),  # shifted so the centroid is near 0
}
assert set(_SHAPES) == set(CLASSES)


# ------------------------------------------------------------------------------------------------------ RLE codec


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a HxW bool mask as COCO uncompressed RLE (column-major; counts start with the number of zeros)."""
    m = np.asarray(mask, dtype=bool)
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode COCO uncompressed RLE (as written by ``mask_to_rle``) to a HxW bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    vals = np.arange(counts.size) % 2 == 1
    flat = np.repeat(vals, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h * w}")
    return flat.reshape((h, w), order="F")


def bbox_of(mask: np.ndarray) -> list[float]:
    """Tight COCO xywh box (pixels) of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


# --------------------------------------------------------------------------------------------------- rendering


def _supersample(img_size: int) -> int:
    return int(np.clip(256 // img_size, 2, 4))


def _coverage(rng: np.random.Generator, img_size: int, shape: _Shape, scale: float, ss: int) -> np.ndarray:
    """Random placement of ``shape`` at ``scale`` (fraction of the image); returns HxW float32 pixel coverage."""
    r = 0.5 * img_size * scale  # radius of the unit disk in pixels
    aspect = np.sqrt(np.exp(rng.uniform(-0.2, 0.2)))
    theta = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(r * 0.9, img_size - r * 0.9, size=2)
    # Only evaluate the shape in a window that surely contains it (every shape lies within radius 1.2).
    reach = 1.2 * r * max(aspect, 1 / aspect)
    x0, x1 = max(int(cx - reach), 0), min(int(np.ceil(cx + reach)), img_size)
    y0, y1 = max(int(cy - reach), 0), min(int(np.ceil(cy + reach)), img_size)
    out = np.zeros((img_size, img_size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    gx = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss - cx
    gy = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss - cy
    c, s = np.cos(theta), np.sin(theta)
    u = (c * gx[None, :] + s * gy[:, None]) / (r * aspect)
    v = (-s * gx[None, :] + c * gy[:, None]) * aspect / r
    hit = shape(u, v).astype(np.float32)
    out[y0:y1, x0:x1] = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random base colour modulated by a random texture; HxWx3 float32 in [0, 255]."""
    c1 = rng.uniform(*BG_RANGE, size=3)
    c2 = np.clip(c1 + rng.normal(0, 45, size=3), *BG_RANGE)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5) + 0.5
    elif kind == 1:  # sinusoidal stripes
        a, f, ph = rng.uniform(0, np.pi), rng.uniform(1.5, 6.0), rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * x + np.sin(a) * y) + ph)
    elif kind == 2:  # gaussian blobs
        t = np.zeros((n, n), np.float32)
        for _ in range(rng.integers(3, 7)):
            bx, by, bs = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
            t += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * bs * bs))
        t = t / max(float(t.max()), 1e-6)
    else:  # smooth value noise: coarse random grid, bilinearly upsampled
        g = rng.uniform(0, 1, size=(5, 5)).astype(np.float32)
        gi = np.linspace(0, 4, n)
        i0 = np.clip(gi.astype(int), 0, 3)
        f = (gi - i0)[:, None]
        rows = g[i0] * (1 - f) + g[i0 + 1] * f
        t = rows[:, i0] * (1 - f.T) + rows[:, i0 + 1] * f.T
    t = np.clip(t, 0, 1)[..., None]
    return (c1 * (1 - t) + c2 * t).astype(np.float32)


_LUMA = np.array([0.299, 0.587, 0.114])


def _contrasting_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """Random RGB colour whose luma and RGB distance differ enough from every colour in ``avoid``."""
    cand = rng.uniform(0, 255, size=(32, 3))
    ref = np.stack(avoid)  # (k, 3)
    dluma = np.abs(cand @ _LUMA - (ref @ _LUMA)[:, None]) / 60.0  # (k, 32)
    dist = np.linalg.norm(cand[None] - ref[:, None], axis=-1) / 110.0
    score = np.minimum(dluma, dist).min(axis=0)
    ok = np.flatnonzero(score >= 1.0)
    return cand[ok[0] if ok.size else int(np.argmax(score))]


def _object_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """An object's colour: any hue in ``FG_RANGE`` (darker than every background), or v1's contrasting colour."""
    if FG_RANGE is None:
        return _contrasting_colour(rng, avoid)
    return rng.uniform(*FG_RANGE, size=3)


def render_scene(
    rng: np.random.Generator, img_size: int, label: int, *, num_classes: int | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Render one image whose main (first, on-top) object has class ``label``.

    Distractors are drawn from the other classes among the first ``num_classes`` (default: all).
    Returns an ``img_size x img_size x 3`` uint8 image and its objects ``[{"category", "bbox" (xywh floats),
    "mask" (HxW bool, visible part)}]``; the first object is the labelled one and is never occluded.
    """
    nc = len(CLASSES) if num_classes is None else num_classes
    if not 0 <= label < nc <= len(CLASSES):
        raise ValueError(f"need 0 <= label ({label}) < num_classes ({nc}) <= {len(CLASSES)}")
    ss = _supersample(img_size)
    bg = _background(rng, img_size)
    bg_mean = bg.reshape(-1, 3).mean(0)

    main_scale = rng.uniform(*MAIN_SCALE)
    main_cov = _coverage(rng, img_size, _SHAPES[CLASSES[label]], main_scale, ss)
    main_col = _object_colour(rng, [bg_mean])

    # Distractors: other classes, at most ~60% of the main object's size, barely touching it.
    layers: list[tuple[int, np.ndarray, np.ndarray]] = []
    others = [k for k in range(nc) if k != label]
    for _ in range(rng.choice(3, p=list(DISTRACTOR_P)) if others else 0):
        cat = int(rng.choice(others))
        for _try in range(6):
            cov = _coverage(rng, img_size, _SHAPES[CLASSES[cat]], rng.uniform(0.12, min(0.28, 0.6 * main_scale)), ss)
            area = float(cov.sum())
            if area > 2 and float((cov * main_cov).sum()) < 0.15 * area:
                layers.append((cat, cov, _object_colour(rng, [bg_mean, main_col])))
                break

    img = bg
    for _, cov, col in [*layers, (label, main_cov, main_col)]:
        shade = 1.0 + rng.uniform(-0.12, 0.12) * (np.linspace(-1, 1, img_size)[None, :, None])  # mild shading
        fg = np.clip(col * shade, 0, 255)
        a = cov[..., None]
        img = img * (1 - a) + fg * a
    img = img + rng.normal(0, 3.0, size=img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # Visible masks: a pixel belongs to the topmost layer covering at least half of it.
    main_mask = main_cov >= 0.5
    objects = [{"category": int(label), "bbox": bbox_of(main_mask), "mask": main_mask}]
    above = main_mask.copy()
    for cat, cov, _ in reversed(layers):
        m = (cov >= 0.5) & ~above
        above |= cov >= 0.5
        if m.sum() >= 3:
            objects.append({"category": cat, "bbox": bbox_of(m), "mask": m})
    return image, objects


# ------------------------------------------------------------------------------------------------ dataset files


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SYNTH_VERSION, seed, SPLITS.index(split), index])


def _make_one(job: tuple[str, str, int, int, int, int]) -> tuple[str, list[dict]]:
    """Render image ``index`` of ``split``, write its PNG under ``root`` and return (relpath, json objects)."""
    root, split, index, img_size, seed, num_classes = job
    label = index % num_classes
    image, objects = render_scene(_image_rng(seed, split, index), img_size, label, num_classes=num_classes)
    rel = f"{split}/{CLASSES[label]}/{index:06d}.png"
    Image.fromarray(image).save(os.path.join(root, rel), compress_level=1)
    out = [
        {
            "category": o["category"],
            "bbox": o["bbox"],
            "area": int(o["mask"].sum()),
            "segmentation": mask_to_rle(o["mask"]),
        }
        for o in objects
    ]
    return rel, out


def dataset_dirname(*, img_size: int, n_train: int, n_val: int, num_classes: int, seed: int) -> str:
    return f"synthetic-v{SYNTH_VERSION}-{num_classes}c-{img_size}px-{n_train}-{n_val}-s{seed}"


def ensure_synthetic(
    root: str | os.PathLike | None = None,
    *,
    img_size: int = 32,
    n_train: int = 4000,
    n_val: int = 1000,
    num_classes: int = 10,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Return the synthetic dataset directory, generating it atomically on first use (see module docstring).

    ``workers``: processes used to generate (None: 2 for large datasets if 2+ CPUs, else 1); output is identical.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(
            f"num_classes={num_classes} not supported: must be between 1 and {len(CLASSES)} "
            f"(the number of shape classes)"
        )
    if img_size < 8 or n_train < 0 or n_val < 0 or seed < 0:
        raise ValueError(f"bad arguments: img_size={img_size} (>= 8), n_train={n_train}, n_val={n_val}, seed={seed}")
    final = cache_root(root) / dataset_dirname(
        img_size=img_size, n_train=n_train, n_val=n_val, num_classes=num_classes, seed=seed
    )
    if final.is_dir():
        return final

    total = n_train + n_val
    if workers is None:  # a pool only pays off for big datasets (process start-up, result pickling)
        workers = min(2, os.cpu_count() or 1) if total * (img_size / 32) ** 2 >= 20000 else 1
    with atomic_dir(final) as tmp:
        classes = CLASSES[:num_classes]
        for split in SPLITS:
            for name in classes:
                (tmp / split / name).mkdir(parents=True)
        jobs = [
            (str(tmp), split, i, img_size, seed, num_classes)
            for split, n in zip(SPLITS, (n_train, n_val))
            for i in range(n)
        ]
        objects: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
        show = progress and sys.stderr.isatty()  # a bar on a terminal; never carriage returns in a log file
        bar = tqdm(total=total, desc=f"synthetic {final.name}", disable=not show, unit="img")
        if workers > 1:
            # spawn, never fork: the caller may already run torch/OpenMP or tqdm threads, and a fork after threads
            # can deadlock in the child. Workers import only this module (numpy, PIL); start-up is under a second.
            pool = mp.get_context("spawn").Pool(workers)
            try:
                for rel, objs in pool.imap(_make_one, jobs, chunksize=64):
                    objects[rel.split("/", 1)[0]][rel] = objs
                    bar.update()
                pool.close()  # the workers exit on their own
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        else:
            for job in jobs:
                rel, objs = _make_one(job)
                objects[rel.split("/", 1)[0]][rel] = objs
                bar.update()
        bar.close()
        for split in SPLITS:
            with open(tmp / f"{split}_objects.json", "w") as f:
                json.dump(objects[split], f, separators=(",", ":"))
        meta = {
            "name": "synthetic-shapes",
            "version": SYNTH_VERSION,
            "classes": list(classes),
            "num_classes": num_classes,
            "img_size": img_size,
            "n_train": n_train,
            "n_val": n_val,
            "seed": seed,
            "objects_format": "category, bbox xywh px, area, segmentation = COCO uncompressed column-major RLE",
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
    return final


def load_objects(dataset_dir: str | os.PathLike, split: str, *, decode_masks: bool = False) -> dict[str, list[dict]]:
    """Read ``<split>_objects.json``; with ``decode_masks`` each object also gets a ``"mask"`` bool array."""
    with open(Path(dataset_dir) / f"{split}_objects.json") as f:
        objs: dict[str, list[dict]] = json.load(f)
    if decode_masks:
        for lst in objs.values():
            for o in lst:
                o["mask"] = rle_to_mask(o["segmentation"])
    return objs
