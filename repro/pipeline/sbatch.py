"""The sbatch script of a stage job, written by the suite itself (so that a dry run prints exactly what is submitted,
and nothing private of submitit's is used). Its parameters use the vocabulary of submitit's public
``SlurmExecutor.update_parameters`` (``slurm_params``); its logs follow submitit's layout (``<folder>/<job
id>/<job id>_<task>_log.{out,err}``), which ``submitit.JobEnvironment().paths`` reads back inside the job."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repro.config import CONTROL, ConfigError, short

ENTRY = "repro.pipeline.slurm_job"  # the module each task of a stage job runs
# Parameters that are not sbatch options: the job's preamble and array settings.
NOT_SBATCH = ("setup", "signal_delay_s", "additional_parameters", "array_parallelism")


def safe_text(text: str, what: str, limit: int = 4096) -> str:
    """Refuse a string that reaches an sbatch script with a control character (a newline would end an #SBATCH line
    and run the rest as a command), or that is empty or too long."""
    if not isinstance(text, str) or not text or CONTROL.search(text) or len(text) > limit:
        raise ConfigError(f"{what} {short(text)} is not allowed: it must be non-empty, at most {limit} characters, "
                          "without control characters (newline, tab, ...)")
    return text


def log_folder(folder: Path) -> Path:
    """The per-job log folder pattern under a log root (``%j``: the job id, ``<array>_<task>`` in an array)."""
    return Path(folder).expanduser().absolute() / "%j"


def job_logs(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of task ``task`` of job ``job_id`` under the log root ``folder``."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(log_folder(folder), job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr


def _option(key: str, value: Any) -> str:
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_script(params: Mapping[str, Any], folder: Path, command: Sequence[str], array: int | None = None) -> str:
    """The script for one job (``array``: a job array of that many tasks): every sbatch option from ``params``, the
    profile's setup lines, then the command under ``srun`` (one process per task, each with its own log)."""
    jobs = log_folder(folder)
    opts = {k: v for k, v in params.items() if k not in NOT_SBATCH and v is not None}
    opts["signal"] = f"USR2@{params.get('signal_delay_s', 90)}"  # time-limit notice: the stage checkpoints, requeues
    pattern = "%j"
    if array:
        opts["array"] = f"0-{array - 1}%{min(array, int(params.get('array_parallelism') or array))}"
        pattern = "%A_%a"
    task_out = str(jobs / "%j_%t_log.out").replace("%j", pattern)
    task_err = str(jobs / "%j_%t_log.err").replace("%j", pattern)
    opts.update({"output": task_out.replace("%t", "0"), "error": task_err.replace("%t", "0"), "open_mode": "append"})
    opts.update(params.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters", *(_option(k, opts[k]) for k in sorted(opts))]
    if params.get("setup"):
        lines += ["", "# setup", *params["setup"]]
    srun = ["srun", "--unbuffered", "--output", task_out, "--error", task_err]
    lines += ["", "# command",
              "export SUBMITIT_EXECUTOR=slurm",  # submitit.JobEnvironment reads the task environment from Slurm's
              f"export SUBMITIT_FOLDER={shlex.quote(str(jobs))}",  # ... and its log paths from here
              " ".join([shlex.join(srun), *command]), ""]
    return "\n".join(lines)


def job_command(python: str, specs: Sequence[Path], max_requeues: int) -> list[str]:
    """The command each task runs, as shell words: the job entry with the stage specs (a job array's task picks its
    own by ``SLURM_ARRAY_TASK_ID``). ``python`` is a path; the job reads its log folder from ``SUBMITIT_FOLDER``."""
    return [shlex.quote(python), "-u", "-m", ENTRY, "--max-requeues", str(int(max_requeues)),
            *(shlex.quote(str(p)) for p in specs)]
