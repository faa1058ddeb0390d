"""iNaturalist in its official json layout (lomar/t1's iNat rows): train<year>.json / val<year>.json with images[]
(file_name relative to the root) and annotations[] (category_id), the year taken from the dataset name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repro.config import ConfigError
from repro.data.datasets import build_split, check_dataset, inat_year, num_classes


def _fake_inat(root: Path, year: int) -> None:
    """3 images: two train (categories 5 and 7), one val (category 7); category 9 listed but never annotated."""
    cats = [{"id": c, "name": f"c{c}"} for c in (9, 5, 7)]
    for split, rows in (("train", [(1, 5), (2, 7)]), ("val", [(3, 7)])):
        images, anns = [], []
        for i, c in rows:
            rel = f"train_val{year}/Plantae/{c}/{i}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / rel)
            images.append({"id": i, "file_name": rel, "width": 8, "height": 8})
            anns.append({"id": 100 + i, "image_id": i, "category_id": c})
        (root / f"{split}{year}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                              "categories": cats}))


def test_inat_json_layout_reads_images_and_labels(tmp_path: Path) -> None:
    _fake_inat(tmp_path, 2019)
    data = {"dataset": "inat2019", "path": str(tmp_path), "train_fraction": 1.0}
    assert inat_year("inat2019") == 2019 and inat_year("imagenet1k") is None
    check_dataset(data)
    train, val = build_split(data, "train", None), build_split(data, "val", None)
    assert num_classes(train) == num_classes(val) == 3  # the json's categories: one label space for both splits
    assert [train[i][1] for i in range(len(train))] == [0, 1] and val[0][1] == 1  # ids 5, 7, 9 -> 0, 1, 2
    img, _ = train[0]
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (40, 40, 40)
    half = build_split({**data, "train_fraction": 0.5}, "train", None)
    assert len(half) == 2  # one image per annotated class is kept


def test_inat_year_is_the_datasets_and_a_bad_root_is_one_line(tmp_path: Path) -> None:
    _fake_inat(tmp_path, 2018)
    check_dataset({"dataset": "inat2018", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"train2019\.json does not exist"):
        check_dataset({"dataset": "inat2019", "path": str(tmp_path)})
    (tmp_path / "val2018.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"val2018\.json: not an iNaturalist json"):
        check_dataset({"dataset": "inat2018", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="is not a folder"):
        check_dataset({"dataset": "inat2018", "path": str(tmp_path / "nope")})
