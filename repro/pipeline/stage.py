"""A stage: one unit of work (pretrain, fine-tune, linear, kNN, ...) with a content hash of its resolved
configuration and of its inputs. Stages that resolve to the same hash are the same stage, run once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from repro.config import config_hash

# Keys that change how a stage runs but not what it computes: excluded from its identity.
VOLATILE = ("train.num_workers", "train.log_every")
RESULT = "result.json"
FAILED = "failed.json"
LOG = "log.txt"
# Results-versions: each stage kind's (``StageKind.results_version``) and a pretraining method's (``results_version``
# of its spec). Versions above 1 enter the stage's identity (``Stage.key``), so `repro run` recomputes exactly the
# stages whose code changed, and through the keys of their inputs everything downstream; result.json records them.


def results_version(kind: str, cfg: Mapping[str, Any]) -> dict[str, int]:
    """The results-versions of the code a stage of ``kind`` (its recipe kind: semi-supervised runs ``finetune``)
    with ``cfg`` runs, e.g. ``{"pretrain": 1, "method.lomar": 2}``."""
    kind = str(cfg.get("kind") or kind)
    from repro.kinds import KINDS

    out = {kind: KINDS[kind].results_version if kind in KINDS else 1}
    method = cfg.get("method") if kind == "pretrain" else None
    if isinstance(method, Mapping) and method.get("name"):
        from repro.methods import METHODS  # an unknown method fails when its stage runs, not when it is planned

        out[f"method.{method['name']}"] = int(getattr(METHODS.get(str(method["name"])), "results_version", 1))
    return out


def changed_code(versions: Mapping[str, int]) -> dict[str, int]:
    """The versions that differ from the first (1): the part of ``results_version`` in a stage's identity, so stages
    whose code never changed keep their key."""
    return {k: int(v) for k, v in sorted(versions.items()) if int(v) != 1}


CHECKPOINTS = "checkpoints"
LOCK = ".lock"


def _strip(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg, default=str))
    for key in VOLATILE:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    for meta in ("description", "source", "evals", "tiny_overrides", "tiny_reason"):
        out.pop(meta, None)
    method = out.get("method")
    if isinstance(method, dict) and method.get("name"):  # knobs inert for this architecture (MethodSpec.inert)
        from repro.methods import METHODS

        spec = METHODS.get(str(method["name"]))
        for k in spec.inert(cfg) if spec is not None else ():
            method.pop(k, None)
    train = out.get("train")
    if isinstance(train, dict):  # kernel choices, not results: stage keys stay as before these switches existed
        for k in ("fused_optim", "fused_attn", "sync_free", "compile_mode", "embed_visible", "sdpa",
                  "compile_scope"):
            train.pop(k, None)
        if "compile" in train:
            train["compile"] = False
    optim = out.get("optim")
    if isinstance(optim, dict) and optim.get("schedule") == "cosine":  # keys at their defaults: keys as before them
        for k, default in (("schedule", "cosine"), ("milestones", None), ("decay_rate", 0.1), ("warmup_lr", 0.0)):
            if k in optim and optim[k] == default:
                del optim[k]
    data = out.get("data")
    if isinstance(data, dict) and data.get("decode") == "cpu":  # the default: keys as before the switch
        del data["decode"]
    if isinstance(data, dict) and data.get("path") is not None:  # the dataset by name, not where it is mounted
        data["path"] = None
    if out.get("init") not in (None, "random"):  # an --init file by what it is, not where it lies
        out["init"] = input_identity(str(out["init"]))
    return out


def input_identity(path: str | Path) -> str:
    """An encoder file's identity: the key of the stage that wrote it (its folder's result.json), else the SHA-256
    of its bytes (else, for a missing file, its name)."""
    import hashlib

    p = Path(path)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        key = json.loads((p.parent / RESULT).read_bytes()).get("key")
        if key:
            return f"stage:{key}"
    h = hashlib.sha256()
    try:
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return f"file:{p.name}"
    return f"sha256:{h.hexdigest()}"


@dataclass(eq=False)
class Stage:
    kind: str
    cfg: dict[str, Any]
    deps: dict[str, Stage] = field(default_factory=dict)
    label: str = ""

    @cached_property
    def key(self) -> str:
        """Content hash of the kind, the configuration and the inputs' keys (computed once: a stage's configuration
        is not changed after it is planned)."""
        ident = {"kind": self.kind, "cfg": _strip(self.cfg), "deps": {r: s.key for r, s in sorted(self.deps.items())}}
        code = changed_code(results_version(self.kind, self.cfg))
        if code:
            ident["code"] = code
        return config_hash(ident, 16)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.cfg.get('recipe', self.kind)}-{self.key[:10]}"

    def dir(self, runs_root: str | Path) -> Path:
        return Path(runs_root) / self.cfg.get("scale", "paper") / self.name

    def result(self, runs_root: str | Path) -> dict[str, Any] | None:
        try:
            r = read_json(self.dir(runs_root) / RESULT)
        except ValueError:  # truncated or corrupt: the stage runs again
            return None
        return r if isinstance(r, dict) else None

    def done(self, runs_root: str | Path) -> bool:
        r = self.result(runs_root)
        return bool(r and r.get("status") == "done")


def topo_order(stages: Iterable[Stage]) -> list[Stage]:
    """Unique stages (by key), dependencies first."""
    seen: dict[str, Stage] = {}

    def visit(s: Stage, path: tuple[str, ...] = ()) -> None:
        if s.key in path:
            raise ValueError(f"dependency cycle at {s.name}")
        for d in s.deps.values():
            visit(d, (*path, s.key))
        seen.setdefault(s.key, s)

    for s in stages:
        visit(s)
    return list(seen.values())


# --------------------------------------------------------------------------------------- one stage folder, on disk
def read_json(path: str | Path) -> Any:
    """A json file's content; None if it is missing; ``ValueError`` naming the file if it is truncated or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt: {path} ({type(e).__name__})") from None


def is_done(stage_dir: str | Path) -> bool:
    """Whether the folder holds a finished stage's result (a corrupt result counts as not done)."""
    with contextlib.suppress(ValueError):
        r = read_json(Path(stage_dir) / RESULT)
        return isinstance(r, dict) and r.get("status") == "done"
    return False


def reset(stage_dir: str | Path) -> None:
    """Forget a stage's earlier run (``--force``): result, failure record and checkpoints; it starts from scratch."""
    d = Path(stage_dir)
    for name in (RESULT, FAILED):
        (d / name).unlink(missing_ok=True)
    shutil.rmtree(d / CHECKPOINTS, ignore_errors=True)


def remove_stale_tmp(stage_dir: str | Path) -> list[Path]:
    """Remove the temporary files of atomic writes that a killed process left (``.NAME.*.tmp``, see repro.io) in a
    stage folder and its checkpoints. Only for the holder of the stage's lock: no one else writes there then (the
    executor's own stage.json / failed.json are left alone)."""
    d, removed = Path(stage_dir), []
    for folder in (d, d / CHECKPOINTS):
        for p in sorted(folder.glob(".*.tmp")):
            if p.name.startswith((".stage.json.", ".failed.json.")):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


class StageLock:
    """An exclusive lock on a stage folder (``flock`` on ``<dir>/.lock``), held by the process that runs the stage: two
    runs never train the same stage together, and the kernel releases it when the holder exits, however it ends.
    Where the filesystem has no ``flock`` the lock is not taken (and not enforced)."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.path = Path(stage_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # no flock here (some network filesystems): run unlocked
            os.close(fd)
            return True
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def lock_holder(stage_dir: str | Path) -> str | None:
    """Who holds the stage's lock ("pid N on HOST"), or None if no process does."""
    path = Path(stage_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
