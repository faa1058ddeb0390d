"""Executors run a DAG of stages. ``LocalExecutor``: one process per stage (a crash in one is reported and the
independent stages go on), dependencies first, a failed stage's dependents blocked, finished stages skipped, up to
``jobs`` stages at once. The Slurm executor implements the same interface.

A single-device stage runs in a child forked from a fork server that has imported torch, timm and the methods once
(and never computes, so forking it is safe even when this process has used OpenMP threads), so a stage costs its own
work and not ~5 s of imports; a multi-device stage is started with torchrun.

Stopping: SIGTERM or Ctrl-C to this process is passed on to the running stages (each checkpoints and stops, exit 75:
"stopped"; a rerun resumes it), and a stage gets SIGTERM when this process is gone, however it ended (SIGKILL too:
a forked stage watches a pipe only this process writes to; torchrun has PR_SET_PDEATHSIG), so killing ``repro``
never leaves a stage training. Each stage runs under its folder's lock (``StageLock``): a stage
that another run is training is waited for and then used, not trained twice.

Progress: after each batch of finished stages (and every ``HEARTBEAT_S`` while logs are not streamed) one plain line
with the stages finished of the total, per table when the tables are given, and an ETA (``Progress``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from repro.io import atomic_write_json
from repro.pipeline.stage import FAILED, LOG, RESULT, Stage, lock_holder, reset, topo_order
from repro.pipeline.worker import BUSY_EXIT, PREEMPTED_EXIT

STOP_WAIT_S = 600.0  # how long an interrupted run waits for its stages to checkpoint before killing them
HEARTBEAT_S = 60.0  # a progress line at least this often while stages run (when their logs are not streamed)


class Interrupted(KeyboardInterrupt):
    """This process got SIGINT or SIGTERM; the running stages were told to checkpoint and stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def die_with_parent() -> None:
    """In a child of this process (``preexec_fn``): have the kernel send it SIGTERM when its parent exits (Linux
    ``PR_SET_PDEATHSIG``; a no-op elsewhere). torchrun passes SIGTERM on to its workers, which checkpoint and stop."""
    with contextlib.suppress(OSError, AttributeError):
        parent = os.getppid()
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)  # 1: PR_SET_PDEATHSIG; the parent died before the call


def watch_parent(alive: Any) -> None:
    """SIGTERM this process when ``alive`` (the read end of a pipe whose only writer is the parent) reaches EOF:
    the parent exited, however it ended. A forked stage's parent is the fork server, which outlives ``repro``."""

    def wait() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                alive.recv_bytes()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 45s, 3m05s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Run-level progress of a DAG, as plain lines (never a carriage return): stages finished of the total, per table
    when the tables are known, and an ETA. A stage's expected wall time is the mean of the stages run here with the
    same kind and recipe, else the same kind, else all. The ETA is the larger of the expected time left of every
    unfinished stage (less what a running one has done) spread over ``jobs`` parallel slots, and the longest chain of
    unfinished stages through their inputs. No ETA before a stage has finished."""

    SHOW_TABLES = 3  # unfinished tables named in a line; the others are counted

    def __init__(self, stages: Sequence[Stage], tables: Mapping[str, Iterable[Stage]] | None = None, jobs: int = 1,
                 out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stages = {s.key: s for s in stages}
        self.tables = {t: [s.key for s in ss if s.key in self.stages] for t, ss in (tables or {}).items()}
        self.jobs = max(1, jobs)
        self.out = out
        self.clock = clock
        self.t0 = clock()
        self.started: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.walls: dict[str, float] = {}  # key -> wall seconds of the stages run to completion here
        self.reported: set[str] = set()  # tables whose completion was announced

    def start(self, stage: Stage) -> None:
        """``stage`` started now (its wall time counts from here)."""
        self.started.setdefault(stage.key, self.clock())

    def finish(self, stage: Stage, status: str) -> None:
        """``stage`` ended with ``status`` (done, skipped, failed, blocked, stopped); the first report counts."""
        if stage.key in self.status:
            return
        self.status[stage.key] = status
        if status == "done" and stage.key in self.started:
            self.walls[stage.key] = self.clock() - self.started[stage.key]

    def expected(self, stage: Stage) -> float | None:
        """Expected wall seconds of ``stage``: the mean over finished stages like it, or None when none finished."""
        recipe = stage.cfg.get("recipe")
        for like in (lambda s: s.kind == stage.kind and s.cfg.get("recipe") == recipe, lambda s: s.kind == stage.kind,
                     lambda s: True):
            walls = [w for k, w in self.walls.items() if like(self.stages[k])]
            if walls:
                return sum(walls) / len(walls)
        return None

    def eta(self) -> float | None:
        """Seconds until every stage has finished, or None when no stage has finished yet."""
        left = [s for k, s in self.stages.items() if k not in self.status]
        if not left:
            return 0.0
        if not self.walls:
            return None
        now = self.clock()
        rest = {s.key: max(0.0, (self.expected(s) or 0.0) - (now - self.started.get(s.key, now))) for s in left}
        chain: dict[str, float] = {}

        def until(s: Stage) -> float:  # seconds until ``s`` has finished, its unfinished inputs first
            if s.key not in rest:
                return 0.0
            if s.key not in chain:
                chain[s.key] = max((until(d) for d in s.deps.values()), default=0.0) + rest[s.key]
            return chain[s.key]

        return max(sum(rest.values()) / min(self.jobs, len(left)), max(until(s) for s in left))

    def table_lines(self) -> list[str]:
        """One line for each table whose stages have all finished since the last call."""
        lines = []
        for t, keys in self.tables.items():
            if t in self.reported or any(k not in self.status for k in keys):
                continue
            self.reported.add(t)
            counts = [f"{n} {st}" for st in ("done", "skipped", "failed", "blocked", "stopped")
                      if (n := sum(self.status[k] == st for k in keys))]
            lines.append(f"table {t}: finished, {len(keys)} stage(s) ({', '.join(counts) or 'none'})")
        return lines

    def line(self) -> str:
        """The progress line: finished / total, the unfinished tables, elapsed time and ETA."""
        n = len(self.status)
        counts = ", ".join(f"{c} {st}" for st in ("done", "skipped", "failed", "blocked", "stopped")
                           if (c := sum(v == st for v in self.status.values())))
        active = sum(1 for k in self.started if k not in self.status)
        parts = [f"progress: {n}/{len(self.stages)} stages" + (f" ({counts})" if counts else "")
                 + (f", {active} active" if active else "")]
        open_tables = [(t, sum(k in self.status for k in keys), len(keys)) for t, keys in self.tables.items()
                       if any(k not in self.status for k in keys)]
        if open_tables:
            shown = ", ".join(f"{t} {d}/{n}" for t, d, n in open_tables[:self.SHOW_TABLES])
            more = len(open_tables) - self.SHOW_TABLES
            parts.append(f"tables {shown}" + (f" +{more} more" if more > 0 else ""))
        eta = self.eta()
        parts.append(f"{duration(self.clock() - self.t0)} elapsed"
                     + ("" if n == len(self.stages) else f", ETA {duration(eta)}" if eta is not None else ", ETA -"))
        return " | ".join(parts)

    def report(self) -> None:
        """Print the tables just finished and the progress line."""
        out = self.out or sys.stderr
        for line in [*self.table_lines(), self.line()]:
            print(line, file=out, flush=True)


class Executor(Protocol):
    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        """Run the stages; returns stage key -> status (done, skipped, failed, blocked, stopped)."""
        ...


def write_spec(stage: Stage, runs_root: Path) -> Path:
    d = stage.dir(runs_root)
    d.mkdir(parents=True, exist_ok=True)
    spec = {"name": stage.name, "key": stage.key, "kind": stage.kind, "label": stage.label, "out_dir": str(d),
            "cfg": stage.cfg, "inputs": {role: str(dep.dir(runs_root)) for role, dep in stage.deps.items()}}
    return atomic_write_json(d / "stage.json", spec)


def _forked_worker(spec: str, log: str, threads: int, alive: Any) -> None:
    """Body of a forked stage process: output to the stage's log, then the ordinary worker."""
    watch_parent(alive)
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
    # sys.exit, not os._exit: multiprocessing's exit handlers run, and unlink the semaphores this process made
    # (tqdm's lock), which the resource tracker would otherwise report as leaked when `repro` exits.
    sys.exit(code)


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

    def __init__(self, stage: Stage, handle: Any, log: Path) -> None:
        self.stage, self.handle, self.log, self.pos = stage, handle, log, log.stat().st_size if log.exists() else 0
        self.code: int | None = None
        self.alive: Any = None  # a forked stage: the write end of its parent-alive pipe
        self._reaped = False

    def poll(self) -> int | None:
        if self.code is None:
            if isinstance(self.handle, subprocess.Popen):
                self.code = self.handle.poll()
            elif not self.handle.is_alive():
                self.code = self.handle.exitcode
        return self.code

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            os.kill(self.handle.pid, signum)  # torchrun passes SIGTERM on to its workers

    def join(self) -> None:
        """Reap the process (and, for a forked one, close its handle: no file descriptor left open)."""
        if self._reaped:
            return
        if isinstance(self.handle, subprocess.Popen):
            self.code = self.handle.wait()
        else:
            self.handle.join()
            self.code = self.handle.exitcode
            self.handle.close()
            self.alive.close()
        self._reaped = True

    def new_output(self) -> bytes:
        if not self.log.exists():
            return b""
        with open(self.log, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return data


class LocalExecutor:
    """Runs the stages here (see the module docstring); prints a progress line (``Progress``) as stages finish,
    with per-table counts when ``tables`` (table id -> its stages) is given."""

    def __init__(self, devices: int = 1, stream: bool = True, jobs: int = 1,
                 tables: Mapping[str, Iterable[Stage]] | None = None) -> None:
        self.devices = devices
        self.stream = stream
        self.jobs = max(1, jobs)
        self.tables = tables

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
                handle: Any = subprocess.Popen(self.command(spec), stdout=f, stderr=subprocess.STDOUT, env=env,
                                               preexec_fn=die_with_parent)
            return _Running(stage, handle, log)
        run = _Running(stage, None, log)
        alive, run.alive = _context().Pipe(duplex=False)  # the child's end reads EOF when this process is gone
        run.handle = _context().Process(target=_forked_worker, args=(str(spec), str(log), self._threads(), alive),
                                        name=stage.name)
        sys.stdout.flush()
        sys.stderr.flush()
        run.handle.start()
        alive.close()  # only the child holds the read end now
        return run

    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        """Run the DAG; on SIGINT / SIGTERM tell the running stages to checkpoint, wait for them, raise Interrupted."""
        self._running: list[_Running] = []

        def interrupt(signum: int, frame: Any) -> None:
            raise Interrupted(signum)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                previous[sig] = signal.signal(sig, interrupt)
        try:
            return self._run(stages, runs_root, force)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            for sig in previous:  # a second signal while the stages checkpoint: kill them
                signal.signal(sig, interrupt)
            self._stop_all()
            raise Interrupted(signum) from None
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_all(self) -> None:
        """SIGTERM every running stage (it checkpoints at its next step and exits) and wait; kill after STOP_WAIT_S or
        on a second interrupt."""
        live = [r for r in self._running if r.poll() is None]
        if not live:
            return
        print(f"repro: stopping {len(live)} running stage(s): each writes its checkpoint; the same command resumes "
              "them (interrupt again to kill them now)", file=sys.stderr, flush=True)
        for r in live:
            r.signal(signal.SIGTERM)
        deadline = time.time() + STOP_WAIT_S
        try:
            while any(r.poll() is None for r in live) and time.time() < deadline:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        for r in live:
            if r.poll() is None:
                r.signal(signal.SIGKILL)
            r.join()
            print(f"  {r.stage.name}: {_ended(r.poll())}; log: {r.log}", file=sys.stderr, flush=True)

    def _run(self, stages: Iterable[Stage], runs_root: Path, force: bool) -> dict[str, str]:
        order = topo_order(stages)
        status: dict[str, str] = {}
        index = {s.key: i for i, s in enumerate(order, 1)}
        head = {s.key: f"[{index[s.key]}/{len(order)}] {s.name} {s.label}".rstrip() for s in order}
        pending = list(order)
        running = self._running
        waiting: set[str] = set()  # stages another run is training: started (or found done) when it lets go
        progress = Progress(order, self.tables, self.jobs)
        last = (0, time.monotonic())  # stages finished at the last progress line, and when it was printed

        def tick() -> None:
            nonlocal last
            quiet = self.stream and self.jobs == 1  # the running stage's log is on the screen
            if len(status) != last[0] or (running and not quiet and time.monotonic() - last[1] > HEARTBEAT_S):
                for s in order:
                    if s.key in status:
                        progress.finish(s, status[s.key])
                progress.report()
                last = (len(status), time.monotonic())

        while pending or running:
            for s in list(pending):  # settle what needs no process: blocked or already done
                deps = [status.get(d.key) for d in s.deps.values()]
                if any(st in ("failed", "blocked", "stopped") for st in deps):
                    status[s.key] = "blocked"
                    pending.remove(s)
                    print(f"{head[s.key]}: blocked (an input failed or was stopped)", file=sys.stderr)
                elif (not force or s.key in waiting) and s.done(runs_root):
                    status[s.key] = "skipped"
                    pending.remove(s)
                    how = "by another run" if s.key in waiting else "already"
                    print(f"{head[s.key]}: done {how}, skipped ({s.dir(runs_root) / RESULT})", file=sys.stderr)
            ready = [s for s in pending if all(status.get(d.key) in ("done", "skipped") for d in s.deps.values())]
            while ready and len(running) < self.jobs:
                s = ready.pop(0)
                d = s.dir(runs_root)
                holder = lock_holder(d)
                if holder:  # another run trains it: wait, then use its result (or resume it if it stopped)
                    if s.key not in waiting:
                        print(f"{head[s.key]}: another run is training it ({holder}); waiting for it",
                              file=sys.stderr, flush=True)
                        waiting.add(s.key)
                    continue
                pending.remove(s)
                if force and s.key not in waiting:
                    reset(d)  # result, failure record and checkpoints: from scratch
                print(f"{head[s.key]}: running (log: {d / LOG})", file=sys.stderr, flush=True)
                progress.start(s)
                running.append(self._start(s, runs_root))
            if not running and not waiting:
                tick()
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
                r.join()
                s = r.stage
                if rc == BUSY_EXIT:  # another run took the stage's lock first: wait for it like above
                    print(f"{head[s.key]}: another run is training it; waiting for it", file=sys.stderr, flush=True)
                    progress.started.pop(s.key, None)
                    pending.insert(0, s)
                    waiting.add(s.key)
                    continue
                ok = rc == 0 and s.done(runs_root)
                status[s.key] = "done" if ok else "stopped" if rc == PREEMPTED_EXIT else "failed"
                if ok:
                    print(f"{head[s.key]}: done", file=sys.stderr, flush=True)
                    continue
                if rc == PREEMPTED_EXIT:
                    print(f"{head[s.key]}: stopped by a signal after writing its checkpoint; the same command "
                          f"resumes it (log: {s.dir(runs_root) / LOG})", file=sys.stderr, flush=True)
                    continue
                failed = s.dir(runs_root) / FAILED
                if not failed.exists():
                    atomic_write_json(failed, {"error": f"exit code {rc}", "log": str(s.dir(runs_root) / LOG)})
                print(f"{head[s.key]}: FAILED (exit {rc}); log: {s.dir(runs_root) / LOG}", file=sys.stderr, flush=True)
            tick()
        return status


def _ended(rc: int | None) -> str:
    if rc == PREEMPTED_EXIT:
        return "checkpointed and stopped (resumes when rerun)"
    if rc == 0:
        return "finished"
    return f"ended (exit {rc}; it resumes from its last epoch checkpoint, if any)"


def summary(stages: Iterable[Stage], status: dict[str, str], runs_root: Path) -> str:
    lines = []
    for s in topo_order(stages):
        st = status.get(s.key, "?")
        extra = f"  log: {s.dir(runs_root) / LOG}" if st == "failed" else ""
        lines.append(f"  {st:8s} {s.name} {s.label}{extra}")
    return "\n".join(lines)
