"""What a pretraining stage leaves for its evaluations: the exported encoder, the tensors beside it, and its metadata.

The stage runner itself is ``repro.pretrain.run_pretrain`` (it measures a kNN curve and FLOPs, which the engine
does not import).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro.io import atomic_json_and_tensors

ENCODER_FILE = "encoder.pth"
EXTRAS_FILE = "extras.pth"
META_FILE = "encoder.json"


def export_encoder(method: Any, cfg: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``encoder.pth`` (our encoder's state dict), ``extras.pth`` and ``encoder.json``, and beside them
    ``encoder_timm.pth`` + ``timm.json`` (the same weights, loading strictly into ``timm.create_model``); return the
    paths."""
    from repro.models.export import write_timm_sidecar

    meta = {"method": method.name, "linear_feature": method.linear_feature, "finetune_pool": method.finetune_pool,
            "model": dict(cfg["model"]), "img_size": cfg["data"]["img_size"]}
    state = method.export()
    paths = atomic_json_and_tensors(out_dir, {ENCODER_FILE: state, EXTRAS_FILE: method.extras()}, META_FILE, meta)
    return {**paths, **write_timm_sidecar(out_dir, state, meta)}
