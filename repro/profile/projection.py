"""Stored profiles (``tables/efficiency/profiles.json``: one measured step cost per cost key, written by
``repro profile``) and the projection of a stage's device-hours from them, for ``repro plan --scale paper``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro.io import atomic_write_json
from repro.profile.bench import cost_key, project, train_images

PROFILES = Path("tables") / "efficiency" / "profiles.json"


def profiles_path(repo_root: Path | None = None) -> Path:
    """``$REPRO_PROFILES`` if set, else ``<repo>/tables/efficiency/profiles.json``."""
    env = os.environ.get("REPRO_PROFILES")
    if env:
        return Path(env)
    root = repo_root or Path(__file__).resolve().parents[2]
    return root / PROFILES


def load_profiles(path: Path | None = None) -> dict[str, Any]:
    p = path or profiles_path()
    return json.loads(p.read_text()) if p.exists() else {}


def store_profiles(new: Mapping[str, Mapping[str, Any]], path: Path | None = None) -> Path:
    """Merge ``new`` (cost key -> profile) into the stored profiles; a newer profile of a key replaces the older."""
    p = path or profiles_path()
    data = load_profiles(p)
    data.update({k: dict(v) for k, v in new.items()})
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, data)
    return p


def projected_hours(stage_cfg: Mapping[str, Any], path: Path | None = None) -> float | None:
    """Projected device-hours of a pretraining stage from the stored profile of its configuration (same method,
    model and resolution), for its epochs and dataset; None when it is not a pretraining stage, its dataset has no
    known size, or no profile of that configuration is stored."""
    if stage_cfg.get("kind", "pretrain") != "pretrain" or "method" not in stage_cfg or "optim" not in stage_cfg:
        return None
    try:
        images = train_images(stage_cfg)
    except Exception:  # noqa: BLE001 - tiny / synthetic data: no paper-scale projection
        return None
    prof = load_profiles(path).get(cost_key(stage_cfg))
    if not prof:
        return None
    return project(prof["s_per_image"], images, float(stage_cfg["optim"]["epochs"]))["total_device_hours"]
