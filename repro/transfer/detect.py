"""The ``detect`` stage: COCO detection + instance segmentation with a pretrained encoder as backbone.

``framework`` in the recipe picks the runner: ``detectron2`` (ViTDet Mask R-CNN, ``repro.transfer.detectron2``) or
``mmdet`` (Mask R-CNN + FPN, ``repro.transfer.mmdet``). Both read the COCO layout of ``repro.data.dense`` (the
embedded shapes at tiny scale, a real COCO root through ``data.path``) and score with the helpers of
``repro.transfer.coco`` (pycocotools' ``COCOeval``, and the AP of a trivial predictor beside it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro.config import ConfigError

FRAMEWORKS = ("detectron2", "mmdet")


def run_detect(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run the stage with the framework its recipe names."""
    fw = cfg.get("framework")
    if fw == "detectron2":
        from repro.transfer.detectron2 import run_detect_vitdet

        return run_detect_vitdet(cfg, Path(out_dir))
    if fw == "mmdet":
        from repro.transfer.mmdet import run_detect_mmdet

        return run_detect_mmdet(cfg, Path(out_dir))
    raise ConfigError(f"unknown detect framework '{fw}'; valid: {', '.join(FRAMEWORKS)}")
