"""Cluster profiles (``slurm/clusters/<name>.yaml``: what one node has, where jobs go) and the resources of a stage
(``slurm/resources.yaml`` per scale, refined per recipe, fitted to a profile, ``--res`` on top), checked against the
profile and turned into sbatch parameters. Planning only: no scheduler is asked anything here, and no torch.

A stage's ``--time`` (``TimePlan.limit``): ``--res time_min``, else the time its kind or recipe entry states, else its
projected wall time (``repro.profile.projection``: the stored device-hours of its configuration on the one profile set
chosen for the whole submission, divided by its GPUs) x the profile's ``time_margin`` + ``time_startup_min``, else
the scale's default; always capped by the profile's ``max_time_min`` (a longer stage requeues itself at the limit).
A stage whose exact configuration was not measured on that set is estimated from its FLOPs and the FLOP/s of the
nearest measured profile (named in the rule), with ``ESTIMATE_MARGIN`` more margin. A kNN stage's device-hours are
its encoder forward over gallery + query plus its vote's FLOPs (``repro.profile.projection.knn_vote_flops``), both
shared by its GPUs; the rule names the two. Segmentation and detection are not profiled: they keep the cap, and the
rule says why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from repro.config import ConfigError, Rule, parse_value, short
from repro.pipeline.sbatch import safe_text
from repro.pipeline.stage import Stage
from repro.profile.projection import ESTIMATE_MARGIN, Projector, projector, stage_work


def slurm_dir() -> Path:
    """The folder with cluster profiles and resources.yaml: $REPRO_SLURM_DIR or the repository's slurm/."""
    return Path(os.environ.get("REPRO_SLURM_DIR") or Path(__file__).resolve().parents[2] / "slurm")


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
    time_margin: float = 1.25  # a projected wall time is multiplied by this ...
    time_startup_min: int = 15  # ... and this is added (start-up: environment, data, compilation, resume)
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
              "max_requeues", "time_startup_min"):
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
    if not Rule(float, lo=1.0, hi=100.0).ok(prof.time_margin):
        raise ConfigError(f"cluster profile {path}: time_margin must be a number in [1, 100], not "
                          f"{short(prof.time_margin)}")
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
    become the profile's largest job; the effective batch is kept by gradient accumulation (config.accumulation)."""
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


def _layers(stage: Stage) -> list[tuple[str, dict[str, Any]]]:
    """(where, entries) of each source of a stage's resources, later over earlier: ``slurm/resources.yaml`` at the
    stage's scale, its kind's own needs (``StageKind.resources``, at paper scale), its recipe's entry."""
    from repro.kinds import KINDS

    table = yaml.safe_load((slurm_dir() / "resources.yaml").read_text())
    scale = stage.cfg.get("scale", "paper")
    base = dict(table.get(scale) or {})
    per_recipe = base.pop("recipes", None) or {}
    out = [(f"slurm/resources.yaml {scale} default", base)]
    if scale == "paper" and stage.kind in KINDS:
        out.append((f"stage kind {stage.kind}", dict(KINDS[stage.kind].resources)))
    name = f"{stage.kind}/{stage.cfg.get('recipe')}"
    out.append((f"slurm/resources.yaml {name}", dict(per_recipe.get(name) or {})))
    return out


def stage_resources(stage: Stage, overrides: Mapping[str, Any] | None = None,
                    profile: Profile | None = None) -> Resources:
    """Resources of one stage: ``slurm/resources.yaml`` at the stage's scale, its kind's own needs
    (``StageKind.resources``, at paper scale), its recipe's entry (fitted to ``profile`` when one is given), then
    ``--res`` (never fitted: check_resources refuses what the profile lacks). ``time_min`` here is the stated one
    (None: none); ``TimePlan.limit`` gives the one submitted."""
    base: dict[str, Any] = {}
    for _, entries in _layers(stage):
        base.update(entries)
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
    """The sbatch parameters of a request on a profile, named as submitit's public ``SlurmExecutor.update_parameters``
    names them; ``repro.pipeline.sbatch.sbatch_script`` writes the script from them."""
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


def wall_text(hours: float) -> str:
    """A projected wall time as the dry run prints it: hours to one decimal, minutes below an hour."""
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


@dataclass(frozen=True)
class TimeLimit:
    """A stage's ``--time`` in minutes and the rule that set it (what a dry run prints)."""

    minutes: int
    rule: str

    def __str__(self) -> str:
        return f"time {self.minutes} min = {self.rule}"


@dataclass
class TimePlan:
    """How the stages of one submission get their ``--time``: from one profile set for all of them (``projector``;
    None: nothing to project), chosen as ``repro plan`` chooses it (``choose_set``, ``--device``)."""

    profile: Profile
    projector: Projector | None = None
    sets: list[str] = field(default_factory=list)

    @classmethod
    def for_stages(cls, stages: Iterable[Stage], profile: Profile, device: str | None = None) -> TimePlan:
        """The plan's one profile set: the one ``device`` names (refused when it names none or several devices),
        else the GPU set (on a cluster with GPUs) that covers most of its paper-scale stages of profiled kinds. No
        set is read when there are none and no device is named."""
        cfgs = [s.cfg for s in stages if s.cfg.get("scale") == "paper" and stage_work(s.cfg) is not None]
        if not cfgs and not device:
            return cls(profile)
        proj, sets = projector(cfgs, device, gpu=profile.gpus_per_node > 0)
        return cls(profile, proj, sets)

    def describe(self) -> str:
        """The dry run's lines on time limits: the rule (margin, start-up, cap) and the projection's device."""
        p = self.profile
        rule = (f"stage time = projected wall time x {p.time_margin:g} + {p.time_startup_min} min start-up, at most "
                f"{p.max_time_min} min (cluster '{p.name}'); x {ESTIMATE_MARGIN:g} more where the wall time is "
                "estimated from FLOPs (no profile of the stage's exact configuration on the projection's device)")
        if self.projector is None:
            return rule
        out = f"{rule}\n{self.projector.describe(self.sets)}"
        dev = self.projector.device
        if p.gpu_type and dev and p.gpu_type.lower() not in dev.lower():
            out += f"\nnote: cluster '{p.name}' asks for {p.gpu_type} GPUs; the projection is from {dev}"
        return out

    def projected(self, stage: Stage, res: Resources) -> tuple[int | None, str]:
        """(minutes before the cap, how) from the projection, or (None, why there is none)."""
        proj = self.projector
        if proj is None or proj.set_name is None:
            return None, "no stored profiles: run `repro profile` on the GPU"
        init = stage.deps.get("init")
        found, why = proj.projection(stage.cfg, init.cfg if init is not None else None)
        if found is None:
            return None, why
        gpus = res.nodes * res.gpus_per_node
        if not gpus:
            return None, "a CPU-only stage: projections are per GPU"
        if not proj.on_gpu:
            return None, f"the projection's device {proj.device} is not a GPU"
        p = self.profile
        wall_h = found.device_hours / gpus
        minutes = math.ceil(wall_h * 60 * p.time_margin * found.margin + p.time_startup_min)
        margin = f"x {p.time_margin:g}" + (f" x {found.margin:g}" if found.margin != 1 else "")
        how = f"{wall_text(wall_h)} on {proj.device} x {gpus} GPUs {margin} + {p.time_startup_min} min start-up"
        if found.parts:  # kNN: its encoder forward and its vote, named
            how += f" ({found.parts})"
        return minutes, (f"{found.basis}: {how}" if found.estimated else f"projected {how}")

    def limit(self, stage: Stage, res: Resources, overrides: Mapping[str, Any] | None = None) -> TimeLimit:
        """The ``--time`` of ``stage`` asking for ``res``: ``--res time_min`` (checked, not capped), else the time
        its kind or recipe states, else its projection, else the scale's default, else the cluster cap; each
        capped by the profile's ``max_time_min``."""
        cap = self.profile.max_time_min
        capped = f"cluster cap of '{self.profile.name}'"
        if overrides and overrides.get("time_min") is not None:
            return TimeLimit(int(overrides["time_min"]), "--res time_min")
        layers = _layers(stage)
        stated = [(where, int(e["time_min"])) for where, e in layers if e.get("time_min") is not None]
        if stated and stated[-1][0] != layers[0][0]:  # the kind's or the recipe's own time
            where, t = stated[-1]
            return TimeLimit(t, where) if t <= cap else TimeLimit(cap, f"{capped} ({where}: {t} min)")
        minutes, how = self.projected(stage, res)
        if minutes is not None:
            if minutes <= cap:
                return TimeLimit(minutes, how)
            return TimeLimit(cap, f"{capped} ({how} = {minutes} min; the stage requeues itself at the limit)")
        if stated:
            where, t = stated[-1]
            return TimeLimit(min(t, cap), where if t <= cap else f"{capped} ({where}: {t} min)")
        return TimeLimit(cap, f"{capped} ({how})")
