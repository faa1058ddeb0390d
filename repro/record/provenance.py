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


ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# What `repro report` writes into the work tree: rendered from results, never an input to a stage, so a change there
# does not make the code that runs a stage "dirty" (`make reproduce` renders after `repro run claims`, then runs `all`).
REPORT_OUTPUTS = ("RESULTS.md", "tables", "plots")


def tree_state(root: Path = ROOT) -> dict[str, Any]:
    """HEAD of the git work tree at ``root`` and whether tracked files outside the report's outputs differ from it
    (untracked files do not count); both None outside a git work tree."""
    commit = _git("rev-parse", "HEAD", root=root)
    dirty = None
    if commit is not None:
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                          *(f":(top,exclude){p}" for p in REPORT_OUTPUTS), root=root))
    return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The project's ``tree_state``, once per process."""
    return tree_state()


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
