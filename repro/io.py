"""Atomic writes (temp file in the same folder + fsync + rename) and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and the fix."""


def _atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # here, not at the top: planning and reporting import this module without torch

    return _atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for a corrupt or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or run the stage that writes it)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the same thing to the user
        if "Unsupported global" in str(e):  # e.g. an official training checkpoint with its argparse args
            raise CheckpointError(f"checkpoint {path} holds pickled Python objects (e.g. a training script's args), "
                                  "which are never unpickled here; re-save it with only its tensors, e.g. "
                                  "torch.save({'model': ckpt['model']}, path)") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {str(e)[:80]}); "
                              "delete it to start that stage over") from None


def atomic_json_and_tensors(out_dir: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]],
                            meta_name: str, meta: Any) -> dict[str, str]:
    """Write several tensor files and a json beside them, each atomically; returns name -> path."""
    out = Path(out_dir)
    paths = {name: str(atomic_torch_save(sd, out / name)) for name, sd in tensors.items() if sd}
    paths[meta_name] = str(atomic_write_json(out / meta_name, meta))
    return paths


@contextlib.contextmanager
def own_framework_checkpoints() -> Iterator[None]:
    """Let torch.load unpickle a framework's own checkpoint objects (mmengine's), for the duration of one load of
    files the suite itself wrote: torch loads weights-only by default, and nothing else here may unpickle."""
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old
