"""Executors run a DAG of stages. ``LocalExecutor``: one process per stage (a crash in one is reported and the
independent stages go on), dependencies first, a failed stage's dependents blocked, finished stages skipped, up to
``jobs`` stages at once. The Slurm executor implements the same interface.

A single-device stage runs in a child forked from a fork server that has imported torch, timm and the methods once
(and never computes, so forking it is safe even when this process has used OpenMP threads), so a stage costs its own
work and not ~5 s of imports; a multi-device stage is started with torchrun.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

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


def _forked_worker(spec: str, log: str, threads: int) -> None:
    """Body of a forked stage process: output to the stage's log, then the ordinary worker."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # The parent's sys.stdout/err may be wrappers of its own (a terminal, pytest's capture): write to the log.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import torch

    torch.set_num_threads(threads)
    from repro.pipeline import worker

    code = worker.main([spec])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CTX: Any = None


def _context() -> Any:
    """The fork server's context, with the heavy modules preloaded in the server (started on first use)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "timm", "repro.methods", "repro.pipeline.worker"])
    return _CTX


class _Running:
    """One launched stage: a forked process or a torchrun subprocess, and the read position in its log."""

    def __init__(self, stage: Stage, handle: Any, log: Path):
        self.stage, self.handle, self.log, self.pos = stage, handle, log, log.stat().st_size if log.exists() else 0

    def poll(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        return None if self.handle.is_alive() else self.handle.exitcode

    def new_output(self) -> bytes:
        if not self.log.exists():
            return b""
        with open(self.log, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return data


class LocalExecutor:
    def __init__(self, devices: int = 1, stream: bool = True, jobs: int = 1):
        self.devices = devices
        self.stream = stream
        self.jobs = max(1, jobs)

    def command(self, spec: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.devices}",
                "-m", "repro.pipeline.worker", str(spec)]

    def _threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def _start(self, stage: Stage, runs_root: Path) -> _Running:
        spec = write_spec(stage, runs_root)
        d = spec.parent
        (d / FAILED).unlink(missing_ok=True)
        log = d / LOG
        log.touch()
        if self.devices > 1:
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self._threads()))
            with open(log, "ab") as f:
                handle: Any = subprocess.Popen(self.command(spec), stdout=f, stderr=subprocess.STDOUT, env=env)
            return _Running(stage, handle, log)
        run = _Running(stage, None, log)
        run.handle = _context().Process(target=_forked_worker, args=(str(spec), str(log), self._threads()),
                                        name=stage.name)
        sys.stdout.flush()
        sys.stderr.flush()
        run.handle.start()
        return run

    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        order = topo_order(stages)
        status: dict[str, str] = {}
        index = {s.key: i for i, s in enumerate(order, 1)}
        head = {s.key: f"[{index[s.key]}/{len(order)}] {s.name} {s.label}".rstrip() for s in order}
        pending = list(order)
        running: list[_Running] = []
        while pending or running:
            for s in list(pending):  # settle what needs no process: blocked or already done
                deps = [status.get(d.key) for d in s.deps.values()]
                if any(st in ("failed", "blocked") for st in deps):
                    status[s.key] = "blocked"
                    pending.remove(s)
                    print(f"{head[s.key]}: blocked (an input failed)", file=sys.stderr)
                elif not force and s.done(runs_root):
                    status[s.key] = "skipped"
                    pending.remove(s)
                    print(f"{head[s.key]}: done already, skipped ({s.dir(runs_root) / RESULT})", file=sys.stderr)
            ready = [s for s in pending if all(status.get(d.key) in ("done", "skipped") for d in s.deps.values())]
            while ready and len(running) < self.jobs:
                s = ready.pop(0)
                pending.remove(s)
                if force:
                    (s.dir(runs_root) / RESULT).unlink(missing_ok=True)
                print(f"{head[s.key]}: running (log: {s.dir(runs_root) / LOG})", file=sys.stderr, flush=True)
                running.append(self._start(s, runs_root))
            if not running:
                if pending:  # nothing runnable and nothing running: cannot happen with a valid DAG
                    raise RuntimeError(f"stages waiting on inputs that will never finish: {[s.name for s in pending]}")
                break
            time.sleep(0.2)
            for r in list(running):
                out = r.new_output()
                if self.stream and self.jobs == 1 and out:
                    sys.stderr.buffer.write(out)
                    sys.stderr.flush()
                rc = r.poll()
                if rc is None:
                    continue
                running.remove(r)
                s = r.stage
                ok = rc == 0 and s.done(runs_root)
                status[s.key] = "done" if ok else "failed"
                if ok:
                    print(f"{head[s.key]}: done", file=sys.stderr, flush=True)
                    continue
                failed = s.dir(runs_root) / FAILED
                if not failed.exists():
                    atomic_write_json(failed, {"error": f"exit code {rc}", "log": str(s.dir(runs_root) / LOG)})
                print(f"{head[s.key]}: FAILED (exit {rc}); log: {s.dir(runs_root) / LOG}", file=sys.stderr, flush=True)
        return status


def summary(stages: Iterable[Stage], status: dict[str, str], runs_root: Path) -> str:
    lines = []
    for s in topo_order(stages):
        st = status.get(s.key, "?")
        extra = f"  log: {s.dir(runs_root) / LOG}" if st == "failed" else ""
        lines.append(f"  {st:8s} {s.name} {s.label}{extra}")
    return "\n".join(lines)
