"""Provenance of a result: code version, environment, host, configuration and its hash."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from repro.config import config_hash

PACKAGES = ("repro", "torch", "torchvision", "timm", "numpy", "submitit", "mmsegmentation", "mmdet", "detectron2")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty}


def versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


def _results_version(cfg: dict[str, Any]) -> dict[str, int]:
    """Which code made the result (``repro.pipeline.stage.results_version``); empty without a stage config."""
    from repro.pipeline.stage import results_version

    return results_version(str(cfg["kind"]), cfg) if cfg.get("kind") else {}


def provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        **code_version(),
        "versions": versions(),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "device_name": device_name(),
        "seed": cfg.get("seed"),
        "config_hash": config_hash(cfg),
        "results_version": _results_version(cfg),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
