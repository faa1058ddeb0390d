"""Dense-prediction layouts of the embedded shapes data (ADE20K and COCO), and checks of real ADE20K / COCO roots.

Every synthetic image already knows its objects (category, box, visible mask; ``repro.data.synthetic``), so the
same images are written in the two layouts the transfer frameworks read:

ADE20K (``ensure_ade``; mmsegmentation's ``ADE20KDataset`` layout)::

    images/{training,validation}/<index:06d>.png      RGB (PNG here; the real ADE20K has .jpg)
    annotations/{training,validation}/<index:06d>.png  uint8 class map
    meta.json                                         version, classes, img_suffix, source dataset

Class ids follow ADE's convention: 0 is "other" (ignored under ``reduce_zero_label``, which maps 0 -> 255 and
k -> k - 1) and the 150 classes are 1..150. The embedded data takes the first ids of that space: the background is
a class of its own, id 1 (``ADE_BACKGROUND``; class index 0 after ``reduce_zero_label``), and shape category ``c``
is id ``c + 2`` (``ade_label``; class index ``c + 1``), so ``1 + num_classes`` classes are scored. The background is
scored (not "other") so that finding the objects counts, and so that the trivial baseline is the mIoU of predicting
background everywhere (``constant_miou``). The visible masks are disjoint, so the map is exact: a pixel holds the id
of the object whose visible mask covers it, else the background id; 0 is never written.

COCO (``ensure_coco``; ``pycocotools.coco.COCO`` / mmdet ``CocoDataset`` / detectron2 ``load_coco_json``)::

    train2017/<index:06d>.png, val2017/<index:06d>.png
    annotations/instances_{train,val}2017.json
    meta.json

Categories are ``{"id": c + 1, "name": CLASSES[c]}`` (COCO ids start at 1); images ``{"id": index + 1, ...}``;
annotations hold ``bbox`` (xywh), ``area`` (mask pixels), ``iscrowd: 0`` and ``segmentation`` as COCO uncompressed
RLE (``{"size": [h, w], "counts": [...]}``), which pycocotools, mmdet and detectron2 (bitmask format) all read.

Both folders are derived from ``ensure_synthetic``'s (same arguments), written atomically in the cache and versioned
by ``DENSE_VERSION`` (bump it when the layout changes).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repro.config import ConfigError
from repro.data._cache import atomic_dir, cache_root
from repro.data.synthetic import CLASSES, dataset_dirname, ensure_synthetic, load_objects, rle_to_mask

DENSE_VERSION: int = 2
ADE_NUM_CLASSES = 150
ADE_OTHER = 0  # ADE20K's "other" id: ignored under reduce_zero_label
ADE_BACKGROUND = 1  # the embedded data's background class (class index 0 after reduce_zero_label)
ADE_SPLITS = {"train": "training", "val": "validation"}
COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def ade_label(category: int) -> int:
    """ADE20K annotation value of shape category ``category`` (class index ``category + 1`` after reduce_zero_label;
    index 0 is the background)."""
    if not 0 <= category < ADE_NUM_CLASSES - 1:
        raise ValueError(f"category {category} outside ADE20K's 150 classes (the first is the background)")
    return category + 2


def class_map(objects: list[dict], size: tuple[int, int]) -> np.ndarray:
    """(h, w) uint8 ADE class map of one image's objects (each with a ``segmentation`` RLE), background elsewhere."""
    out = np.full(size, ADE_BACKGROUND, np.uint8)
    for o in objects:
        out[rle_to_mask(o["segmentation"])] = ade_label(o["category"])
    return out


def _source(img_size: int, n_train: int, n_val: int, num_classes: int, seed: int, progress: bool,
            root: str | os.PathLike | None) -> tuple[Path, str]:
    src = ensure_synthetic(root, img_size=img_size, n_train=n_train, n_val=n_val, num_classes=num_classes,
                           seed=seed, progress=progress)
    return src, dataset_dirname(img_size=img_size, n_train=n_train, n_val=n_val, num_classes=num_classes, seed=seed)


def _index(rel: str) -> int:
    return int(Path(rel).stem)


def _meta(layout: str, name: str, num_classes: int, img_size: int) -> dict[str, Any]:
    """meta.json; ``classes`` are the scored classes in index order (ADE: the background first)."""
    classes = list(CLASSES[:num_classes])
    return {"name": f"synthetic-shapes-{layout}", "version": DENSE_VERSION, "layout": layout, "source": name,
            "classes": ["background", *classes] if layout == "ade20k" else classes, "num_classes": num_classes,
            "img_size": img_size, "img_suffix": ".png", "seg_map_suffix": ".png"}


def ensure_ade(root: str | os.PathLike | None = None, *, img_size: int = 64, n_train: int = 1000, n_val: int = 250,
               num_classes: int = 10, seed: int = 0, progress: bool = False) -> Path:
    """The embedded shapes in ADE20K layout (see the module docstring), generated atomically on first use."""
    src, name = _source(img_size, n_train, n_val, num_classes, seed, progress, root)
    final = cache_root(root) / f"dense-v{DENSE_VERSION}-ade-{name}"
    if final.is_dir():
        return final
    with atomic_dir(final) as tmp:
        for split, ade in ADE_SPLITS.items():
            (tmp / "images" / ade).mkdir(parents=True)
            (tmp / "annotations" / ade).mkdir(parents=True)
            for rel, objs in sorted(load_objects(src, split).items()):
                stem = f"{_index(rel):06d}"
                shutil.copyfile(src / rel, tmp / "images" / ade / f"{stem}.png")
                Image.fromarray(class_map(objs, (img_size, img_size))).save(
                    tmp / "annotations" / ade / f"{stem}.png", compress_level=1)
        (tmp / "meta.json").write_text(json.dumps(_meta("ade20k", name, num_classes, img_size), indent=2))
    return final


def coco_json(objects: Mapping[str, list[dict]], img_size: int, num_classes: int) -> dict[str, Any]:
    """COCO instances dict of one split (``objects``: ``load_objects``'s mapping)."""
    images, anns = [], []
    for rel, objs in sorted(objects.items(), key=lambda kv: _index(kv[0])):
        image_id = _index(rel) + 1
        images.append({"id": image_id, "file_name": f"{_index(rel):06d}.png", "height": img_size, "width": img_size})
        for o in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": o["category"] + 1,
                         "bbox": [float(v) for v in o["bbox"]], "area": float(o["area"]), "iscrowd": 0,
                         "segmentation": o["segmentation"]})
    cats = [{"id": c + 1, "name": CLASSES[c], "supercategory": "shape"} for c in range(num_classes)]
    return {"info": {"description": "repro synthetic shapes", "version": str(DENSE_VERSION)},
            "images": images, "annotations": anns, "categories": cats}


def ensure_coco(root: str | os.PathLike | None = None, *, img_size: int = 64, n_train: int = 1000, n_val: int = 250,
                num_classes: int = 10, seed: int = 0, progress: bool = False) -> Path:
    """The embedded shapes in COCO instances layout (see the module docstring), generated atomically on first use."""
    src, name = _source(img_size, n_train, n_val, num_classes, seed, progress, root)
    final = cache_root(root) / f"dense-v{DENSE_VERSION}-coco-{name}"
    if final.is_dir():
        return final
    with atomic_dir(final) as tmp:
        (tmp / "annotations").mkdir()
        for split, folder in COCO_SPLITS.items():
            (tmp / folder).mkdir()
            objs = load_objects(src, split)
            for rel in objs:
                shutil.copyfile(src / rel, tmp / folder / f"{_index(rel):06d}.png")
            with open(tmp / "annotations" / f"instances_{folder}.json", "w") as f:
                json.dump(coco_json(objs, img_size, num_classes), f, separators=(",", ":"))
        (tmp / "meta.json").write_text(json.dumps(_meta("coco", name, num_classes, img_size), indent=2))
    return final


# ------------------------------------------------------------------------------------------- real roots, checked


def _first_file(folder: Path, suffixes: tuple[str, ...]) -> Path | None:
    return next((p for p in sorted(folder.iterdir()) if p.suffix in suffixes), None) if folder.is_dir() else None


def check_ade_root(path: str | os.PathLike | None) -> str:
    """Refuse (one line naming what is missing) a real ADE20K root; return its image suffix (``.jpg`` normally).

    Expected: ``ADEChallengeData2016`` as released, i.e. ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``."""
    hint = "pass data.path=/path/to/ADEChallengeData2016 (images/{training,validation}, annotations/...)"
    if not path:
        raise ConfigError(f"data.path is not set for dataset 'ade20k'; {hint}")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.path={root} does not exist; {hint}")
    suffix = ""
    for ade in ADE_SPLITS.values():
        img = _first_file(root / "images" / ade, (".jpg", ".jpeg", ".png"))
        if img is None:
            raise ConfigError(f"data.path={root} has no images in images/{ade}/; {hint}")
        suffix = img.suffix
        ann = root / "annotations" / ade / f"{img.stem}.png"
        if not ann.is_file():
            raise ConfigError(f"data.path={root}: annotations/{ade}/{ann.name} (the class map of {img.name}) "
                              f"is missing; {hint}")
    return suffix


def check_coco_root(path: str | os.PathLike | None) -> None:
    """Refuse (one line naming the missing folder or file) a real COCO 2017 root."""
    hint = "pass data.path=/path/to/coco (train2017/, val2017/, annotations/instances_{train,val}2017.json)"
    if not path:
        raise ConfigError(f"data.path is not set for dataset 'coco'; {hint}")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.path={root} does not exist; {hint}")
    for folder in COCO_SPLITS.values():
        if _first_file(root / folder, (".jpg", ".jpeg", ".png")) is None:
            raise ConfigError(f"data.path={root} has no images in {folder}/; {hint}")
        ann = root / "annotations" / f"instances_{folder}.json"
        if not ann.is_file():
            raise ConfigError(f"data.path={root}: annotations/{ann.name} is missing; {hint}")


def dense_root(data: Mapping[str, Any], layout: str, progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """(root, info) of the data of a dense stage: the embedded shapes in ``layout`` ('ade20k' | 'coco') when
    ``data.dataset`` is ``synthetic``, else the checked real root. ``info`` has ``img_suffix`` and ``classes``
    (None for a real root: the framework's own class list)."""
    if layout not in ("ade20k", "coco"):
        raise ValueError(f"unknown dense layout '{layout}'")
    name = data["dataset"]
    if name == "synthetic":
        make = ensure_ade if layout == "ade20k" else ensure_coco
        root = make(img_size=data["img_size"], n_train=data["synthetic_train"], n_val=data["synthetic_val"],
                    num_classes=data["synthetic_classes"], seed=int(data.get("synthetic_seed", 0)), progress=progress)
        meta = json.loads((root / "meta.json").read_text())
        return root, {"img_suffix": meta["img_suffix"], "classes": meta["classes"]}
    if name != layout:
        raise ConfigError(f"data.dataset='{name}' cannot feed a {layout} stage; use data.dataset={layout} "
                          "(with data.path) or synthetic")
    if layout == "ade20k":
        return Path(data["path"]), {"img_suffix": check_ade_root(data.get("path")), "classes": None}
    check_coco_root(data.get("path"))
    return Path(data["path"]), {"img_suffix": ".jpg", "classes": None}


def constant_miou(root: str | os.PathLike, split: str = "val") -> float:
    """mIoU (percent, mmseg's IoUMetric convention: classes absent from both prediction and truth skipped) of the
    best constant prediction over an ADE-layout split (on the embedded data: background everywhere), the trivial
    baseline a segment stage must beat."""
    counts: dict[int, int] = {}
    for p in sorted((Path(root) / "annotations" / ADE_SPLITS[split]).glob("*.png")):
        ids, n = np.unique(np.asarray(Image.open(p)), return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            if i != ADE_OTHER:
                counts[i] = counts.get(i, 0) + c
    if not counts:
        return 0.0
    total = sum(counts.values())
    # Predicting class c everywhere: IoU_c = n_c / total, every other present class 0.
    return 100.0 * max(counts.values()) / total / len(counts)
