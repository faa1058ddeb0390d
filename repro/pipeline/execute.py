"""Executors run a DAG of stages. ``LocalExecutor``: one subprocess per stage, dependencies first, a failed stage's
dependents skipped and every independent stage still run. The Slurm executor implements the same interface."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from repro.io import atomic_write_json
from repro.pipeline.stage import FAILED, LOG, RESULT, Stage, topo_order


class Executor(Protocol):
    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        """Run the stages; returns stage key -> status (done, skipped, failed, blocked)."""
        ...


def write_spec(stage: Stage, runs_root: Path) -> Path:
    d = stage.dir(runs_root)
    d.mkdir(parents=True, exist_ok=True)
    spec = {"name": stage.name, "key": stage.key, "kind": stage.kind, "label": stage.label, "out_dir": str(d),
            "cfg": stage.cfg, "inputs": {role: str(dep.dir(runs_root)) for role, dep in stage.deps.items()}}
    return atomic_write_json(d / "stage.json", spec)


class LocalExecutor:
    def __init__(self, devices: int = 1, stream: bool = True):
        self.devices = devices
        self.stream = stream

    def command(self, spec: Path) -> list[str]:
        if self.devices > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.devices}",
                    "-m", "repro.pipeline.worker", str(spec)]
        return [sys.executable, "-m", "repro.pipeline.worker", str(spec)]

    def _launch(self, stage: Stage, runs_root: Path) -> int:
        spec = write_spec(stage, runs_root)
        d = spec.parent
        (d / FAILED).unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(d / LOG, "ab") as log:
            proc = subprocess.Popen(self.command(spec), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env)
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
                log.write(chunk)
                if self.stream:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
            return proc.wait()

    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        order = topo_order(stages)
        status: dict[str, str] = {}
        for i, s in enumerate(order, 1):
            head = f"[{i}/{len(order)}] {s.name} {s.label}".rstrip()
            if any(status.get(d.key) in ("failed", "blocked") for d in s.deps.values()):
                status[s.key] = "blocked"
                print(f"{head}: blocked (an input failed)", file=sys.stderr)
                continue
            if s.done(runs_root) and not force:
                status[s.key] = "skipped"
                print(f"{head}: done already, skipped ({s.dir(runs_root) / RESULT})", file=sys.stderr)
                continue
            if force:
                (s.dir(runs_root) / RESULT).unlink(missing_ok=True)
            print(f"{head}: running (log: {s.dir(runs_root) / LOG})", file=sys.stderr, flush=True)
            rc = self._launch(s, runs_root)
            ok = rc == 0 and s.done(runs_root)
            status[s.key] = "done" if ok else "failed"
            if not ok:
                failed = s.dir(runs_root) / FAILED
                if not failed.exists():
                    atomic_write_json(failed, {"error": f"exit code {rc}", "log": str(s.dir(runs_root) / LOG)})
                print(f"{head}: FAILED (exit {rc}); log: {s.dir(runs_root) / LOG}", file=sys.stderr)
        return status


def summary(stages: Iterable[Stage], status: dict[str, str], runs_root: Path) -> str:
    lines = []
    for s in topo_order(stages):
        st = status.get(s.key, "?")
        extra = f"  log: {s.dir(runs_root) / LOG}" if st == "failed" else ""
        lines.append(f"  {st:8s} {s.name} {s.label}{extra}")
    return "\n".join(lines)
