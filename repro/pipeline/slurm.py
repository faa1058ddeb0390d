"""Slurm executor: the whole DAG of stages submitted at once, each job held by ``afterok`` dependencies on its
inputs; stages that share resources and inputs (a sweep's rows) go out as one job array with a parallelism limit.

What the official code does: MAE (and LoMaR / LocalMIM, which inherit it) submits one training with submitit's
``AutoExecutor`` to a hard-coded ``/checkpoint/$USER`` folder; on USR2 its ``checkpoint()`` resumes only from
``output_dir/checkpoint.pth``, a file the training never writes, so a preempted job restarts at epoch 0. Here:

* the engine checkpoints every epoch (``checkpoints/last.pth``, every RNG included) and, on SIGUSR1/SIGUSR2 (the
  script's ``--signal=USR2@<signal_delay_s>`` ahead of the time limit, or ``scancel --signal=USR2``), at the next
  optimizer step; the job then requeues itself (``scontrol requeue``) and resumes exactly. On SIGTERM (``scontrol
  requeue``, a preemption, ``scancel``) it also checkpoints and exits; Slurm itself decides whether the job comes back.
* a stage that raises fails for good (``failed.json``; its dependents are cancelled by ``--kill-on-invalid-dep``);
  requeues are bounded by the profile's ``max_requeues`` (Slurm's ``SLURM_RESTART_COUNT``).
* resources per stage come from ``slurm/resources.yaml``, checked against a cluster profile (``slurm_resources``);
  one task per GPU, torch.distributed from the task environment (NCCL on GPUs, gloo on CPUs).
* the suite writes each job's sbatch script itself (``sbatch``) and submits it with ``sbatch``; a dry run prints the
  same scripts. Each task runs ``python -m repro.pipeline.slurm_job`` (``slurm_job``), which takes its environment
  from submitit's public ``JobEnvironment``/``TorchDistributedEnvironment``.
* after a stage ends its scheduler cost is reconciled with ``sacct`` (``slurm_accounting``); ``repro status`` and
  ``repro cancel`` are in ``slurm_status``.

The names callers use are importable from here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.io import atomic_write_json, atomic_write_text
from repro.pipeline import slurm_sched
from repro.pipeline.execute import HEARTBEAT_S, Progress, write_spec
from repro.pipeline.sbatch import job_command, job_logs, safe_text, sbatch_script
from repro.pipeline.slurm_accounting import job_history, reconcile, sacct_usage
from repro.pipeline.slurm_job import StageJob
from repro.pipeline.slurm_resources import (
    RES_KEYS,
    RES_RULES,
    Profile,
    Resources,
    TimeLimit,
    TimePlan,
    check_resources,
    fit_to_profile,
    list_profiles,
    load_profile,
    mem_gb,
    parse_res_overrides,
    slurm_dir,
    slurm_params,
    stage_resources,
)
from repro.pipeline.slurm_sched import ACTIVE, SLURM_FILE, cluster_partitions, job_states
from repro.pipeline.slurm_status import cancel, format_status, stage_dirs, stage_status, status_report
from repro.pipeline.stage import FAILED, Stage, reset, topo_order
from repro.pipeline.worker import PREEMPTED_EXIT

__all__ = ["ACTIVE", "PREEMPTED_EXIT", "RES_KEYS", "RES_RULES", "SLURM_FILE", "Group", "Profile", "Resources",
           "SlurmExecutor", "StageJob", "cancel", "check_partition", "check_resources", "check_writable",
           "cluster_partitions", "fit_to_profile", "format_status", "job_history", "job_name", "job_states",
           "list_profiles", "load_profile", "make_executor", "mem_gb", "parse_res_overrides", "reconcile",
           "runs_root_for", "sacct_usage", "safe_text", "slurm_dir", "slurm_params", "stage_dirs", "stage_resources",
           "stage_status", "status_report"]


def check_partition(prof: Profile) -> None:
    """Refuse a profile whose partition the scheduler here does not list (not checked without ``sinfo``)."""
    parts = cluster_partitions()
    if parts is not None and prof.partition and prof.partition not in parts:
        raise ConfigError(f"cluster profile '{prof.name}': partition '{prof.partition}' does not exist here "
                          f"(sinfo lists: {', '.join(parts) or 'none'}); fix `partition:` in the profile")


def check_writable(path: Path, what: str) -> Path:
    """``path`` (``~`` and ``$VARS`` expanded) created if needed; refused unless absolute and writable."""
    path = Path(os.path.expandvars(os.path.expanduser(safe_text(str(path), what))))
    if not path.is_absolute():
        raise ConfigError(f"{what} {path} is relative; give an absolute folder on the shared filesystem")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be created ({e.strerror}); pick a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable; pick a writable folder on the shared filesystem")
    return path


@dataclass
class Group:
    """Stages submitted as one job (or one array when several): same resources, same inputs' jobs."""

    stages: list[Stage]
    res: Resources
    deps: list[Stage]
    job_ids: list[str] = field(default_factory=list)


def job_name(group: Group) -> str:
    """The Slurm job name of a group: its first stage's name (+ the number of further array tasks)."""
    n = len(group.stages)
    return safe_text(group.stages[0].name.replace("/", "-") + (f"+{n - 1}" if n > 1 else ""), "job name")


class SlurmExecutor:
    """Same interface as ``LocalExecutor``: ``run(stages, runs_root, force)`` -> key -> done/skipped/failed/blocked."""

    def __init__(self, profile: Profile, log_root: Path | None = None, res_overrides: Mapping[str, Any] | None = None,
                 dry_run: bool = False, wait: bool = True, poll_s: float = 3.0, out: Any = None,
                 tables: Mapping[str, Iterable[Stage]] | None = None, device: str | None = None) -> None:
        self.profile = profile
        self.device = device  # the profile set that projects each stage's --time (--device; see TimePlan)
        self.times: dict[str, TimeLimit] = {}  # stage key -> its --time and the rule that set it
        self.time_plan = TimePlan(profile)
        self.tables = tables  # table id -> its stages: per-table counts in the progress lines
        self.log_root = log_root
        self.res_overrides = dict(res_overrides or {})
        self.dry_run = dry_run
        self.wait = wait
        self.poll_s = poll_s
        self.out = out or sys.stdout

    # -- planning
    def groups(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> tuple[list[Group], list[Stage]]:
        """(groups to submit in order, stages already done). Each stage is checked against the profile here."""
        order = topo_order(stages)
        todo = [s for s in order if force or not s.done(runs_root)]
        todo_keys = {s.key for s in todo}
        level: dict[str, int] = {}
        for s in todo:
            level[s.key] = 1 + max((level[d.key] for d in s.deps.values() if d.key in todo_keys), default=-1)
        groups: dict[tuple[Any, ...], Group] = {}
        self.time_plan = TimePlan.for_stages(order, self.profile, self.device)  # one profile set for the whole plan
        for s in todo:
            res = stage_resources(s, self.res_overrides, self.profile)
            self.times[s.key] = self.time_plan.limit(s, res, self.res_overrides)
            res = replace(res, time_min=self.times[s.key].minutes)
            check_resources(res, self.profile, f"stage {s.name}")
            if "optim" in s.cfg:
                from repro.config import accumulation

                accumulation(s.cfg, res.world_size)
            deps = sorted((d for d in s.deps.values() if d.key in todo_keys), key=lambda d: d.key)
            # an array asks for its longest stage's time
            gk = (level[s.key], tuple(sorted((k, v) for k, v in asdict(res).items() if k != "time_min")),
                  tuple(d.key for d in deps))
            g = groups.setdefault(gk, Group([], res, deps))
            g.stages.append(s)
            if (res.time_min or 0) > (g.res.time_min or 0):
                g.res = res
        done = [s for s in order if s.key not in todo_keys]
        return sorted(groups.values(), key=lambda g: level[g.stages[0].key]), done

    def _log_root(self, runs_root: Path) -> Path:
        root = self.log_root or (Path(self.profile.log_root) if self.profile.log_root else runs_root / "slurm" / "logs")
        return Path(os.path.expandvars(os.path.expanduser(str(root))))

    def _folder(self, runs_root: Path) -> Path:
        return check_writable(self._log_root(runs_root), "log root")

    def script(self, folder: Path, group: Group, dependency: str | None, runs_root: Path) -> str:
        """The sbatch script of ``group`` (one job, or a job array when it has several stages) with its logs under
        ``folder``: what ``submit`` sends to sbatch, and what a dry run prints."""
        params = slurm_params(group.res, self.profile, job_name(group))
        if dependency:
            params["dependency"] = dependency
        params["array_parallelism"] = self.profile.array_parallelism
        specs = [Path(s.dir(runs_root)).absolute() / "stage.json" for s in group.stages]
        command = job_command(self.profile.python or sys.executable, specs, self.profile.max_requeues)
        return sbatch_script(params, folder, command, array=len(specs) if len(specs) > 1 else None)

    def render(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> str:
        """The sbatch scripts that ``run`` would submit, each exactly as it would be submitted (dependencies on jobs
        not yet submitted as ``$JOB_<n>``, or ``$JOB_<n>_<i>`` for task i of an array, as Slurm's
        ``afterok:<array>_<i>``)."""
        groups, done = self.groups(stages, runs_root, force)
        check_writable(runs_root, "run root")  # the partition is not checked: a dry run may be made off the cluster
        folder = self._log_root(runs_root)
        lines = [f"# cluster '{self.profile.name}': {len(groups)} job(s) for "
                 f"{sum(len(g.stages) for g in groups)} stage(s); {len(done)} stage(s) done already",
                 *(f"# {line}" for line in self.time_plan.describe().splitlines())]
        ref = {s.key: f"$JOB_{i}" + (f"_{j}" if len(g.stages) > 1 else "")  # an array task: <array>_<index>
               for i, g in enumerate(groups, 1) for j, s in enumerate(g.stages)}
        for i, g in enumerate(groups, 1):
            lines.append(f"\n# ---- JOB_{i}: {len(g.stages)} stage(s), world size {g.res.world_size}")
            lines += [f"#   {s.name} {s.label} -> {s.dir(runs_root)}; {self.times[s.key]}" for s in g.stages]
            dep = "afterok:" + ":".join(ref[d.key] for d in g.deps) if g.deps else None
            lines.append(self.script(folder, g, dep, runs_root).rstrip())
        return "\n".join(lines)

    # -- submission
    def _sbatch(self, folder: Path, group: Group, dependency: str | None, runs_root: Path) -> list[str]:
        """Submit one group; the job id of each of its stages (``<array>_<i>`` in an array). The script is kept in
        the first stage's log folder (``<job id>_submission.sh``)."""
        tmp = atomic_write_text(folder / f".submission_{uuid.uuid4().hex}.sh",
                                self.script(folder, group, dependency, runs_root))
        try:
            job_id = slurm_sched.sbatch(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        ids = [f"{job_id}_{i}" for i in range(len(group.stages))] if len(group.stages) > 1 else [job_id]
        for jid in ids:  # Slurm opens the logs there; it does not create folders
            job_logs(folder, jid)[0].parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(job_logs(folder, ids[0])[0].parent / f"{job_id}_submission.sh")
        return ids

    def submit(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        """Submit every stage not done (all at once, dependencies as afterok); returns stage key -> job id."""
        check_partition(self.profile)
        groups, _ = self.groups(stages, runs_root, force)
        check_writable(runs_root, "run root")
        folder = self._folder(runs_root)
        live = self._live_jobs([s for g in groups for s in g.stages], runs_root)
        job_of: dict[str, str] = {}
        record = []
        for g in groups:
            fresh = [s for s in g.stages if s.key not in live]
            for s in g.stages:
                if s.key in live:
                    job_of[s.key] = live[s.key]
                    print(f"  {s.name}: already queued as job {live[s.key]}", file=self.out)
            if not fresh:
                continue
            dep_ids = [job_of[d.key] for d in g.deps]
            specs = []
            for s in fresh:
                d = s.dir(runs_root)
                if force:
                    reset(d)  # result, failure and checkpoints: the stage starts from scratch
                (d / FAILED).unlink(missing_ok=True)
                specs.append(write_spec(s, runs_root))
            ids = self._sbatch(folder, Group(fresh, g.res, g.deps), "afterok:" + ":".join(dep_ids) if dep_ids else None,
                               runs_root)
            for s, jid, spec in zip(fresh, ids, specs):
                job_of[s.key] = jid
                stdout, stderr = job_logs(folder, jid)
                earlier = [] if force else job_history(spec.parent)  # a resumed stage's cost includes them
                atomic_write_json(spec.parent / SLURM_FILE, {
                    "job_id": jid, "jobs": [*earlier, jid], "cluster": self.profile.name, "submitted": time.time(),
                    "stdout": str(stdout), "stderr": str(stderr), "restarts": 0, "dependency": dep_ids,
                    "resources": asdict(g.res), "time_rule": str(self.times[s.key])})
                record.append({"stage": s.name, "dir": str(spec.parent), "job_id": jid})
                after = f" after {','.join(dep_ids)}" if dep_ids else ""
                print(f"  {s.name} {s.label}: job {jid}{after} (log: {stderr})", file=self.out, flush=True)
        sub_dir = check_writable(runs_root / "slurm", "run root")
        with open(sub_dir / "submissions.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "cluster": self.profile.name, "jobs": record}) + "\n")
        return job_of

    def _live_jobs(self, stages: Sequence[Stage], runs_root: Path) -> dict[str, str]:
        """Stages whose recorded job is still queued or running (not submitted twice)."""
        recorded = {}
        for s in stages:
            p = s.dir(runs_root) / SLURM_FILE
            if p.is_file():
                recorded[s.key] = json.loads(p.read_text())["job_id"]
        states = job_states(recorded.values()) if recorded else {}
        return {k: j for k, j in recorded.items() if states.get(j, "").split(" ")[0] in ACTIVE}

    def run(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        stages = topo_order(stages)
        if self.dry_run:
            print(self.render(stages, runs_root, force), file=self.out)
            return {s.key: "skipped" for s in stages}
        done_before = {s.key for s in stages if s.done(runs_root) and not force}
        job_of = self.submit(stages, runs_root, force)
        status = {k: "skipped" for k in done_before}
        if not self.wait:
            status.update({k: "submitted" for k in job_of})
            return status
        return self.wait_for(stages, runs_root, job_of, status)

    def wait_for(self, stages: Sequence[Stage], runs_root: Path, job_of: Mapping[str, str],
                 status: dict[str, str]) -> dict[str, str]:
        """Poll until every submitted job has ended; then reconcile each finished stage with sacct. A progress line
        (``Progress``) follows each batch of ended jobs, and comes at least every ``HEARTBEAT_S``."""
        pending = dict(job_of)
        by_key = {s.key: s for s in stages}
        last: dict[str, str] = {}
        unknown_since: dict[str, float] = {}
        progress = Progress([s for s in topo_order(stages) if s.key in job_of or s.key in status], self.tables,
                            jobs=max(1, len(job_of)), out=self.out)
        for key, st in status.items():
            progress.finish(by_key[key], st)
        reported, said = len(progress.status), time.monotonic()
        while pending:
            states = job_states(pending.values())
            for key, jid in list(pending.items()):
                s = by_key[key]
                st = states.get(jid, "UNKNOWN").split(" ")[0]
                if st != last.get(key):
                    print(f"  {s.name}: {st.lower()} (job {jid})", file=self.out, flush=True)
                    last[key] = st
                if st == "RUNNING":
                    progress.start(s)
                if st in ACTIVE:
                    continue
                # UNKNOWN: not yet in squeue/sacct right after submission; a job unknown for 2 min has vanished.
                if (st == "UNKNOWN" and not (s.done(runs_root) or (s.dir(runs_root) / FAILED).exists())
                        and time.time() - unknown_since.setdefault(key, time.time()) < 120):
                    continue
                del pending[key]
                if s.done(runs_root):
                    status[key] = "done"
                    reconcile(s.dir(runs_root))
                else:
                    status[key] = "blocked" if st == "CANCELLED" and not (s.dir(runs_root) / FAILED).exists() \
                        else "failed"
                progress.finish(s, status[key])
            if len(progress.status) != reported or (pending and time.monotonic() - said > HEARTBEAT_S):
                progress.report()
                reported, said = len(progress.status), time.monotonic()
            if pending:
                time.sleep(self.poll_s)
        return status


# ------------------------------------------------------------------------------------------------------ CLI plumbing
def make_executor(args: Any, tables: Mapping[str, Iterable[Stage]] | None = None) -> Any:
    """The executor a `repro` command asked for: Slurm with ``--cluster NAME``, else the local one. ``tables`` (table
    id -> its stages) gives the progress lines per-table counts."""
    from repro.pipeline.execute import LocalExecutor

    cluster = getattr(args, "cluster", None)
    if not cluster:
        given = [o for o, a in (("--dry-run", "dry_run"), ("--detach", "detach"), ("--res", "res"),
                                ("--log-dir", "log_dir"), ("--device", "device")) if getattr(args, a, None)]
        if given:
            raise ConfigError(f"{given[0]} is for Slurm; it needs --cluster NAME (known: {', '.join(list_profiles())})")
        jobs = getattr(args, "jobs", 1)
        return LocalExecutor(devices=args.devices, jobs=jobs, stream=jobs == 1, tables=tables)
    prof = load_profile(cluster)
    log_root = getattr(args, "log_dir", None)
    if log_root is not None:
        safe_text(log_root, "--log-dir")
    log_root = log_root or prof.log_root
    res = parse_res_overrides(getattr(args, "res", None) or [])
    return SlurmExecutor(prof, Path(log_root) if log_root else None, res, dry_run=getattr(args, "dry_run", False),
                         wait=not getattr(args, "detach", False), tables=tables, device=getattr(args, "device", None))


def runs_root_for(args: Any, default: Path) -> Path:
    """The run root: --runs-dir, else the profile's runs_root, else the CLI default ($REPRO_RUNS or ./runs)."""
    cluster = getattr(args, "cluster", None)
    if cluster and not getattr(args, "runs_dir", None) and not os.environ.get("REPRO_RUNS"):
        prof = load_profile(cluster)
        if prof.runs_root:
            return Path(os.path.expandvars(prof.runs_root)).absolute()
    return default
