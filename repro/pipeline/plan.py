"""Plans: recipes and paper tables expanded into a DAG of stages.

``chain`` = pretrain -> {fine-tune, linear, kNN} (+ a random-init baseline with the same evaluation budget).
``plan_tables`` = the rows of paper tables (``repro.spec``) -> stages, shared across rows and tables by content hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from repro.config import ConfigError, deep_merge, load_recipe
from repro.kinds import ENCODER, KINDS, eval_kinds, get_kind
from repro.methods.registry import get_spec
from repro.pipeline.stage import Stage, topo_order
from repro.resolve import resolve

# What every evaluation inherits from the pretraining it evaluates (a kind adds StageKind.inherits).
INHERITED = {
    "data": ("dataset", "path", "img_size", "num_classes", "synthetic_train", "synthetic_val", "synthetic_classes"),
    "model": ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "rel_pos", "layer_scale",
              "class_token", "window_size"),
}
# Inherited keys that follow another one: a row that sets the key takes these from its recipe too, not the input.
COUPLED = {"data.dataset": ("data.path", "data.num_classes"), "data.img_size": ("model.window_size",)}
# The papers evaluate a pretraining on the key's dataset on the value's (ExtreMA: IN-22K models on IN-1K).
EVAL_DATASET = {"imagenet22k": "imagenet1k"}


def input_eval_defaults(pretrain: str, paper_overrides: Mapping[str, Any] | Iterable[str] = (),
                        kind: str | None = None) -> dict[str, Any]:
    """Paper-level evaluation overrides implied by a pretraining recipe (+ its paper-level overrides): an
    ImageNet-22K pretraining is evaluated on ImageNet-1K (``EVAL_DATASET``). Decided at paper level, so that it holds
    at every scale; a row's own ``eval_overrides`` go over it. None for a ``kind`` that keeps its own data."""
    from repro.resolve import nested

    if kind is not None and not get_kind(kind).inherit_data:
        return {}
    cfg = deep_merge(load_recipe(pretrain, "pretrain")[1], nested(paper_overrides))
    target = EVAL_DATASET.get(cfg["data"]["dataset"])
    return {"data": {"dataset": target}} if target else {}


def eval_overrides(pre: Mapping[str, Any], kind: str, recipe: str | None = None,
                   row: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an evaluation (stage kind or recipe kind ``kind``, with its ``recipe``) takes over from the pretraining
    config ``pre``: ``INHERITED``, and what ``StageKind.inherits`` names from the pretraining's method.

    Precedence of an evaluation's configuration, low to high (decided here and nowhere else): its recipe < what it
    inherits from its input (this layer) < the row's paper-level ``eval_overrides`` (``row``, nested; they go
    through the scale rule like the recipe's own values) < command-line overrides (after the scale). So the keys
    ``row`` sets, and the keys ``COUPLED`` to them, are left out of this layer.
    """
    from repro.config import flatten

    sk = get_kind(kind)
    ov: dict[str, Any] = {sec: {k: pre[sec][k] for k in keys} for sec, keys in INHERITED.items()}
    if not sk.inherit_data:  # its own datasets and sizes (segment, detect): the model keys only, less those that
        del ov["data"]  # follow the resolution (the Swin window)
        for k in COUPLED["data.img_size"]:
            ov["model"].pop(k.rpartition(".")[2], None)
    elif recipe is not None and load_recipe(recipe, sk.recipes)[1].get("resolution") == "own":
        del ov["data"]["img_size"], ov["model"]["window_size"]  # e.g. SimMIM-Swin: pretrain 192, fine-tune 224
    ov["seed"] = pre["seed"]
    if pre["model"].get("pos_embed") == "none":
        ov["model"]["pos_embed"] = "none"  # no absolute table to load or to add (SimMIM, LoMaR)
    method = get_spec(pre["method"]["name"])
    if "global_pool" in sk.inherits:
        ov["model"]["global_pool"] = method.finetune_pool
    if "feature" in sk.inherits:
        # A Swin has no cls token: its methods' cls feature becomes the mean of the last stage's tokens.
        swin = str(pre["model"]["arch"]).startswith("swin_")
        ov["feature"] = "avg" if swin and method.linear_feature == "cls" else method.linear_feature
    for key in flatten(row or {}):
        for k in (key, *COUPLED.get(key, ())):
            sec, _, name = k.rpartition(".")
            (ov.get(sec, {}) if sec else ov).pop(name, None)
    return ov


def eval_stages(pre: Stage, evals: Mapping[str, str], scale: str, baseline: bool = False,
                row: Mapping[str, Any] | None = None) -> list[Stage]:
    """One stage per evaluation kind of ``pre``; ``row``: paper-level evaluation overrides for every kind."""
    out = []
    label = pre.label
    for kind, recipe in evals.items():
        cfg = resolve(recipe, scale, eval_overrides(pre.cfg, kind, recipe, row), kind=get_kind(kind).recipes,
                      paper_overrides=row or {})
        out.append(Stage(kind, cfg, {"init": pre}, label=label))
        if baseline:
            out.append(Stage(kind, cfg, {}, label=f"{label} (random init)"))
    return out


def chain(recipe: str, scale: str = "tiny", overrides: Iterable[str] = (), baseline: bool = False,
          evals: Iterable[str] | None = None) -> list[Stage]:
    pre_cfg = resolve(recipe, scale, overrides, kind="pretrain")
    wanted = dict(pre_cfg.get("evals") or {})
    if evals is not None:
        wanted = {k: v for k, v in wanted.items() if k in set(evals)}
    label = f"{pre_cfg['method']['name']} {pre_cfg['model']['arch']}/{pre_cfg['model']['patch_size']}"
    pre = Stage("pretrain", pre_cfg, label=label)
    return [pre, *eval_stages(pre, wanted, scale, baseline, input_eval_defaults(recipe))]


# ---- paper tables -> stages ------------------------------------------------------------------------------------------


@dataclass
class RowPlan:
    """What one row of a paper table needs: its pretraining stage (if any) and one stage per evaluation kind."""

    table: str
    row: Any  # repro.spec.schema.Row
    status: str  # trainable | reported | pending
    pretrain: Stage | None = None
    evals: dict[str, Stage] = field(default_factory=dict)
    reason: str = ""
    # The same row again with seeds seed+1 .. seed+n-1 (every stage of the row re-run: pretraining included), for
    # mean +- std over seeds (``plan_tables(seeds=...)``).
    replicas: list[RowPlan] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return 1 + len(self.replicas)

    @property
    def stages(self) -> list[Stage]:
        own = [s for s in (self.pretrain, *self.evals.values()) if s is not None]
        return own + [s for r in self.replicas for s in r.stages]

    def stage_for(self, kind: str) -> Stage | None:
        return self.pretrain if kind == "pretrain" else self.evals.get(kind)


@dataclass
class TablePlan:
    spec: Any  # repro.spec.schema.TableSpec
    rows: list[RowPlan]
    partial: bool = False  # only some of the spec's rows (the `claims` selector): a run merges them into the manifest

    @property
    def stages(self) -> list[Stage]:
        return topo_order([s for r in self.rows for s in r.stages])


def needed_kinds(spec: Any) -> list[str]:
    """Stage kinds the table's measured columns come from, in a fixed order."""
    from repro.spec.schema import MEASURES

    kinds = {MEASURES[c.measure][0] for c in spec.columns if c.measure}
    return [k for k in (*KINDS, *sorted(kinds - set(KINDS))) if k in kinds]


def row_status(spec: Any, row: Any) -> tuple[str, str]:
    """``(status, reason)`` of a spec row without planning it: ``reported`` (its reason, or no recipe),
    ``pending`` (the row's own reason, or a measure whose stage kind is not registered in ``repro.kinds``) or
    ``trainable``."""
    if row.reported:
        return "reported", row.reported
    if row.pending:
        return "pending", row.pending
    if not row.trainable:
        return "reported", "no recipe"
    missing = [k for k in needed_kinds(spec) if k not in KINDS and k != "derived"]
    if missing:
        return "pending", f"no {', '.join(f'`{k}`' for k in missing)} stage kind yet"
    return "trainable", ""


def _pretrain_runtime_overrides(spec: Any, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run-time switches a table needs from its pretraining (not part of the paper recipe): kNN curves record a kNN
    point about ten times per run."""
    if any(c.measure == "pretrain.knn_curve" for c in spec.columns):
        return {"train": {"knn_every": max(1, int(cfg["optim"]["epochs"]) // 10)}}
    return {}


def for_kind(overrides: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The part of run-wide (nested) overrides that exists in ``kind``'s recipe schema (``optim.epochs`` means
    nothing to a kNN stage)."""
    from repro.resolve import schema

    def keep(ov: Mapping[str, Any], sch: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in ov.items():
            if k not in sch and k != "method":
                continue
            if isinstance(v, Mapping) and isinstance(sch.get(k), Mapping) and sch.get(k):
                sub = keep(v, sch[k])
                if sub:
                    out[k] = sub
            else:
                out[k] = v
        return out

    if not overrides:
        return {}
    return keep(overrides, {**schema(kind), **({"method": {}} if kind == "pretrain" else {})})


def row_plan(spec: Any, row: Any, scale: str, overrides: Mapping[str, Any] | None = None,
             data_paths: Mapping[str, str] | None = None) -> RowPlan:
    """Expand one spec row into stages at ``scale`` (reported-only and pending rows get none). ``overrides`` (nested,
    after the scale) apply to every stage whose kind has those keys: a smaller run of the same table. An evaluation's
    precedence (recipe < inherited from the input < the row's ``eval_overrides`` < ``overrides``) is
    ``eval_overrides``'s docstring."""
    status, reason = row_status(spec, row)
    if status != "trainable":
        return RowPlan(spec.id, row, status, reason=reason)
    kinds = needed_kinds(spec)
    from repro.resolve import nested

    plan = RowPlan(spec.id, row, "trainable")
    evals = dict(row.evals or {})
    pre: Stage | None = None
    if row.pretrain:
        run_ov = for_kind(overrides or {}, "pretrain")
        cfg = resolve(row.pretrain, scale, run_ov, kind="pretrain", paper_overrides=row.overrides or {})
        runtime = _pretrain_runtime_overrides(spec, cfg)
        if runtime:
            cfg = resolve(row.pretrain, scale, deep_merge(runtime, run_ov), kind="pretrain",
                          paper_overrides=row.overrides or {})
        pre = plan.pretrain = Stage("pretrain", with_data_path(cfg, data_paths), label=row.label)
        evals = {**(cfg.get("evals") or {}), **evals}
    for kind in (k for k in kinds if k in eval_kinds()):
        sk = get_kind(kind)
        rkind = sk.recipes  # semi-supervised runs fine-tuning recipes
        recipe = evals.get(kind) or sk.default_recipe or evals.get(rkind)
        if recipe is None:
            raise ConfigError(f"{spec.id} row '{row.label}': no {kind} recipe; add evals: {{{kind}: ...}} to the row "
                              "or to its pretraining recipe")
        pov = nested((row.eval_overrides or {}).get(kind, {}))
        run_ov = for_kind(overrides or {}, rkind)
        if pre is not None:
            pov = deep_merge(input_eval_defaults(row.pretrain, row.overrides or {}, kind), pov)
            cfg = resolve(recipe, scale, deep_merge(eval_overrides(pre.cfg, kind, recipe, pov), run_ov), kind=rkind,
                          paper_overrides=pov)
            plan.evals[kind] = Stage(kind, with_data_path(cfg, data_paths), {"init": pre}, label=row.label)
        elif sk.input == ENCODER:
            raise ConfigError(f"{spec.id} row '{row.label}': a {kind} stage needs a pretrained encoder; give the row "
                              "a pretrain recipe")
        else:
            cfg = resolve(recipe, scale, run_ov, kind=rkind, paper_overrides=pov)
            cfg["init"] = "random"
            plan.evals[kind] = Stage(kind, with_data_path(cfg, data_paths), {}, label=row.label)
    return plan


# Seeds per trainable row when ``--seeds`` is not given: at tiny scale the rows a claim or a signal bar rests on
# (repro/spec/claims.yaml) get enough for a noise verdict, the others one; paper scale runs each row once.
CLAIM_SEEDS = 3


def default_seeds(spec: Any, row: Any, scale: str) -> int:
    """How many seeds a row gets without ``--seeds``: ``CLAIM_SEEDS`` for a claim's row at tiny scale, else 1."""
    if scale != "tiny":
        return 1
    from repro.spec.claims import claim_rows

    return CLAIM_SEEDS if (spec.id, row.label) in claim_rows() else 1


def seeded_row_plan(spec: Any, row: Any, scale: str, overrides: Mapping[str, Any], seeds: int,
                    data_paths: Mapping[str, str] | None = None) -> RowPlan:
    """``row_plan`` with ``seeds - 1`` replicas: the same row with ``seed`` (run-wide, after the scale) = its own seed
    + 1, + 2, ...; every stage of a replica differs from the first's by its seed only."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: the number of seeds must be at least 1")
    plan = row_plan(spec, row, scale, overrides, data_paths)
    if plan.status != "trainable" or seeds == 1:
        return plan
    base = int(plan.stages[0].cfg.get("seed", 0))
    plan.replicas = [row_plan(spec, row, scale, deep_merge(overrides, {"seed": base + i}), data_paths)
                     for i in range(1, seeds)]
    return plan


def plan_tables(ids: Iterable[str], scale: str, overrides: Iterable[str] | Mapping[str, Any] = (),
                data_paths: Mapping[str, str] | None = None, seeds: int | None = None) -> list[TablePlan]:
    """The tables named by ``ids`` (table ids, paper names, ``claims`` or ``all``) expanded into stages at ``scale``.
    ``claims`` plans only the rows a signal bar or claim of repro/spec/claims.yaml rests on (unless another id names
    the whole table). Rows that resolve to the same configuration share the same stage (same content hash).
    ``overrides`` apply after the scale to every stage that has the key; ``data_paths`` give real datasets' roots by
    name; ``seeds``: seeds per trainable row (None: ``default_seeds``)."""
    from repro.resolve import nested
    from repro.spec import CLAIMS, select
    from repro.spec.claims import claim_rows

    ids = list(ids)
    whole = {s.id for s in select([i for i in ids if i != CLAIMS])}
    keep = claim_rows() if CLAIMS in ids else set()
    ov = nested(overrides)
    out = []
    for spec in select(ids):
        rows = [r for r in spec.rows if spec.id in whole or (spec.id, r.label) in keep]
        out.append(TablePlan(spec, [seeded_row_plan(spec, row, scale, ov, default_seeds(spec, row, scale)
                                                    if seeds is None else seeds, data_paths) for row in rows],
                             partial=len(rows) < len(spec.rows)))
    return out


def all_stages(plans: Iterable[TablePlan]) -> list[Stage]:
    return topo_order([s for p in plans for s in p.stages])


def with_data_path(cfg: dict[str, Any], data_paths: Mapping[str, str] | None) -> dict[str, Any]:
    """Point a stage on a real dataset at its root (``--data imagenet1k=/datasets/imagenet``)."""
    d = cfg["data"]
    if data_paths and d["dataset"] in data_paths and not d.get("path"):
        d["path"] = str(data_paths[d["dataset"]])
    return cfg


def parse_data_paths(items: Iterable[str]) -> dict[str, str]:
    from repro.scales import REAL_DATASETS

    names = (*REAL_DATASETS, "ade20k", "coco")  # + the transfer stages' datasets (repro.data.dense checks their roots)
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        if name not in names or not path:
            raise ConfigError(f"--data {item}: expected NAME=PATH with NAME one of {', '.join(names)}")
        out[name] = path
    return out


def describe(plans: list[TablePlan], runs_root: Any, projected: Any = None) -> str:
    """The DAG as text: per table its rows and their stages (state, dependencies), then the totals."""
    lines: list[str] = []
    seen: set[str] = set()
    hours = 0.0
    unknown = 0
    smaller: set[str] = set()  # stages profiled at a larger batch per device than they run
    for tp in plans:
        n_train = sum(r.status == "trainable" for r in tp.rows)
        lines.append(f"{tp.spec.id}: {tp.spec.caption}  [{n_train} trainable, "
                     f"{sum(r.status == 'reported' for r in tp.rows)} reported-only, "
                     f"{sum(r.status == 'pending' for r in tp.rows)} pending]")
        for r in tp.rows:
            if r.status != "trainable":
                lines.append(f"  - {r.row.label}: {r.status} ({r.reason})")
                continue
            lines.append(f"  - {r.row.label}:" + (f" ({r.seeds} seeds)" if r.seeds > 1 else ""))
            for s in r.stages:
                state = "done" if s.done(runs_root) else "todo"
                shared = " (shared)" if s.key in seen else ""
                seen.add(s.key)
                after = f" after {', '.join(d.name for d in s.deps.values())}" if s.deps else ""
                cost = ""
                if projected is not None:
                    h = projected(s.cfg) if s.kind == "pretrain" else None
                    if h is not None:
                        cost = f"  ~{h:,.1f} device-h"
                        detail = getattr(projected, "projection", None)  # a Projector says how it projected
                        found = detail(s.cfg, estimate=False)[0] if detail else None
                        if found is not None and found.parts:
                            cost += f" ({found.parts})"
                            smaller.add(s.key)
                        if not shared:
                            hours += h
                    elif s.kind == "pretrain" and not shared:
                        unknown += 1
                lines.append(f"      {state:4s} {s.name}{after}{shared}{cost}")
    stages = all_stages(plans)
    done = sum(s.done(runs_root) for s in stages)
    lines.append(f"{len(stages)} unique stages ({done} done, {len(stages) - done} to run) for {len(plans)} table(s)")
    if projected is not None:
        lines.append(f"projected pretraining cost: {hours:,.1f} device-h from stored profiles"
                     + (f"; {unknown} pretraining stage(s) have no stored profile (run `repro profile`)" if unknown
                        else ""))
        if smaller:
            from repro.profile.projection import ESTIMATE_MARGIN

            lines.append(f"{len(smaller)} of them run a smaller batch per device than their profile did: their "
                         f"device-h are a lower bound (their Slurm --time has a x{ESTIMATE_MARGIN:g} margin on top)")
    return "\n".join(lines)
