"""Datasets by name: the embedded procedural data, sklearn digits, or a real dataset by path (ImageFolder layout;
iNaturalist ``inat<year>``: its official json layout).

The embedded datasets are written in ImageNet's own on-disk layout, so one loader (torchvision ImageFolder) serves
both. A real dataset whose path is unset, missing or empty is refused with one line naming the option to set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from repro.config import ConfigError

EMBEDDED = ("synthetic", "digits")
IMG_EXT = (".jpg", ".jpeg", ".png", ".JPEG", ".bmp", ".webp")


def inat_year(name: str) -> int | None:
    """The year of an iNaturalist dataset name (``inat2019`` -> 2019), else None."""
    m = re.fullmatch(r"inat(\d{4})", name)
    return int(m.group(1)) if m else None


def check_dataset(data: Mapping[str, Any]) -> None:
    """Fail before any work when a real dataset's path is unusable."""
    name = data["dataset"]
    if name in EMBEDDED:
        return
    if inat_year(name) is not None:
        _check_inat(data)
        return
    path = data.get("path")
    hint = f"pass data.path=/path/to/{name} (a folder with train/<class>/* and val/<class>/*)"
    if not path:
        raise ConfigError(f"data.path is not set for dataset '{name}'; {hint}")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.path={root} does not exist; {hint}")
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise ConfigError(f"data.path={root} has no class folders under {split}/; {hint}")
        for cls in sorted(p for p in d.iterdir() if p.is_dir()):
            if not _has_decodable_image(cls):
                raise ConfigError(f"data.path={root}: class folder {split}/{cls.name} has no decodable image "
                                  f"({', '.join(IMG_EXT[:4])}...); {hint}")


def _check_inat(data: Mapping[str, Any]) -> None:
    """An iNaturalist root in the official layout: ``train<year>.json`` and ``val<year>.json`` beside the image
    folders their ``file_name`` entries point into."""
    name, path = data["dataset"], data.get("path")
    year = inat_year(name)
    hint = (f"pass data.path=/path/to/{name} (the official layout: train{year}.json, val{year}.json and the image "
            "folders they name)")
    if not path or not Path(path).is_dir():
        raise ConfigError(f"data.path={path} is not a folder for dataset '{name}'; {hint}")
    for split in ("train", "val"):
        ds = INatJson(Path(path), split, int(year or 0))
        if not ds.samples:
            raise ConfigError(f"data.path={path}: {split}{year}.json lists no annotated image; {hint}")
        first = Path(ds.samples[0][0])
        if not _has_decodable_image(first.parent, files=[first]):
            raise ConfigError(f"data.path={path}: {first} (the first image of {split}{year}.json) does not decode; "
                              f"{hint}")


def _has_decodable_image(folder: Path, tries: int = 8, files: list[Path] | None = None) -> bool:
    """True when one of the first ``tries`` image files of ``folder`` decodes."""
    from PIL import Image

    candidates = files if files is not None else (q for q in sorted(folder.iterdir()) if q.suffix in IMG_EXT)
    for n, p in enumerate(candidates):
        if n >= tries:
            return False
        try:
            with Image.open(p) as im:
                im.verify()
            return True
        except Exception:  # noqa: BLE001,S112 - any decoder error: try the next file
            continue
    return False


def dataset_root(data: Mapping[str, Any], progress: bool = True) -> Path:
    """Folder holding train/ and val/ (the embedded data is generated on first use)."""
    name = data["dataset"]
    if name == "synthetic":
        from repro.data.synthetic import ensure_synthetic

        return ensure_synthetic(img_size=data["img_size"], n_train=data["synthetic_train"],
                                n_val=data["synthetic_val"], num_classes=data["synthetic_classes"], progress=progress)
    if name == "digits":
        from repro.data.digits import ensure_digits

        return ensure_digits(img_size=data["img_size"], progress=progress)
    check_dataset(data)
    return Path(data["path"])


def normalize() -> transforms.Normalize:
    return transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _interp(data: Mapping[str, Any]) -> transforms.InterpolationMode:
    return transforms.InterpolationMode(data.get("interpolation", "bicubic"))


def crop_flip_transform(data: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """RandomResizedCrop(scale) + horizontal flip + normalise: MAE pretraining and linear probing."""
    return transforms.Compose([
        transforms.RandomResizedCrop(data["img_size"], scale=tuple(data.get("crop_scale", (0.08, 1.0))),
                                     interpolation=_interp(data)),
        transforms.RandomHorizontalFlip(data.get("hflip", 0.5)),
        transforms.ToTensor(),
        normalize(),
    ])


def eval_transform(data: Mapping[str, Any], crop_pct: float = 0.875) -> Callable[[Any], torch.Tensor]:
    """Resize to img/crop_pct then centre crop (the MAE/DeiT evaluation transform)."""
    size = data["img_size"]
    return transforms.Compose([
        transforms.Resize(int(round(size / crop_pct)), interpolation=_interp(data)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        normalize(),
    ])


class SkippingImageFolder(datasets.ImageFolder):
    """ImageFolder that skips an image that fails to decode (a corrupt file met during training): it is counted in
    ``skipped`` (per process), logged once, and the next decodable image of the folder takes its place."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: set[str] = set()

    def __getitem__(self, index: int) -> Any:
        import logging

        for k in range(min(len(self.samples), 64)):
            i = (index + k) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's decoder errors
                path = self.samples[i][0]
                if path not in self.skipped:
                    self.skipped.add(path)
                    logging.getLogger("repro.data").warning("skipped undecodable image %s (%s); %d skipped so far",
                                                            path, type(e).__name__, len(self.skipped))
        raise ConfigError(f"{self.root}: 64 images in a row from index {index} fail to decode; check the data set")


class InMemoryImageFolder(datasets.ImageFolder):
    """ImageFolder whose images are decoded once, at construction, and kept in memory: the embedded data sets (a few
    thousand 32-px images, ~3 KB each decoded), where reading and decoding a file cost as much as augmenting it."""

    def __init__(self, root: str, transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(root, transform=transform)
        self.images = [self.loader(path) for path, _ in self.samples]  # the default loader returns RGB, loaded

    def __getitem__(self, index: int) -> Any:
        img, target = self.images[index], self.targets[index]
        return (self.transform(img) if self.transform is not None else img), target


class INatJson(SkippingImageFolder):
    """iNaturalist in its official json layout: ``<root>/<split><year>.json`` (``images[]``: id, file_name relative
    to the root; ``annotations[]``: image_id, category_id; ``categories[]``). Classes are the category ids in order
    (the json's ``categories``, else those annotated), so train and val share one label space."""

    def __init__(self, root: Path, split: str, year: int, transform: Callable[[Any], Any] | None = None) -> None:
        import json

        from torchvision.datasets.folder import default_loader

        file = Path(root) / f"{split}{year}.json"
        if not file.is_file():
            raise ConfigError(f"{file} does not exist (iNaturalist {year}: the official {split}{year}.json)")
        try:
            meta = json.loads(file.read_text())
            images = {im["id"]: im["file_name"] for im in meta["images"]}
            labels = [(a["image_id"], a["category_id"]) for a in meta["annotations"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{file}: not an iNaturalist json ({type(e).__name__}: {e})") from None
        cats = sorted({c["id"] for c in meta.get("categories") or []} or {c for _, c in labels})
        self.root, self.transform, self.target_transform = str(root), transform, None
        self.loader = default_loader
        self.classes = [str(c) for c in cats]
        self.class_to_idx = {str(c): i for i, c in enumerate(cats)}
        self.samples = [(str(Path(root) / images[i]), self.class_to_idx[str(c)]) for i, c in labels if i in images]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]
        self.skipped: set[str] = set()


def build_split(data: Mapping[str, Any], split: str, transform: Callable[[Any], Any] | None,
                seed: int = 0) -> Dataset:
    """ImageFolder over ``<root>/<split>`` (iNaturalist: its json layout); the train split may keep only
    ``train_fraction`` (class-stratified)."""
    root = dataset_root(data)
    year = inat_year(data["dataset"])
    if year is not None:
        ds: datasets.ImageFolder = INatJson(root, split, year, transform)
    elif data["dataset"] in EMBEDDED:
        ds = InMemoryImageFolder(str(root / split), transform=transform)
    else:
        ds = SkippingImageFolder(str(root / split), transform=transform)
    frac = float(data.get("train_fraction", 1.0))
    if split == "train" and frac < 1.0:
        targets = np.asarray(ds.targets)
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for c in np.unique(targets):
            idx = np.flatnonzero(targets == c)
            keep.extend(rng.permutation(idx)[: max(1, int(round(len(idx) * frac)))].tolist())
        return Subset(ds, sorted(keep))
    return ds


def num_classes(ds: Dataset) -> int:
    base = ds.dataset if isinstance(ds, Subset) else ds
    return len(base.classes)  # type: ignore[attr-defined]
