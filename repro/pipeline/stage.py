"""A stage: one unit of work (pretrain, fine-tune, linear, kNN, ...) with a content hash of its resolved
configuration and of its inputs. Stages that resolve to the same hash are the same stage, run once."""

from __future__ import annotations

import json
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
    return out


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
        return config_hash(ident, 16)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.cfg.get('recipe', self.kind)}-{self.key[:10]}"

    def dir(self, runs_root: str | Path) -> Path:
        return Path(runs_root) / self.cfg.get("scale", "paper") / self.name

    def result(self, runs_root: str | Path) -> dict[str, Any] | None:
        p = self.dir(runs_root) / RESULT
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

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
