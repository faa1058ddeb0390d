"""What the scheduler is asked: ``sinfo`` (partitions), ``squeue``/``sacct`` (job states), ``sbatch`` (submission)
and ``scancel``; each failure is one line naming the command."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from repro.config import ConfigError

SLURM_FILE = "slurm.json"  # per stage: job id, log paths, cluster
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED")


def scheduler_cmd(args: Sequence[str], timeout: float = 30) -> str:
    """Run a scheduler command; its stdout, or one line saying why it could not run."""
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True).stdout
    except FileNotFoundError:
        raise ConfigError(f"`{args[0]}` is not installed here; run on a Slurm login node "
                          "(or start the local test cluster: slurm/local/start.sh)") from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"`{' '.join(args)}` failed: {(e.stderr or e.stdout).strip()[:200]}") from None


def cluster_partitions() -> list[str] | None:
    """The partitions the scheduler reports, or None when there is no ``sinfo`` here (dry-run on a laptop)."""
    if not shutil.which("sinfo"):
        return None
    return [p.rstrip("*") for p in scheduler_cmd(["sinfo", "-h", "-o", "%P"]).split()]


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Current state of each job (array tasks as ``<array>_<task>``): squeue for live jobs, sacct for ended ones."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    out: dict[str, str] = {}
    if shutil.which("squeue"):
        res = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30)
        for line in res.stdout.splitlines():
            jid, _, st = line.partition(" ")
            out[jid] = st.strip()
    missing = [j for j in ids if j not in out]
    if missing and shutil.which("sacct"):
        # An array's tasks that never started have one record, "<array>_[0-2%2]", and none of their own.
        query = sorted({j.split("_")[0] for j in missing} | set(missing))
        res = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(query)],
                             capture_output=True, text=True, timeout=30)
        whole: dict[str, str] = {}
        for line in res.stdout.splitlines():
            jid, _, st = line.partition("|")
            st = st.split()[0] if st else "UNKNOWN"
            if jid in missing:
                out[jid] = st
            elif "_[" in jid:
                whole[jid.split("_")[0]] = st
        for j in missing:
            if j not in out and "_" in j and j.split("_")[0] in whole:
                out[j] = whole[j.split("_")[0]]
    return out



def sbatch(script: Path) -> str:
    """Submit the script at ``script``; its job id (an array's id for an array)."""
    out = scheduler_cmd(["sbatch", str(script)], timeout=60)
    found = re.search(r"job (\d+)", out)
    if not found:
        raise ConfigError(f"`sbatch {script}` printed no job id: {out.strip()[:200]!r}")
    return found.group(1)
