"""Runtime hardening: data generation that cannot hang, preemption state per training run, cost summed over the
process segments of a resumed stage, stopping `repro` stops its stages, --force, `repro status` on damaged records,
stale temporary files, the stage lock, and no leaked-semaphore warning.

The end-to-end tests start `repro` in subprocesses and signal them (marked slow); every wait is bounded, so a hang
fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from repro.cli import main
from repro.engine.dist import DistEnv
from repro.engine.fit import fit
from repro.engine.hooks import Preempted
from repro.io import load_checkpoint
from repro.methods.base import StepOutput
from repro.pipeline import slurm, worker
from repro.pipeline.stage import LOCK, StageLock, lock_holder, remove_stale_tmp
from repro.resolve import resolve

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ data generation cannot hang
GENERATE = """
import sys, threading, torch
from tqdm import tqdm
from repro.data.synthetic import ensure_synthetic
torch.set_num_threads(2)
torch.randn(256, 256) @ torch.randn(256, 256)  # OpenMP worker threads now exist in this process
bar = tqdm(total=1, mininterval=0.01, file=open("/dev/null", "w"))  # and tqdm's monitor thread
assert threading.active_count() > 1
kw = dict(img_size=32, n_train=60, n_val=20, num_classes=10, seed=3, progress=False)
print(ensure_synthetic(sys.argv[1], workers=2, **kw), ensure_synthetic(sys.argv[2], workers=1, **kw))
"""


def test_generation_with_workers_in_a_threaded_process_is_bounded(tmp_path: Path) -> None:
    """A pool of workers started from a process that runs torch and tqdm threads (a fork there can deadlock)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    try:
        out = subprocess.run([sys.executable, "-c", GENERATE, str(tmp_path / "pool"), str(tmp_path / "one")],
                             capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail("dataset generation with 2 workers hung in a process with threads")
    assert out.returncode == 0, out.stderr
    assert "leaked semaphore" not in out.stderr
    pool, one = (Path(p) for p in out.stdout.split())

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert len(files(pool)) == 60 + 20 + 3 and files(pool) == files(one)


# ------------------------------------------------------------------------- preemption state and cost, per fit call
class Regression(nn.Module):
    """A linear regression task that can signal its own process at a given micro-batch."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR2) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.signal_at, self.signum, self.calls = signal_at, signum, 0

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        x, y = batch
        return StepOutput((self.lin(x).squeeze(1) - y).pow(2).mean())


def _cfg() -> dict[str, Any]:
    """32 samples, batch 8 as 2 micro-batches of 4: 4 optimizer steps per epoch, 3 epochs = 96 images."""
    over = {"optim.epochs": 3, "optim.warmup_epochs": 0.5, "optim.batch_size": 8, "train.batch_per_device": 4,
            "optim.blr": 1.0e-3}
    return resolve("mae", "tiny", [f"{k}={v}" for k, v in over.items()])


def _fit(out: Path, **task: Any) -> tuple[Regression, dict[str, Any]]:
    torch.manual_seed(7)
    model = Regression(**task)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, generator=g))
    return model, fit(model, data, _cfg(), out, env=CPU, desc="test")


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM, signal.SIGINT])
def test_signal_stop_is_per_run_and_cost_sums_over_segments(tmp_path: Path, signum: int) -> None:
    """A requeue-style stop (signal -> checkpoint -> Preempted) and its resume: the next run starts with a clear flag,
    the handlers are restored, the weights equal an uninterrupted run's and the cost counts both segments."""
    straight, acct_a = _fit(tmp_path / "a")
    assert (acct_a["images"], acct_a["steps"], acct_a["segments"]) == (96, 12, 1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}

    with pytest.raises(Preempted) as stop:  # Ctrl-C (SIGINT) too: a checkpoint, not a KeyboardInterrupt
        _fit(tmp_path / "b", signal_at=5, signum=signum)
    assert stop.value.signal == signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # this run's handlers are gone
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")
    assert (ck["step"], ck["accounting"]["images"], ck["accounting"]["segments"]) == (3, 24, 1)
    assert ck["accounting"]["wall_s"] > 0

    resumed, acct_b = _fit(tmp_path / "b")  # the earlier run's signal does not stop this one
    assert acct_b["completed"] and acct_b["steps"] == 12
    assert acct_b["images"] == acct_a["images"] == 96 and acct_b["segments"] == 2
    assert acct_b["wall_s"] > ck["accounting"]["wall_s"] and acct_b["wall_s"] > acct_b["segment_wall_s"]
    assert acct_b["device_s"] == pytest.approx(acct_b["wall_s"])
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_finished_stage_rerun_reports_its_cost_without_nan(tmp_path: Path) -> None:
    """Started again after it finished (killed before its result was written): the cost is the checkpoint's."""
    _, first = _fit(tmp_path)
    _, again = _fit(tmp_path)
    assert again["images"] == first["images"] == 96 and again["segments"] == 1
    assert again["step_time_s"] == first["step_time_s"] is not None and again["wall_s"] > 0
    assert worker.finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


# --------------------------------------------------------------------------------- stage folder: lock, temp files
def _spec(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    spec = d / "stage.json"
    spec.write_text(json.dumps({"name": f"pretrain/{d.name}", "key": d.name, "kind": "pretrain", "out_dir": str(d),
                                "cfg": {}}))
    return spec


def test_stage_lock_and_stale_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "stage"
    spec = _spec(d)
    (d / "checkpoints").mkdir()
    stale = [d / "checkpoints" / ".last.pth.k2j3.tmp", d / ".encoder.pth.a8f.tmp", d / ".result.json.x1.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    theirs = d / ".stage.json.q9.tmp"  # the executor's own write, never removed
    theirs.write_bytes(b"{")
    ran: list[Path] = []
    monkeypatch.setattr(worker, "run", lambda path: ran.append(Path(path)) or {"stage": "s", "status": "done",
                                                                               "metrics": {}})

    held = StageLock(d)
    assert held.acquire() and lock_holder(d) == f"pid {os.getpid()} on {os.uname().nodename}"
    assert worker.execute(spec).code == worker.BUSY_EXIT and not ran  # another holder: not run, nothing touched
    assert all(p.exists() for p in stale)
    held.release()
    assert lock_holder(d) is None

    assert worker.execute(spec).code == 0 and ran == [spec]
    assert not any(p.exists() for p in stale) and theirs.exists()
    assert lock_holder(d) is None and (d / LOCK).exists()
    assert remove_stale_tmp(d) == []

    (d / "result.json").write_text(json.dumps({"status": "done"}))  # finished by another run meanwhile
    assert worker.execute(spec).code == 0 and ran == [spec]


# ------------------------------------------------------------------------------------------------- repro status
def _stage_dir(root: Path, name: str, files: dict[str, str | bytes]) -> Path:
    d = root / "tiny" / "pretrain" / name
    d.mkdir(parents=True)
    files = {"stage.json": json.dumps({"name": f"pretrain/{name}", "label": ""}), **files}
    for rel, content in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def test_status_tolerates_corrupt_records_and_tells_resumable_from_failed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    done = json.dumps({"status": "done", "accounting": {"device_hours": 0.25}})
    _stage_dir(root, "a-done", {"result.json": done})
    _stage_dir(root, "b-killed", {"checkpoints/last.pth": b"x"})
    _stage_dir(root, "c-requeue", {"checkpoints/last.pth": b"x",  # recorded as a failure by older versions
                                   "failed.json": json.dumps({"error": "exit code 75"})})
    _stage_dir(root, "d-notrun", {})
    trunc = _stage_dir(root, "e-truncated", {"result.json": done[:20]})
    bad_spec = _stage_dir(root, "f-badspec", {})
    (bad_spec / "stage.json").write_bytes(b"\x00\xff{")
    _stage_dir(root, "g-list", {"result.json": "[1, 2]"})
    assert main(["status", "--runs-dir", str(root)]) == 1  # corrupt records count as failures
    out = capsys.readouterr().out
    states = {line[12:].split()[0].split("/")[1]: line[2:11].strip() for line in out.splitlines()[1:]}
    assert states == {"a-done": "done", "b-killed": "resumable", "c-requeue": "resumable", "d-notrun": "not run",
                      "e-truncated": "corrupt", "f-badspec": "corrupt", "g-list": "corrupt"}
    assert f"corrupt: {trunc / 'result.json'}" in out and f"corrupt: {bad_spec / 'stage.json'}" in out
    assert "Traceback" not in out

    for name in ("e-truncated", "f-badspec", "g-list"):
        shutil.rmtree(root / "tiny" / "pretrain" / name)
    assert main(["status", "--runs-dir", str(root)]) == 0  # resumable is not failed
    _stage_dir(root, "h-failed", {"failed.json": json.dumps({"error": "ValueError: boom", "log": "/x/log.txt"})})
    assert main(["status", "--runs-dir", str(root)]) == 1
    assert "failed    pretrain/h-failed  ValueError: boom; log: /x/log.txt" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ sacct, every segment
def test_sacct_reconciliation_sums_every_job_of_a_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job 7 ran twice (requeued), was stopped, and the stage was submitted again as job 8."""
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncase \"$*\" in\n"
                    "*' 7') printf '7|REQUEUED|100|cpu=2,gres/gpu=2\\n7|CANCELLED by 0|260|cpu=2,gres/gpu=2\\n';;\n"
                    "*' 8') printf '8|COMPLETED|1440|cpu=2,gres/gpu=2\\n';;\nesac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    d = tmp_path / "stage"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"status": "done", "accounting": {"device_hours": 0.5}}))
    (d / slurm.SLURM_FILE).write_text(json.dumps({"job_id": "8", "jobs": ["7", "8"]}))
    usage = slurm.reconcile(d, retries=1)
    assert usage is not None and usage["jobs"] == ["7", "8"] and usage["runs"] == 3
    acct = json.loads((d / "result.json").read_text())["accounting"]
    assert acct["device_hours_sacct"] == pytest.approx((100 + 260 + 1440) * 2 / 3600) and acct["device_hours"] == 0.5


# ------------------------------------------------------------------------------------------------- install.sh
def test_install_script_prints_the_installed_version(tmp_path: Path) -> None:
    """A fresh install (every program missing, apt-get and dpkg-query stand-ins) ends with dpkg's version."""
    if any((Path("/usr/sbin") / p).exists() for p in ("slurmctld", "munged")):
        pytest.skip("Slurm is installed here: the script exits before installing")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"apt-get": "exit 0", "sudo": 'exec "$@"', "id": "echo 0",
                       "dpkg-query": 'echo "23.02.6-1 ($*)"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    out = subprocess.run(["bash", str(REPO / "slurm/local/install.sh")], capture_output=True, text=True, timeout=60,
                         env={"PATH": path, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "unbound variable" not in out.stderr
    assert "done (slurm 23.02.6-1 (-W -f=${Version} slurmctld))" in out.stdout


# ------------------------------------------------------------------ end to end: stopping `repro`, --force, the lock
STAGE_ARGS = ["pretrain", "mae", "--scale", "tiny", "model.depth=1", "data.synthetic_train=64", "data.synthetic_val=32",
              "optim.batch_size=16", "train.batch_per_device=16", "optim.warmup_epochs=1"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "REPRO_RUNS": str(tmp / "runs"), "REPRO_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _start(tmp: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "repro", *STAGE_ARGS, *extra], env=_env(tmp), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait(cond: Callable[[], Any], what: str, timeout: float = 300.0) -> Any:
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _stage(tmp: Path) -> Path:
    return _wait(lambda: next((tmp / "runs" / "tiny" / "pretrain").glob("mae-*/stage.json"), None),
                 "the stage folder").parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _end(proc: subprocess.Popen, timeout: float = 300.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"repro did not end within {timeout:.0f} s")
    assert "Traceback" not in err and "leaked semaphore" not in err, err[-3000:]
    return proc.returncode, err


def _stop_during_training(tmp: Path, stop: Callable[[subprocess.Popen], None], resumes: int,
                          *extra: str) -> tuple[int, str]:
    """Start the stage, wait until it trains (with a checkpoint, after ``resumes`` earlier segments) and ``stop``
    it: the stage process must be gone within a bound, its lock free and its checkpoint on disk."""
    proc = _start(tmp, *extra)
    d = _stage(tmp)
    log = d / "log.txt"
    _wait(lambda: (d / "checkpoints" / "last.pth").exists() and log.read_text().count("resumed from") >= resumes
          and lock_holder(d), "training to start")
    pid = int(lock_holder(d).split()[1])
    stop(proc)
    _wait(lambda: not _alive(pid), "the stage process to stop", timeout=120)
    assert lock_holder(d) is None and (d / "checkpoints" / "last.pth").exists() and not (d / "result.json").exists()
    return _end(proc, timeout=120)


@pytest.mark.slow
def test_stopping_repro_stops_its_stage_and_cost_sums_over_segments(tmp_path: Path) -> None:
    """SIGTERM to `repro` only, SIGKILL to `repro` only, and Ctrl-C (SIGINT to the terminal's process group): each
    time the stage checkpoints and stops; the fourth run finishes; the result counts every segment."""
    ep = "optim.epochs=25"  # 100 steps
    # 1. SIGTERM to the repro process only: passed on to the stage, which checkpoints and stops.
    rc, err = _stop_during_training(tmp_path, lambda p: p.send_signal(signal.SIGTERM), 0, ep)
    assert rc == 128 + signal.SIGTERM and "run the same command again to resume" in err
    d = _stage(tmp_path)
    assert "stopped: signal 15" in (d / "log.txt").read_text()
    status = subprocess.run([sys.executable, "-m", "repro", "status"], env=_env(tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "resumable" in status.stdout, status.stdout + status.stderr
    # 2. SIGKILL to the repro process only: the orphaned stage gets SIGTERM from the kernel (parent death).
    _stop_during_training(tmp_path, lambda p: p.kill(), 1, ep)
    assert (d / "log.txt").read_text().count("stopped: signal 15") == 2
    # 3. Ctrl-C in a terminal: SIGINT to the whole process group.
    rc, err = _stop_during_training(tmp_path, lambda p: os.killpg(p.pid, signal.SIGINT), 2, ep)
    assert rc == 128 + signal.SIGINT and "run the same command again to resume" in err
    # the stage gets the terminal's SIGINT and, from `repro`, SIGTERM: it records whichever its handler saw first
    text = (d / "log.txt").read_text()
    stops = text.count("stopped: signal")
    assert stops == 3 and text.count("stopped: signal 15") + text.count("stopped: signal 2") == stops
    # 4. To the end; the cost is that of the four segments.
    rc, _ = _end(_start(tmp_path, ep))
    assert rc == 0
    text = (d / "result.json").read_text()
    acct = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in result.json"))["accounting"]
    assert (acct["epochs"], acct["steps"], acct["images"], acct["segments"]) == (25, 100, 25 * 64, 4)
    assert acct["wall_s"] > acct["segment_wall_s"] > 0 and acct["step_time_s"] > 0
    assert acct["device_hours"] == pytest.approx(acct["device_s"] / 3600)


@pytest.mark.slow
def test_two_runs_of_one_stage_train_it_once_and_force_retrains(tmp_path: Path) -> None:
    first = _start(tmp_path, "optim.epochs=3")
    d = _stage(tmp_path)
    second = _start(tmp_path, "optim.epochs=3")
    (rc1, err1), (rc2, err2) = _end(first), _end(second)
    assert rc1 == rc2 == 0
    log = (d / "log.txt").read_text()
    assert log.count("] done:") == 1 and "resumed from" not in log  # trained once, by one process
    assert "another run is training it" in err1 + err2 or "done already (by another run)" in log
    # --force: from scratch (its finished checkpoint is not resumed), one segment, a real step time.
    rc, _ = _end(_start(tmp_path, "optim.epochs=3", "--force"))
    log = (d / "log.txt").read_text()
    assert rc == 0 and log.count("] done:") == 2 and "resumed from" not in log
    acct = json.loads((d / "result.json").read_text())["accounting"]
    assert (acct["segments"], acct["steps"], acct["images"]) == (1, 12, 3 * 64) and acct["step_time_s"] > 0
