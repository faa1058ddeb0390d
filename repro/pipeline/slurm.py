"""Slurm executor (submitit): the whole DAG of stages submitted at once, each job held by ``afterok`` dependencies on
its inputs; stages that share resources and inputs (a sweep's rows) go out as one job array with a parallelism limit.

What the official code does: MAE (and LoMaR / LocalMIM, which inherit it) submits one training with submitit's
``AutoExecutor`` to a hard-coded ``/checkpoint/$USER`` folder; on USR2 its ``checkpoint()`` resumes only from
``output_dir/checkpoint.pth``, a file the training never writes, so a preempted job restarts at epoch 0. Here:

* the engine checkpoints every epoch (``checkpoints/last.pth``, every RNG included) and, on SIGUSR1/SIGUSR2 (submitit's
  ``--signal=USR2@<signal_delay_s>`` ahead of the time limit, or ``scancel --signal=USR2``), at the next optimizer step;
  the job then requeues itself (``scontrol requeue``) and resumes exactly. On SIGTERM (``scontrol requeue``, a
  preemption, ``scancel``) it also checkpoints and exits; Slurm itself decides whether the job comes back.
* a stage that raises fails for good (``failed.json``; its dependents are cancelled by ``--kill-on-invalid-dep``);
  requeues are bounded by the profile's ``max_requeues`` (Slurm's ``SLURM_RESTART_COUNT``).
* resources per stage come from ``slurm/resources.yaml`` (per scale, refined per recipe), are checked against a
  cluster profile ``slurm/clusters/<name>.yaml`` and become ``--nodes/--ntasks-per-node/--gpus-per-node/...``;
  one task per GPU, torch.distributed from submitit's task environment (NCCL on GPUs, gloo on CPUs).
* after a stage ends its scheduler cost is reconciled with ``sacct`` (elapsed x allocated gres/gpu, or x CPUs
  without GPUs, summed over requeued runs) and stored beside the engine's own figure in ``result.json``
  (``accounting.device_hours`` stays the engine's; ``accounting.device_hours_sacct`` is the scheduler's).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from repro.config import CONTROL, ConfigError, Rule, parse_value, short
from repro.io import atomic_write_json
from repro.pipeline.stage import CHECKPOINTS, FAILED, LOG, RESULT, Stage, lock_holder, read_json, reset, topo_order
from repro.pipeline.worker import PREEMPTED_EXIT

SLURM_FILE = "slurm.json"  # per stage: job id, log paths, cluster
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED")


def slurm_dir() -> Path:
    """The folder with cluster profiles and resources.yaml: $REPRO_SLURM_DIR or the repository's slurm/."""
    return Path(os.environ.get("REPRO_SLURM_DIR") or Path(__file__).resolve().parents[2] / "slurm")


# ----------------------------------------------------------------------------------------------- profiles, resources
@dataclass(frozen=True)
class Profile:
    """A cluster: where jobs go and what one node has. Loaded from ``slurm/clusters/<name>.yaml``."""

    name: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpu_type: str | None = None
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    mem_per_node_gb: float = 1.0
    mem_per_gpu_gb: float | None = None
    mem_per_cpu_gb: float | None = None
    max_nodes: int = 1
    max_time_min: int = 60
    signal_delay_s: int = 120
    array_parallelism: int = 8
    max_requeues: int = 20
    runs_root: str | None = None
    log_root: str | None = None
    python: str | None = None
    setup: list[str] = field(default_factory=list)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in (slurm_dir() / "clusters").glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """A profile by name (``slurm/clusters/<name>.yaml``) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else slurm_dir() / "clusters" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown cluster profile '{name}'; known: {', '.join(list_profiles()) or '-'} "
                          f"(add {slurm_dir() / 'clusters' / (name + '.yaml')})")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Profile)} - {"name"}
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"cluster profile {path}: unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    prof = Profile(name=path.stem, **{k: v for k, v in data.items() if v is not None or k in ("setup",)})
    for k in ("gpus_per_node", "cpus_per_node", "max_nodes", "max_time_min", "signal_delay_s", "array_parallelism",
              "max_requeues"):
        v = getattr(prof, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"cluster profile {path}: {k} must be a non-negative integer, not {v!r}")
    for k in ("partition", "account", "qos", "constraint", "gpu_type", "runs_root", "log_root", "python"):
        v = getattr(prof, k)
        if v is not None:
            safe_text(v if isinstance(v, str) else repr(v), f"cluster profile {path}: {k}")
    for k in ("mem_per_node_gb", "mem_per_gpu_gb", "mem_per_cpu_gb"):
        v = getattr(prof, k)
        if v is not None and not Rule(float, lo=0, lo_open=True).ok(v):
            raise ConfigError(f"cluster profile {path}: {k} must be a positive number, not {short(v)}")
    if not isinstance(prof.setup, list):
        raise ConfigError(f"cluster profile {path}: setup must be a list of shell lines")
    for line in prof.setup:
        safe_text(line if isinstance(line, str) else repr(line), f"cluster profile {path}: setup line")
    return replace(prof, setup=list(prof.setup or []))


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int | None = None

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


RES_KEYS = tuple(f.name for f in fields(Resources))
# The type and range of each resource key (the upper bounds come from the cluster profile, in check_resources).
RES_RULES = {"nodes": Rule(int, 1, 4096), "gpus_per_node": Rule(int, 0, 64), "tasks_per_node": Rule(int, 1, 1024,
             nullable=True), "cpus_per_task": Rule(int, 1, 1024), "mem_gb": Rule(float, lo=0, lo_open=True, hi=65536,
             nullable=True), "time_min": Rule(int, 1, 525600, nullable=True)}


def parse_res_overrides(items: Iterable[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in RES_KEYS:
            raise ConfigError(f"bad --res {short(item)}; use KEY=VALUE with KEY one of {', '.join(RES_KEYS)}")
        value = parse_value(val)
        if not RES_RULES[key].ok(value):
            raise ConfigError(f"bad --res {short(item)}: {key} must be {RES_RULES[key].describe()}")
        out[key] = value
    return out


def fit_to_profile(res: Mapping[str, Any], prof: Profile) -> dict[str, Any]:
    """A default request (resources.yaml) shrunk to what one of ``prof``'s jobs can have: the paper's 8 nodes x 8 GPUs
    become the profile's largest job; the effective batch is kept by gradient accumulation (resolve.accumulation)."""
    out = dict(res)
    out["nodes"] = max(1, min(int(out.get("nodes", 1)), prof.max_nodes))
    gpus = min(int(out.get("gpus_per_node", 0)), prof.gpus_per_node)
    out["gpus_per_node"] = gpus
    tasks = out.get("tasks_per_node")
    if tasks is not None:
        tasks = out["tasks_per_node"] = max(1, min(int(tasks), max(1, gpus) if gpus else prof.cpus_per_node))
    tasks = tasks or max(1, gpus)
    out["cpus_per_task"] = max(1, min(int(out.get("cpus_per_task", 1)), prof.cpus_per_node // tasks))
    if out.get("mem_gb") is not None:
        out["mem_gb"] = min(float(out["mem_gb"]), prof.mem_per_node_gb)
    if out.get("time_min") is not None:
        out["time_min"] = min(int(out["time_min"]), prof.max_time_min)
    return out


def stage_resources(stage: Stage, overrides: Mapping[str, Any] | None = None,
                    profile: Profile | None = None) -> Resources:
    """Resources of one stage: ``slurm/resources.yaml`` at the stage's scale, its recipe's entry (fitted to
    ``profile`` when one is given), then ``--res`` (never fitted: check_resources refuses what the profile lacks)."""
    table = yaml.safe_load((slurm_dir() / "resources.yaml").read_text())
    scale = stage.cfg.get("scale", "paper")
    base = dict(table.get(scale) or {})
    per_recipe = base.pop("recipes", None) or {}
    base.update(per_recipe.get(f"{stage.kind}/{stage.cfg.get('recipe')}", {}))
    bad = sorted(set(base) - set(RES_KEYS))
    if bad:
        raise ConfigError(f"slurm/resources.yaml: unknown key(s) {', '.join(bad)}; valid: {', '.join(RES_KEYS)}")
    for k, v in base.items():
        if not RES_RULES[k].ok(v):
            raise ConfigError(f"slurm/resources.yaml: {k}={short(v)} must be {RES_RULES[k].describe()}")
    if profile is not None:
        base = fit_to_profile(base, profile)
    base.update(overrides or {})
    return Resources(**base)


def check_resources(res: Resources, prof: Profile, what: str) -> None:
    """Refuse a request the profile cannot satisfy, naming the limit and the fix."""
    fix = "lower it with --res KEY=VALUE or use a bigger cluster profile"
    if res.nodes < 1 or res.nodes > prof.max_nodes:
        raise ConfigError(f"{what} asks for {res.nodes} nodes; cluster '{prof.name}' allows 1..{prof.max_nodes} "
                          f"({fix})")
    if res.gpus_per_node > prof.gpus_per_node:
        raise ConfigError(f"{what} asks for {res.gpus_per_node} GPUs per node; cluster '{prof.name}' nodes have "
                          f"{prof.gpus_per_node} ({fix})")
    cpus = res.tasks * res.cpus_per_task
    if cpus > prof.cpus_per_node:
        raise ConfigError(f"{what} asks for {cpus} CPUs per node ({res.tasks} tasks x {res.cpus_per_task}); cluster "
                          f"'{prof.name}' nodes have {prof.cpus_per_node} ({fix})")
    mem = mem_gb(res, prof)
    if mem > prof.mem_per_node_gb:
        raise ConfigError(f"{what} asks for {mem:g} GB per node; cluster '{prof.name}' nodes have "
                          f"{prof.mem_per_node_gb:g} GB ({fix})")
    t = res.time_min or prof.max_time_min
    if t > prof.max_time_min or t < 1:
        raise ConfigError(f"{what} asks for {t} min; cluster '{prof.name}' allows at most {prof.max_time_min} min "
                          "(leave time_min null: the stage requeues itself at the limit)")


def mem_gb(res: Resources, prof: Profile) -> float:
    if res.mem_gb is not None:
        return float(res.mem_gb)
    if res.gpus_per_node and prof.mem_per_gpu_gb:
        return prof.mem_per_gpu_gb * res.gpus_per_node
    return (prof.mem_per_cpu_gb or 1.0) * res.tasks * res.cpus_per_task


def slurm_params(res: Resources, prof: Profile, name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` arguments (sbatch options) for a request on a profile."""
    p: dict[str, Any] = {
        "job_name": name, "nodes": res.nodes, "ntasks_per_node": res.tasks, "cpus_per_task": res.cpus_per_task,
        "mem": f"{int(round(mem_gb(res, prof) * 1024))}M", "time": int(res.time_min or prof.max_time_min),
        "signal_delay_s": prof.signal_delay_s, "setup": list(prof.setup),
        # A failed input cancels its dependents instead of leaving them pending for ever.
        "additional_parameters": {"kill-on-invalid-dep": "yes", "requeue": True},
    }
    if res.gpus_per_node:
        p["gpus_per_node"] = f"{prof.gpu_type}:{res.gpus_per_node}" if prof.gpu_type else res.gpus_per_node
    for k in ("partition", "account", "qos", "constraint"):
        if getattr(prof, k):
            p[k] = getattr(prof, k)
    return p


# ------------------------------------------------------------------------------------------------------ scheduler I/O
def _cmd(args: Sequence[str], timeout: float = 30) -> str:
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
    return [p.rstrip("*") for p in _cmd(["sinfo", "-h", "-o", "%P"]).split()]


def check_partition(prof: Profile) -> None:
    parts = cluster_partitions()
    if parts is not None and prof.partition and prof.partition not in parts:
        raise ConfigError(f"cluster profile '{prof.name}': partition '{prof.partition}' does not exist here "
                          f"(sinfo lists: {', '.join(parts) or 'none'}); fix `partition:` in the profile")


def check_writable(path: Path, what: str) -> Path:
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


# ------------------------------------------------------------------------------------------------------- the job body
class StageJob:
    """What submitit runs in each task of a stage's job: the ordinary worker, under the task's torch.distributed
    environment. ``checkpoint`` (submitit's USR2 handler, before the engine has installed its own) resubmits it
    unchanged: the state lives in the stage folder's checkpoint, not in this object."""

    def __init__(self, spec_path: str, max_requeues: int):
        self.spec_path = str(spec_path)
        self.max_requeues = max_requeues

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _fail(self, out_dir: Path, msg: str, log: str) -> None:
        atomic_write_json(out_dir / FAILED, {"error": msg, "log": log, "time": time.time()})

    def __call__(self) -> dict[str, Any] | None:
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
            return json.loads((out_dir / RESULT).read_text()) if env.global_rank == 0 else None
        if rc == PREEMPTED_EXIT:
            sig = outcome.signal
            if sig in (signal.SIGUSR1, signal.SIGUSR2) and env.global_rank == 0:
                # Time limit ahead or preemption notice: requeue ourselves (the checkpoint is on disk).
                subprocess.check_call(["scontrol", "requeue", str(env.job_id)], timeout=60)
                print(f"requeued job {env.job_id} after signal {sig}", flush=True)
            # SIGTERM: a requeue / preemption (Slurm brings the job back) or a cancel (it does not).
            sys.exit(-1)
        if env.global_rank == 0 and (out_dir / FAILED).is_file():  # point failed.json at the Slurm log
            info = json.loads((out_dir / FAILED).read_text())
            info["log"] = log
            atomic_write_json(out_dir / FAILED, info)
        err = json.loads((out_dir / FAILED).read_text()).get("error") if (out_dir / FAILED).is_file() else None
        raise RuntimeError(f"stage {out_dir.name} failed: {err or f'exit code {rc}'}")


# ----------------------------------------------------------------------------------------------------- the executor
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


def safe_text(text: str, what: str, limit: int = 4096) -> str:
    """Refuse a string that reaches an sbatch script with a control character (a newline would end an #SBATCH line
    and run the rest as a command), or that is empty or too long."""
    if not isinstance(text, str) or not text or CONTROL.search(text) or len(text) > limit:
        raise ConfigError(f"{what} {short(text)} is not allowed: it must be non-empty, at most {limit} characters, "
                          "without control characters (newline, tab, ...)")
    return text


class SlurmExecutor:
    """Same interface as ``LocalExecutor``: ``run(stages, runs_root, force)`` -> key -> done/skipped/failed/blocked."""

    def __init__(self, profile: Profile, log_root: Path | None = None, res_overrides: Mapping[str, Any] | None = None,
                 dry_run: bool = False, wait: bool = True, poll_s: float = 3.0, out: Any = None):
        self.profile = profile
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
        for s in todo:
            res = stage_resources(s, self.res_overrides, self.profile)
            check_resources(res, self.profile, f"stage {s.name}")
            if "optim" in s.cfg:
                from repro.resolve import accumulation

                accumulation(s.cfg, res.world_size)
            deps = sorted((d for d in s.deps.values() if d.key in todo_keys), key=lambda d: d.key)
            gk = (level[s.key], tuple(sorted(asdict(res).items())), tuple(d.key for d in deps))
            groups.setdefault(gk, Group([], res, deps)).stages.append(s)
        done = [s for s in order if s.key not in todo_keys]
        return sorted(groups.values(), key=lambda g: level[g.stages[0].key]), done

    def _folder(self, runs_root: Path) -> Path:
        root = self.log_root or (Path(self.profile.log_root) if self.profile.log_root else runs_root / "slurm" / "logs")
        return check_writable(Path(root), "log root")

    def _executor(self, folder: Path, group: Group, dependency: str | None) -> Any:
        import submitit

        python = shlex.quote(self.profile.python) if self.profile.python else None
        ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=self.profile.max_requeues,
                                    python=python)
        params = slurm_params(group.res, self.profile, job_name(group))
        if dependency:
            params["dependency"] = dependency
        params["array_parallelism"] = self.profile.array_parallelism
        ex.update_parameters(**params)
        return ex

    def script(self, folder: Path, group: Group, dependency: str | None) -> str:
        """The sbatch script submitit writes for ``group`` (what ``_executor(...).submit`` sends to sbatch; checked
        against a real submission with a stand-in sbatch in tests/test_bad_inputs.py). Built without submitit's
        executor, which needs ``srun``: a dry run may be made off the cluster."""
        from submitit.slurm.slurm import _make_sbatch_string

        params = slurm_params(group.res, self.profile, job_name(group))
        if dependency:
            params["dependency"] = dependency
        params["array_parallelism"] = self.profile.array_parallelism
        # submitit submits an array from a fresh executor, which runs sys.executable (not the profile's python)
        python = self.profile.python if self.profile.python and len(group.stages) == 1 else sys.executable
        if len(group.stages) > 1:
            params["map_count"] = len(group.stages)
        job_folder = Path(folder / "%j").expanduser().absolute()
        command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(job_folder))])
        return _make_sbatch_string(command=command, folder=job_folder, **params)

    def render(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> str:
        """The sbatch scripts that ``run`` would submit, each exactly as submitit writes it (dependencies on jobs not
        yet submitted as ``$JOB_<n>``, or ``$JOB_<n>_<i>`` for task i of an array, as Slurm's
        ``afterok:<array>_<i>``)."""
        groups, done = self.groups(stages, runs_root, force)
        check_writable(runs_root, "run root")  # the partition is not checked: a dry run may be made off the cluster
        folder = self.log_root or Path(self.profile.log_root or runs_root / "slurm" / "logs")
        lines = [f"# cluster '{self.profile.name}': {len(groups)} job(s) for "
                 f"{sum(len(g.stages) for g in groups)} stage(s); {len(done)} stage(s) done already"]
        ref = {s.key: f"$JOB_{i}" + (f"_{j}" if len(g.stages) > 1 else "")  # an array task: <array>_<index>
               for i, g in enumerate(groups, 1) for j, s in enumerate(g.stages)}
        for i, g in enumerate(groups, 1):
            lines.append(f"\n# ---- JOB_{i}: {len(g.stages)} stage(s), world size {g.res.world_size}")
            lines += [f"#   {s.name} {s.label} -> {s.dir(runs_root)}" for s in g.stages]
            dep = "afterok:" + ":".join(ref[d.key] for d in g.deps) if g.deps else None
            lines.append(self.script(folder, g, dep).rstrip())
        return "\n".join(lines)

    # -- submission
    def submit(self, stages: Iterable[Stage], runs_root: Path, force: bool = False) -> dict[str, str]:
        """Submit every stage not done (all at once, dependencies as afterok); returns stage key -> job id."""
        from repro.pipeline.execute import write_spec

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
            ex = self._executor(folder, g, "afterok:" + ":".join(dep_ids) if dep_ids else None)
            specs = []
            for s in fresh:
                d = s.dir(runs_root)
                if force:
                    reset(d)  # result, failure and checkpoints: the stage starts from scratch
                (d / FAILED).unlink(missing_ok=True)
                specs.append(write_spec(s, runs_root))
            if len(fresh) > 1:
                with ex.batch():
                    jobs = [ex.submit(StageJob(str(p), self.profile.max_requeues)) for p in specs]
            else:
                jobs = [ex.submit(StageJob(str(specs[0]), self.profile.max_requeues))]
            for s, job, spec in zip(fresh, jobs, specs):
                job_of[s.key] = str(job.job_id)
                earlier = [] if force else job_history(spec.parent)  # a resumed stage's cost includes them
                atomic_write_json(spec.parent / SLURM_FILE, {
                    "job_id": str(job.job_id), "jobs": [*earlier, str(job.job_id)], "cluster": self.profile.name,
                    "submitted": time.time(),
                    "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "restarts": 0,
                    "dependency": dep_ids, "resources": asdict(g.res)})
                record.append({"stage": s.name, "dir": str(spec.parent), "job_id": str(job.job_id)})
                after = f" after {','.join(dep_ids)}" if dep_ids else ""
                print(f"  {s.name} {s.label}: job {job.job_id}{after} (log: {job.paths.stderr})", file=self.out,
                      flush=True)
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
        """Poll until every submitted job has ended; then reconcile each finished stage with sacct."""
        pending = dict(job_of)
        by_key = {s.key: s for s in stages}
        last: dict[str, str] = {}
        unknown_since: dict[str, float] = {}
        while pending:
            states = job_states(pending.values())
            for key, jid in list(pending.items()):
                s = by_key[key]
                st = states.get(jid, "UNKNOWN").split(" ")[0]
                if st != last.get(key):
                    print(f"  {s.name}: {st.lower()} (job {jid})", file=self.out, flush=True)
                    last[key] = st
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
            if pending:
                time.sleep(self.poll_s)
        return status


# ------------------------------------------------------------------------------------------------ status and cancel
def stage_dirs(runs_root: Path) -> list[Path]:
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
        _cmd(["scancel", *live])
    return live


# ------------------------------------------------------------------------------------------------------ CLI plumbing
def make_executor(args: Any) -> Any:
    """The executor a `repro` command asked for: Slurm with ``--cluster NAME``, else the local one."""
    from repro.pipeline.execute import LocalExecutor

    cluster = getattr(args, "cluster", None)
    if not cluster:
        given = [o for o, a in (("--dry-run", "dry_run"), ("--detach", "detach"), ("--res", "res"),
                                ("--log-dir", "log_dir")) if getattr(args, a, None)]
        if given:
            raise ConfigError(f"{given[0]} is for Slurm; it needs --cluster NAME (known: {', '.join(list_profiles())})")
        jobs = getattr(args, "jobs", 1)
        return LocalExecutor(devices=args.devices, jobs=jobs, stream=jobs == 1)
    prof = load_profile(cluster)
    log_root = getattr(args, "log_dir", None)
    if log_root is not None:
        safe_text(log_root, "--log-dir")
    log_root = log_root or prof.log_root
    res = parse_res_overrides(getattr(args, "res", None) or [])
    return SlurmExecutor(prof, Path(log_root) if log_root else None, res, dry_run=getattr(args, "dry_run", False),
                         wait=not getattr(args, "detach", False))


def runs_root_for(args: Any, default: Path) -> Path:
    """The run root: --runs-dir, else the profile's runs_root, else the CLI default ($REPRO_RUNS or ./runs)."""
    cluster = getattr(args, "cluster", None)
    if cluster and not getattr(args, "runs_dir", None) and not os.environ.get("REPRO_RUNS"):
        prof = load_profile(cluster)
        if prof.runs_root:
            return Path(os.path.expandvars(prof.runs_root)).absolute()
    return default
