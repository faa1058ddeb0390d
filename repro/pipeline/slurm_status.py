"""``repro status`` and ``repro cancel``: the state of every stage under a run root, from its files, its lock and
(if it was submitted) the scheduler; and scancel of a submission's jobs still queued or running."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.pipeline.slurm_accounting import job_history, reconcile
from repro.pipeline.slurm_sched import ACTIVE, SLURM_FILE, job_states, scheduler_cmd
from repro.pipeline.stage import CHECKPOINTS, FAILED, LOG, RESULT, lock_holder, read_json
from repro.pipeline.worker import PREEMPTED_EXIT


def stage_dirs(runs_root: Path) -> list[Path]:
    """Every stage folder under a run root (a folder with a stage.json)."""
    return sorted(p.parent for p in Path(runs_root).glob("*/*/*/stage.json"))


def stage_status(d: Path, states: Mapping[str, str] | None = None) -> dict[str, Any]:
    """State of one stage folder from its files, its lock and (if it was submitted) the scheduler: done, pending,
    running, failed, cancelled, resumable (stopped with a checkpoint: a rerun resumes it), corrupt or not run."""
    try:
        spec, info, result, err = (read_json(d / name) for name in ("stage.json", SLURM_FILE, RESULT, FAILED))
        bad = next((n for n, v in (("stage.json", spec), (SLURM_FILE, info), (RESULT, result), (FAILED, err))
                    if v is not None and not isinstance(v, dict)), None)
        if bad or not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"corrupt: {d / (bad or 'stage.json')} (not a stage record)")
    except ValueError as e:  # a truncated or corrupt record: reported, never a traceback
        return {"stage": f"{d.parent.name}/{d.name}", "label": "", "dir": str(d), "job_id": None, "scheduler": "",
                "log": str(d / LOG), "state": "corrupt", "error": str(e)}
    info = info or {}
    job = info.get("job_id")
    sched = (states or {}).get(job, "") if job else ""
    row = {"stage": spec["name"], "label": spec.get("label", ""), "dir": str(d), "job_id": job,
           "scheduler": sched, "log": info.get("stderr") or str(d / LOG)}
    checkpoint = d / CHECKPOINTS / "last.pth"
    holder = lock_holder(d)
    if result and result.get("status") == "done":
        acct = result.get("accounting", {})
        row.update(state="done", hours=acct.get("device_hours"), sacct_hours=acct.get("device_hours_sacct"),
                   sacct_unit=acct.get("device_hours_sacct_unit"))
    elif sched.split(" ")[0] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
        row["state"] = "pending"
    elif sched.split(" ")[0] in ("RUNNING", "COMPLETING", "SUSPENDED"):
        row["state"] = "running"
    elif holder:  # a local run holds the stage's lock
        row.update(state="running", holder=holder)
    elif err and err.get("error") != f"exit code {PREEMPTED_EXIT}":  # (older runs recorded a stop as a failure)
        row.update(state="failed", error=err.get("error"), log=err.get("log") or row["log"])
    elif sched.startswith("CANCELLED"):
        resume = "; it has a checkpoint: running it again resumes it" if checkpoint.is_file() else ""
        row.update(state="cancelled", error=f"job {job} was cancelled (by `repro cancel`, or an input failed){resume}")
    elif checkpoint.is_file():  # killed, or stopped by a signal (exit 75) for a requeue that did not come
        row.update(state="resumable", checkpoint=str(checkpoint))
    elif sched:
        row.update(state="failed", error=f"job {job} ended {sched} without a result")
    else:
        row["state"] = "not run"
    return row


def status_report(runs_root: Path) -> list[dict[str, Any]]:
    dirs = stage_dirs(runs_root)
    jobs = [h[-1] for h in map(job_history, dirs) if h]
    states = job_states(jobs) if jobs and shutil.which("squeue") else {}
    rows = []
    for d in dirs:
        row = stage_status(d, states)
        # A detached run: reconcile with sacct now that the job has ended.
        if (row["state"] == "done" and row["sacct_hours"] is None and row["job_id"] and shutil.which("sacct")
                and reconcile(d, retries=1)):
            row = stage_status(d, states)
        rows.append(row)
    return rows


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for r in rows:
        extra = ""
        if r["state"] == "done" and r.get("hours") is not None:
            extra = f"  engine {r['hours']:.4f} device-h"
            if r.get("sacct_hours") is not None:
                extra += f", sacct {r['sacct_hours']:.4f} {r['sacct_unit']}"
        elif r["state"] in ("pending", "running") and r.get("holder"):
            extra = f"  locally ({r['holder']}); log: {r['log']}"
        elif r["state"] in ("pending", "running"):
            extra = f"  job {r['job_id']} ({r['scheduler'].lower()})"
        elif r["state"] in ("failed", "cancelled"):
            extra = f"  {r.get('error')}; log: {r['log']}"
        elif r["state"] == "resumable":
            extra = f"  stopped with a checkpoint ({r['checkpoint']}); running it again resumes it"
        elif r["state"] == "corrupt":
            extra = f"  {r['error']}"
        label = f" {r['label']}" if r["label"] else ""
        lines.append(f"  {r['state']:9s} {r['stage']}{label}{extra}")
    return "\n".join(lines) or "  (no stages)"


def cancel(runs_root: Path, all_jobs: bool = False) -> list[str]:
    """scancel the jobs of the latest submission under ``runs_root`` (or of every submission) still queued/running."""
    path = Path(runs_root) / "slurm" / "submissions.jsonl"
    if not path.is_file():
        raise ConfigError(f"no Slurm submission recorded under {runs_root} ({path} is missing); check --runs-dir")
    subs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = subs if all_jobs else subs[-1:]
    ids = [j["job_id"] for s in chosen for j in s["jobs"]]
    states = job_states(ids)
    live = [j for j in ids if states.get(j, "").split(" ")[0] in ACTIVE]
    if live:
        scheduler_cmd(["scancel", *live])
    return live

