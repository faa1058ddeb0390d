"""Scheduler accounting: the cost of a stage's jobs from ``sacct`` (elapsed x allocated gres/gpu, or x CPUs without
GPUs, summed over requeued runs and over every job that ran the stage), stored in ``result.json`` beside the
engine's own figure (``accounting.device_hours`` stays the engine's; ``device_hours_sacct`` is the scheduler's)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from repro.io import atomic_write_json
from repro.pipeline.slurm_sched import ACTIVE, SLURM_FILE
from repro.pipeline.stage import RESULT


def _tres(alloc: str, key: str) -> int:
    for item in alloc.split(","):
        k, _, v = item.partition("=")
        if k == key:
            return int(v)
    return 0


def sacct_usage(job_id: str) -> dict[str, Any] | None:
    """Scheduler cost of a job: elapsed x allocated GPUs (gres/gpu), or x CPUs without GPUs, over every run of it
    (a requeued job has one record per run). None until sacct has recorded the job's end."""
    res = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State,ElapsedRaw,AllocTRES", "-j", job_id],
                         capture_output=True, text=True, timeout=30)
    rows = [line.split("|") for line in res.stdout.splitlines() if line.count("|") == 3]
    rows = [r for r in rows if r[0] == job_id]
    if not rows or rows[-1][1].split()[0] in ACTIVE:  # earlier records of a requeued job read REQUEUED
        return None
    elapsed = sum(int(r[2] or 0) for r in rows)
    gpus = max(_tres(r[3], "gres/gpu") for r in rows)
    cpus = max(_tres(r[3], "cpu") for r in rows)
    gpu_s = sum(int(r[2] or 0) * _tres(r[3], "gres/gpu") for r in rows)
    cpu_s = sum(int(r[2] or 0) * _tres(r[3], "cpu") for r in rows)
    unit = "gpu" if gpus else "cpu"
    return {"job_id": job_id, "runs": len(rows), "elapsed_s": elapsed, "alloc_tres": rows[-1][3], "gpus": gpus,
            "cpus": cpus, "unit": unit, "hours": (gpu_s if gpus else cpu_s) / 3600.0,
            "states": [r[1].split()[0] for r in rows]}


def job_history(stage_dir: Path) -> list[str]:
    """Every Slurm job that has run the stage since it was last started from scratch, oldest first (a stage stopped
    and submitted again runs as a new job; a requeued job keeps its id)."""
    try:
        info = json.loads((stage_dir / SLURM_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [str(j) for j in info.get("jobs") or ([info["job_id"]] if info.get("job_id") else [])]


def reconcile(stage_dir: Path, retries: int = 10, wait_s: float = 1.0) -> dict[str, Any] | None:
    """Record the sacct figure in the stage's result.json beside the engine's ``device_hours``: the sum over every
    run of every job of the stage (``job_history``)."""
    res_path, slurm_path = stage_dir / RESULT, stage_dir / SLURM_FILE
    if not (res_path.is_file() and slurm_path.is_file()):
        return None
    jobs = job_history(stage_dir)
    if not jobs:
        return None
    usage = None
    for _ in range(retries):
        usage = sacct_usage(jobs[-1])
        if usage:
            break
        time.sleep(wait_s)
    if not usage:
        return None
    for u in filter(None, (sacct_usage(j) for j in jobs[:-1])):  # earlier jobs of the stage (purged ones: skipped)
        usage["hours"] += u["hours"] if u["unit"] == usage["unit"] else 0.0
        usage["runs"] += u["runs"]
        usage["elapsed_s"] += u["elapsed_s"]
        usage["states"] = u["states"] + usage["states"]
    usage["jobs"] = jobs
    result = json.loads(res_path.read_text())
    acct = result["accounting"]
    # Both figures stay: ``device_hours`` (the engine's: training wall x processes, what the tables compare with the
    # papers) and the scheduler's charge (every run of the job, start-up and evaluation included, x allocated units).
    acct["sacct"] = usage
    acct["device_hours_sacct"] = usage["hours"]
    acct["device_hours_sacct_unit"] = usage["unit"] + "-hours"
    atomic_write_json(res_path, result)
    return usage

