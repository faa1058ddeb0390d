"""Cache-directory helpers shared by the generated datasets (synthetic shapes, sklearn digits)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temp dirs older than this are assumed to come from a crashed run and are removed on the next attempt.
STALE_TMP_SECONDS = 6 * 3600


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the cache directory: ``root`` if given, else ``$REPRO_CACHE``, else ``~/.cache/repro``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("REPRO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "repro"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _remove_stale_tmp(final: Path) -> None:
    """Best-effort removal of old temp dirs left by crashed runs (recent ones may belong to a live process)."""
    if not final.parent.is_dir():
        return
    now = time.time()
    for p in final.parent.glob(_tmp_prefix(final) + "*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``final``; on success rename it to ``final`` atomically.

    The temp name is unique per attempt, so leftovers of a crashed run never collide with a new one. If ``final``
    appeared meanwhile (another process won the race) the temp dir is discarded and the winner's dir is kept.
    On an exception the temp dir is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.parent / f"{_tmp_prefix(final)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)  # atomic; fails if final exists and is non-empty
    except OSError:
        if not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race: use the winner's dir
