"""What both detection runners share: the backbone's initial weights, pycocotools' ``COCOeval`` on COCO result
dicts (box and mask AP, AP50, AP75 on COCO's 0-100 scale), the AP of a predictor that ignores the image
(``trivial_ap``, the floor a detector must beat) and the iteration count of an epoch budget."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.config import ConfigError

AP_KEYS = ("AP", "AP50", "AP75")


def encoder_state(cfg: Mapping[str, Any], img_size: int) -> dict[str, torch.Tensor]:
    """The backbone's initial weights: the pretraining's exported encoder (``cfg['init']``, loaded weights_only),
    or a freshly initialised encoder of ``cfg['model']`` for ``init: random`` (the no-pretraining row)."""
    from repro.io import load_checkpoint
    from repro.models.encoders import create_encoder

    init = cfg.get("init")
    if init in (None, "", "random"):
        enc = create_encoder(cfg["model"], img_size)
        return {k: v.detach().clone() for k, v in enc.state_dict().items() if not k.startswith("head.")}
    state = load_checkpoint(init)
    if isinstance(state, Mapping):
        for key in ("encoder", "model"):  # our layout, or the official fine-tune scripts' {'model': ...}
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{init} is not an encoder state dict (tensors by name)")
    return dict(state)


def ap_metrics(prefix: str, stats: Mapping[str, float]) -> dict[str, float]:
    """``{prefix}_ap``, ``_ap50``, ``_ap75`` from a COCO summary (``AP``/``AP50``/``AP75``, 0-100 scale). A
    detector with no detection at all scores 0 (detectron2 reports NaN then)."""
    out = {}
    for k in AP_KEYS:
        v = float(stats.get(k, float("nan")))
        out[f"{prefix}_{k.lower()}"] = v if math.isfinite(v) else 0.0
    return out


def coco_stats(gt_json: str | Path, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """pycocotools' COCOeval on ``results`` (COCO result dicts); AP, AP50, AP75 on COCO's 0-100 scale."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(AP_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v) * 100) for k, v in zip(AP_KEYS, ev.stats[:3])}


def trivial_ap(train_json: str | Path, val_json: str | Path) -> dict[str, float]:
    """Box and mask AP of a predictor that ignores the image: on every val image, each class's mean training box
    (relative coordinates) with the class's training frequency as score, its mask the filled box. The floor a
    trained detector must beat."""
    from pycocotools import mask as mask_util

    train = json.loads(Path(train_json).read_text())
    val = json.loads(Path(val_json).read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in train["images"]}
    rel: dict[int, list[list[float]]] = {}
    for a in train["annotations"]:
        w, h = size[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        rel.setdefault(a["category_id"], []).append([x / w, y / h, bw / w, bh / h])
    total = sum(len(v) for v in rel.values()) or 1
    boxes, segms = [], []
    for im in val["images"]:
        w, h = im["width"], im["height"]
        for cat, rows in rel.items():
            x, y, bw, bh = np.mean(rows, axis=0) * [w, h, w, h]
            score = len(rows) / total
            boxes.append({"image_id": im["id"], "category_id": cat, "bbox": [x, y, bw, bh], "score": score})
            m = np.zeros((h, w), np.uint8, order="F")
            m[int(y):int(np.ceil(y + bh)), int(x):int(np.ceil(x + bw))] = 1
            rle = mask_util.encode(m)
            rle["counts"] = rle["counts"].decode()
            segms.append({"image_id": im["id"], "category_id": cat, "segmentation": rle, "score": score})
    return {**ap_metrics("trivial_box", coco_stats(val_json, boxes, "bbox")),
            **ap_metrics("trivial_mask", coco_stats(val_json, segms, "segm"))}


def iterations(epochs: float, n_train: int, batch: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``n_train`` images at ``batch`` (at least 1)."""
    return max(1, round(epochs * n_train / batch))
