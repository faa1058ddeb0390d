"""What each task of a stage's Slurm job runs: ``python -m repro.pipeline.slurm_job --max-requeues N SPEC...`` (the
line the sbatch script puts under ``srun``; a job array's task takes the spec at ``$SLURM_ARRAY_TASK_ID``).

It runs the ordinary worker under the task's torch.distributed environment (submitit's public ``JobEnvironment`` and
``TorchDistributedEnvironment``), records the job in the stage's ``slurm.json``, bounds requeues by the profile's
``max_requeues`` (``SLURM_RESTART_COUNT``), and on a USR1/USR2 notice (the time limit ahead, or a preemption) requeues
its own job with ``scontrol requeue``: the engine checkpoints first when it is training; before and after training the
notice requeues at once. SIGTERM (a requeue, a preemption, ``scancel``) is left to the engine while it trains and
otherwise ends the task; Slurm decides whether the job comes back. The stage's state lives in its folder (its
checkpoint), never in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from repro.io import atomic_write_json
from repro.pipeline.slurm_sched import SLURM_FILE
from repro.pipeline.stage import FAILED
from repro.pipeline.worker import PREEMPTED_EXIT

NOTICES = (signal.SIGUSR1, signal.SIGUSR2)


def requeue(job_id: str, signum: int) -> None:
    """Put this job back in the queue (Slurm then stops its tasks); the stage resumes from its checkpoint."""
    subprocess.check_call(["scontrol", "requeue", str(job_id)], timeout=60)
    print(f"requeued job {job_id} after signal {signum}", flush=True)


def on_notice(env: Any) -> None:
    """Requeue on a USR1/USR2 notice while the engine has no handler of its own installed (task 0 requeues; the
    others wait to be stopped by Slurm)."""

    def handler(signum: int, frame: Any) -> None:
        if env.global_rank == 0:
            requeue(env.job_id, signum)
            sys.exit(-1)

    for sig in NOTICES:
        signal.signal(sig, handler)


class StageJob:
    """One task of a stage's job: the ordinary worker under the task's environment."""

    def __init__(self, spec_path: str, max_requeues: int) -> None:
        self.spec_path = str(spec_path)
        self.max_requeues = max_requeues

    def _fail(self, out_dir: Path, msg: str, log: str) -> None:
        atomic_write_json(out_dir / FAILED, {"error": msg, "log": log, "time": time.time()})

    def __call__(self) -> None:
        import submitit

        env = submitit.JobEnvironment()
        out_dir = Path(self.spec_path).parent
        log = str(env.paths.stderr)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; every task sees the node's GPUs, LOCAL_RANK picks one.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if env.global_rank == 0:
            (out_dir / FAILED).unlink(missing_ok=True)
            info = json.loads((out_dir / SLURM_FILE).read_text()) if (out_dir / SLURM_FILE).is_file() else {}
            info.update({"job_id": str(env.job_id), "stdout": str(env.paths.stdout), "stderr": log,
                         "restarts": restarts, "hostnames": env.hostnames})
            info["jobs"] = [*(j for j in info.get("jobs") or [] if j != str(env.job_id)), str(env.job_id)]
            atomic_write_json(out_dir / SLURM_FILE, info)
        if restarts > self.max_requeues:
            msg = f"requeued {restarts} times (profile max_requeues={self.max_requeues}); giving up"
            if env.global_rank == 0:
                self._fail(out_dir, msg, log)
            raise RuntimeError(msg)
        from repro.pipeline import worker

        outcome = worker.execute(self.spec_path)
        rc = outcome.code
        if rc == 0:
            return
        if rc == PREEMPTED_EXIT:
            if outcome.signal in NOTICES and env.global_rank == 0:
                requeue(env.job_id, outcome.signal)  # the checkpoint is on disk
            # SIGTERM: a requeue / preemption (Slurm brings the job back) or a cancel (it does not).
            sys.exit(-1)
        if env.global_rank == 0 and (out_dir / FAILED).is_file():  # point failed.json at the Slurm log
            info = json.loads((out_dir / FAILED).read_text())
            info["log"] = log
            atomic_write_json(out_dir / FAILED, info)
        err = json.loads((out_dir / FAILED).read_text()).get("error") if (out_dir / FAILED).is_file() else None
        raise RuntimeError(f"stage {out_dir.name} failed: {err or f'exit code {rc}'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.pipeline.slurm_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-requeues", type=int, required=True)
    p.add_argument("specs", nargs="+", help="stage.json of each stage (one per array task)")
    args = p.parse_args(argv)
    spec = args.specs[int(os.environ.get("SLURM_ARRAY_TASK_ID") or 0)]
    import submitit

    on_notice(submitit.JobEnvironment())
    try:
        StageJob(spec, args.max_requeues)()
    except RuntimeError as e:  # the stage failed (failed.json says why): the job ends FAILED
        print(f"repro: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
