"""Paper tables with our numbers beside the paper's: ``tables/<paper>/<id>.{md,csv,tex}``, the figures and kNN
curves as ``plots/<paper>/<id>.png`` (generated; never edit).

What renders is only what was recorded. Each `repro run` writes, per table and scale, a manifest
(``<runs>/<scale>/tables/<paper>/<id>.json``: every row's status and, per stage kind, the LIST of its stage folders,
seed 0 first; the old form with one folder per kind is read too). A table renders from its manifest and the finished
stages of it still under the runs folder; this module never plans: a table without a manifest renders as "not run"
(the paper's values only), whatever today's recipes would make.

Partial runs: `repro run lomar/t2` rewrites lomar/t2's manifests only, so `repro report` afterwards renders every
other table from its own (older) manifest and the stages still present: the committed rendering of a table changes
only when a run of that table changed its manifest or its stages. Stage folders are found by their last three parts
(``<scale>/<kind>/<name>``) under the runs folder given to the report, so a moved runs folder renders the same.

Seeds: a row's value is mean +- sample std over its seeds (n); each difference against the row's reference row gets
the verdict of ``repro.record.compare.verdict`` (the one noise rule of the suite): resolved, within noise, or no
verdict with one seed on a side. Tiny-scale cost is never wall time (a shared CPU); tables with a cost column show
the ratio of the tiny models' FLOPs per image instead, and point to ``tables/efficiency`` for paper-scale cost.
Transfer columns (mIoU, box / mask AP) at tiny: each row against the trivial floor its stages measured on their own
data (``vs floor``), and the stages' budgets, read from their results.
Markdown keeps the few columns a reader needs; the csv holds every measure, seed, stage folder and device-hours.
Rendering is deterministic: same manifests and results in, byte-identical files out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from repro.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # the run side passes plans in; rendering never plans
    from repro.pipeline.plan import TablePlan

SCALE_NOTE = {
    "tiny": "tiny scale: micro models on the embedded procedural data. The numbers check that the code paths run "
            "and learn; they are NOT comparable with the paper's ImageNet numbers. Read directions inside the table "
            "(each row against its reference row, with the noise verdict), never values against the paper.",
    "paper": "paper scale: the papers' protocol.",
}
# Columns whose paper values are costs (time); at tiny they are never measured from wall time.
COST_MEASURES = ("pretrain.hours", "pretrain.hours_per_epoch", "derived.speedup")
# Measures that are a top-1 accuracy over the dataset's classes (chance level = 100 / classes).
ACCURACY_MEASURES = ("finetune.top1", "linear.top1", "knn.top1", "knn.top1_k20", "semisup.top1",
                     "pretrain.knn_curve")
FLOPS_TITLE = "tiny-model FLOPs ratio"
# Transfer stages record, beside each metric, the same metric of a trivial predictor on the stage's own data
# ("trivial_<metric key>", repro.transfer): the floor a trained model must beat. What that predictor is, per kind:
FLOOR_PREFIX = "trivial_"
FLOOR_KINDS = {
    "segment": ("the best constant prediction's mIoU (one class on every pixel)", "best constant prediction"),
    "detect": ("the AP of a trivial detector that ignores the image (each class's mean training box, scored by the "
               "class's training frequency, its mask the filled box)", "trivial detector"),
}
FLOOR_TITLE = "vs floor"
NOT_ABOVE = "not above"
# Descriptive columns that split a table into groups with a reference row each (a varied factor never does).
GROUP_COLUMNS = ("backbone", "dataset")
NOT_RUN = "not run"


# ---- values ------------------------------------------------------------------------------------------------------


def rel_folder(folder: str | Path) -> str:
    """A stage folder's identity under any runs root: its last three parts, ``<scale>/<kind>/<name>``."""
    return Path(*Path(folder).parts[-3:]).as_posix()


def load_results(runs_root: Path) -> dict[str, dict[str, Any]]:
    """Finished stages' results by stage folder (``rel_folder``)."""
    from repro.record.store import finished_results

    return {rel_folder(r["_dir"]): r for r in finished_results(runs_root)}


# ---- manifests: what a run made for each row -----------------------------------------------------------------------


def manifest_path(runs_root: Path, scale: str, table_id: str) -> Path:
    paper, short = table_id.split("/", 1)
    return Path(runs_root) / scale / "tables" / paper / f"{short}.json"


def manifest(tp: TablePlan, runs_root: Path, scale: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The manifest of one planned table: per row, per stage kind, the stage folders of seed 0 then of each replica
    (``RowPlan.replicas``, the other seeds; a stage shared by the seeds is listed once)."""
    rows = []
    for rp in tp.rows:
        stages: dict[str, list[str]] = {}
        for plan in (rp, *getattr(rp, "replicas", [])):
            for s in plan.stages:
                folders = stages.setdefault(s.kind, [])
                if str(s.dir(runs_root)) not in folders:
                    folders.append(str(s.dir(runs_root)))
        rows.append({"label": rp.row.label, "status": rp.status, "reason": rp.reason, "stages": stages})
    return {"table": tp.spec.id, "scale": scale, "overrides": list(overrides), "rows": rows}


def write_manifests(plans: Iterable[TablePlan], runs_root: Path, scale: str, overrides: Iterable[str] = ()) -> None:
    """One manifest per table; a partial plan (some rows only) replaces its rows in the manifest there is (same
    overrides) and keeps the others, in the spec's row order."""
    for tp in plans:
        m = manifest(tp, runs_root, scale, overrides)
        old = read_manifest(runs_root, scale, tp.spec.id) if getattr(tp, "partial", False) else None
        if old is not None and old.get("overrides") == m["overrides"]:
            rows = {r.get("label"): r for r in old["rows"]} | {r["label"]: r for r in m["rows"]}
            m["rows"] = [rows[r.label] for r in tp.spec.rows if r.label in rows]
        atomic_write_json(manifest_path(runs_root, scale, tp.spec.id), m)


def stage_lists(entry: Mapping[str, Any]) -> dict[str, list[str]]:
    """A manifest row's stage folders per kind, as lists (old manifests hold one folder string per kind)."""
    out: dict[str, list[str]] = {}
    for kind, v in (entry.get("stages") or {}).items():
        out[kind] = [v] if isinstance(v, str) else [str(x) for x in v or []]
    return out


def read_manifest(runs_root: Path, scale: str, table_id: str) -> dict[str, Any] | None:
    """The latest run's manifest of this table at this scale, or None (never run, or unreadable)."""
    p = manifest_path(runs_root, scale, table_id)
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("rows"), list) else None


def spec_status(row: Any) -> tuple[str, str]:
    """Status and reason of a spec row that no manifest lists (a row added to the spec since the run)."""
    if row.reported:
        return "reported", row.reported
    if not row.trainable:
        return "pending", row.pending or "no recipe"
    return "trainable", ""


class RowView:
    """One row of a table at one scale: the spec row, its recorded status and its finished stage results per kind
    (one per seed, seed 0 first; stages not present are left out)."""

    def __init__(self, row: Any, entry: Mapping[str, Any] | None, results: Mapping[str, Any]) -> None:
        self.row = row
        if entry is None:
            self.status, self.reason = spec_status(row)
            if self.status == "trainable":
                self.status, self.reason = NOT_RUN, "not in the run's manifest"
        else:
            self.status, self.reason = entry["status"], entry.get("reason", "")
        self.dirs = stage_lists(entry or {})
        found = {k: [r for r in (results.get(rel_folder(d)) for d in ds) if r is not None]
                 for k, ds in self.dirs.items()}
        # A result made by code whose results-version has changed since is left out (the numbers would mix code
        # versions); ``stale`` counts them and the table says how to recompute them.
        self.stale = sum(1 for rs in found.values() for r in rs if not current_code(r))
        self.results: dict[str, list[dict[str, Any]]] = {k: [r for r in rs if current_code(r)]
                                                         for k, rs in found.items()}

    @property
    def trainable(self) -> bool:
        return self.status == "trainable"

    def result(self, kind: str) -> dict[str, Any] | None:
        """Seed 0's result of ``kind`` (the first present)."""
        rs = self.results.get(kind) or []
        return rs[0] if rs else None

    def values(self, column: Any) -> list[Any]:
        """Our values of a measured column, one per seed present (curves stay lists)."""
        from repro.spec.schema import MEASURES

        kind = MEASURES[column.measure][0]
        out = [measure(column.measure, r) for r in self.results.get(kind, [])]
        return [v for v in out if v is not None]

    def floors(self, column: Any) -> list[float]:
        """The trivial floor of a measured column, one per seed present (``floor_kind``; [] without one)."""
        from repro.spec.schema import MEASURES

        if floor_kind(column) is None:
            return []
        kind, key = MEASURES[column.measure]
        return numbers([(r.get("metrics") or {}).get(FLOOR_PREFIX + key) for r in self.results.get(kind, [])])

    def flops(self, per_epoch: bool = False) -> float | None:
        """The tiny model's pretraining FLOPs: FLOPs per image of its step (the engine's count) x images seen (per
        epoch with ``per_epoch``); None without them."""
        acct = (self.result("pretrain") or {}).get("accounting", {})
        per_image, images, epochs = acct.get("flops_per_image"), acct.get("images"), acct.get("epochs")
        if not all(isinstance(v, (int, float)) and v > 0 for v in (per_image, images, epochs)):
            return None
        return float(per_image) * float(images) / (float(epochs) if per_epoch else 1.0)

    def classes(self, kinds: Iterable[str] | None = None) -> set[int]:
        """The number of classes of the stages' data (of ``kinds`` only, default: every evaluation)."""
        want = set(kinds) if kinds is not None else None
        return {int(c) for k, rs in self.results.items() for r in rs
                if (k in want if want is not None else k != "pretrain")
                and isinstance(c := r.get("config", {}).get("data", {}).get("num_classes"), int)}

    def seeds(self) -> list[int]:
        return sorted({int(s) for rs in self.results.values() for r in rs
                       if isinstance(s := (r.get("config") or {}).get("seed"), int)})


def current_code(result: Mapping[str, Any]) -> bool:
    """Whether ``result`` was made by the code's current results-versions (a result from before they were recorded
    counts as version 1 everywhere)."""
    from repro.pipeline.stage import changed_code, results_version

    made = (result.get("provenance") or {}).get("results_version") or {}
    cfg = result.get("config") or {}
    return changed_code(made) == changed_code(results_version(str(result.get("kind", "")), cfg))


def row_views(spec: Any, m: Mapping[str, Any] | None, results: Mapping[str, Any]) -> list[RowView]:
    """Spec rows (in spec order) with their manifest entries, matched by label."""
    entries = {e.get("label"): e for e in (m or {}).get("rows", [])}
    return [RowView(row, entries.get(row.label), results) for row in spec.rows]


def table_views(runs_root: Path, scale: str, spec: Any, results: Mapping[str, Any]) -> list[RowView] | None:
    """The rows of ``spec`` as recorded at ``scale``; None when no run of it left a manifest there."""
    m = read_manifest(runs_root, scale, spec.id)
    return None if m is None else row_views(spec, m, results)


def knn_curve(result: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(epoch, kNN top-1) points recorded during pretraining."""
    hist = result.get("accounting", {}).get("history", [])
    return [(int(h["epoch"]), float(h["knn_top1_k20"])) for h in hist if "knn_top1_k20" in h]


def measure(measure: str, result: Mapping[str, Any] | None) -> Any:
    """Our value of ``measure`` (a ``repro.spec.MEASURES`` key) from a stage's result, None when absent."""
    if result is None:
        return None
    m, acct = result.get("metrics", {}), result.get("accounting", {})
    if measure == "pretrain.hours":
        return acct.get("device_hours")
    if measure == "pretrain.hours_per_epoch":
        ep = acct.get("epochs") or 0
        return acct["device_hours"] / ep if ep else None
    if measure == "pretrain.knn_curve":
        curve = knn_curve(result)
        return curve[-1][1] if curve else None
    if measure == "pretrain.loss_curve":
        return m.get("final_loss")
    from repro.spec.schema import MEASURES

    return m.get(MEASURES[measure][1])


# ---- seeds and verdicts ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    """One difference of a row against its reference row (``verdict`` from ``repro.record.compare``)."""

    diff: float
    tolerance: float | None  # K x Welch standard error; None with one seed on a side
    word: str  # resolved / within noise / n=1, no verdict
    pooled_std: float | None  # the two sides' seed std, pooled (for "difference in seed stds")

    @property
    def resolved(self) -> bool:
        return self.word == RESOLVED


RESOLVED, WITHIN, NO_VERDICT = "resolved", "within noise", "n=1, no verdict"


def numbers(vals: Sequence[Any]) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def compare_values(base: Sequence[Any], head: Sequence[Any]) -> Diff | None:
    """head - base over seeds with its noise verdict; None when a side has no number."""
    from repro.record.compare import NO_SPREAD, verdict

    b, h = numbers(base), numbers(head)
    if not b or not h:
        return None
    v = verdict(b, h)
    if v.verdict == NO_SPREAD:
        return Diff(v.diff, None, NO_VERDICT, None)
    pooled = math.sqrt((v.base.std ** 2 + v.head.std ** 2) / 2)
    return Diff(v.diff, v.tolerance, WITHIN if v.verdict == "within noise" else RESOLVED, pooled)


def fmt(v: float | None, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def digits_for(col: Any) -> int:
    """One number format per column: accuracies (%) with 1 decimal, other measures with 3."""
    return 1 if (col.unit == "%" or col.measure in ACCURACY_MEASURES or "top1" in (col.measure or "")
                 or col.measure.startswith(("segmentation", "detection"))) else 3


def mean_cell(vals: Sequence[Any], digits: int) -> str:
    """``mean ± std (n=N)``; one seed: ``value (n=1)``; a per-layer curve: its ends (the whole curve in the plot)."""
    curves = [v for v in vals if isinstance(v, list)]
    if curves:
        c = curves[0]
        return f"{len(c)} layers: {fmt(c[0], 3)} .. {fmt(c[-1], 3)} (plot)" if c else ""
    from repro.record.compare import summarize

    xs = numbers(vals)
    if not xs:
        return ""
    s = summarize(xs)
    if s.n == 1:
        return f"{fmt(s.mean, digits)} (n=1)"
    return f"{fmt(s.mean, digits)} ± {fmt(s.std, digits)} (n={s.n})"


def diff_cell(d: Diff | None, digits: int) -> str:
    if d is None:
        return ""
    text = f"{d.diff:+.{digits}f}"
    if d.word == NO_VERDICT:
        return f"{text} (n=1, no verdict)"
    tol = f"±{d.tolerance:.{digits}f}" if d.tolerance is not None else ""
    return f"**{text}** (resolved, {tol})" if d.resolved else f"{text} (within noise, {tol})"


# ---- one table at one scale -----------------------------------------------------------------------------------------


def references(spec: Any, views: list[RowView]) -> dict[str, str | None]:
    """Row label -> the row it is compared with: the spec's ``reference_row`` if it names one, else the first
    trainable row of its group (the same backbone or dataset: ``GROUP_COLUMNS``; the whole table without them)."""
    if spec.reference_row:
        return {rv.row.label: spec.reference_row for rv in views}
    text = [c.id for c in spec.columns if c.type == "text" and not c.measure and c.id in GROUP_COLUMNS]
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str | None] = {}
    for rv in views:
        group = tuple(rv.row.value(c) for c in text)
        if rv.row.trainable:
            first.setdefault(group, rv.row.label)
        out[rv.row.label] = first.get(group)
    return out


def result_columns(spec: Any) -> list[Any]:
    """The measured columns that are results (not cost)."""
    return [c for c in spec.columns if c.measure and c.measure not in COST_MEASURES]


def cost_columns(spec: Any) -> list[Any]:
    return [c for c in spec.columns if c.measure in COST_MEASURES]


def _paper_cell(cell: Any, digits: int | None = None) -> str:
    """The paper's value as printed ("~" approximate, "(?)" flagged); ``digits``: in the column's number format."""
    if cell is None or (cell.value is None and not cell.flag):
        return ""
    if cell.value is None:
        return "? (flagged)"
    v = cell.value
    if digits is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        text = f"{v:.{digits}f}"
    else:
        text = f"{v:g}" if isinstance(v, float) else str(v)
    return ("~" if cell.approx else "") + text + (" (?)" if cell.flag else "")


def _status_cell(rv: RowView) -> str | None:
    """What a row without numbers shows in the "ours" columns (None: it has numbers)."""
    if rv.status == "reported":
        return "reported only"
    if rv.status == "pending":
        return "pending"
    if rv.status != "trainable":
        return rv.status
    return None


def chance(views: Iterable[RowView], columns: Iterable[Any]) -> dict[int, float]:
    """Classes -> chance top-1 (%) of the accuracy ``columns``' stages present."""
    from repro.spec.schema import MEASURES

    kinds = {MEASURES[c.measure][0] for c in columns if c.measure in ACCURACY_MEASURES}
    return {n: 100.0 / n for n in sorted({c for rv in views for c in rv.classes(kinds)}) if n > 0}


# ---- trivial floors and budgets of the transfer measures (tiny) ----------------------------------------------------


def floor_kind(column: Any) -> str | None:
    """The stage kind whose trivial floor goes with ``column`` (``FLOOR_KINDS``), None: the column has none."""
    from repro.spec.schema import MEASURES

    if not column.measure or column.measure in COST_MEASURES or column.measure not in MEASURES:
        return None
    kind = MEASURES[column.measure][0]
    return kind if kind in FLOOR_KINDS else None


def floor_columns(spec: Any) -> list[Any]:
    """The result columns with a trivial floor (mIoU, box / mask AP)."""
    return [c for c in result_columns(spec) if floor_kind(c)]


def floor_word(floors: Sequence[float], vals: Sequence[Any]) -> tuple[float, str] | None:
    """(ours - floor, verdict) over seeds: ``NOT_ABOVE`` at or below it, else the suite's noise verdict of the
    difference (the floor of one seed's data stands for every seed's when only one is recorded)."""
    f, v = numbers(floors), numbers(vals)
    if not f or not v:
        return None
    d = compare_values(f if len(f) > 1 else f * 2, v)
    if d is None:
        return None
    if d.diff <= 0:
        return d.diff, NOT_ABOVE
    return d.diff, {RESOLVED: "above", WITHIN: WITHIN}.get(d.word, NO_VERDICT)


def floor_cell(checks: Sequence[tuple[str, tuple[float, str] | None]], digits: int) -> str:
    """The ``vs floor`` cell of a row: ours - floor per floor column (" / " between columns) and one verdict, the
    columns not above their floor in bold."""
    if not any(c for _, c in checks):
        return ""
    diffs = " / ".join(f"{c[0]:+.{digits}f}" if c else "n/a" for _, c in checks)
    below = [t for t, c in checks if c and c[1] == NOT_ABOVE]
    if below:
        return f"{diffs} (**{NOT_ABOVE}" + (f": {', '.join(below)}" if len(checks) > 1 else "") + "**)"
    words = [(t, c[1]) for t, c in checks if c]
    noisy = [t for t, w in words if w == WITHIN]
    if noisy:
        return f"{diffs} ({WITHIN}" + (f": {', '.join(noisy)}" if len(checks) > 1 else "") + ")"
    return f"{diffs} ({'above' if all(w == 'above' for _, w in words) else NO_VERDICT})"


def floor_range(values: Iterable[float], digits: int) -> str:
    """One floor value, or the range of the rows' floors when their data differ."""
    xs = sorted({fmt(v, digits) for v in values}, key=float)
    return xs[0] if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"


def budget(result: Mapping[str, Any]) -> str | None:
    """A transfer stage's training budget from its result (accounting and resolved config), e.g. "3 epochs = 384
    iterations x batch 4 (1,536 images seen) over 512 embedded training images, 64-px crops"; None without an
    iteration count."""
    acct, cfg = result.get("accounting") or {}, result.get("config") or {}
    iters = acct.get("iterations", acct.get("iters"))
    if not isinstance(iters, int):
        return None
    o, d = cfg.get("optim") or {}, cfg.get("data") or {}
    text = f"{iters:,} iterations"
    if isinstance(o.get("batch_size"), int):
        text += f" x batch {o['batch_size']}"
    if isinstance(o.get("epochs"), (int, float)):
        text = f"{o['epochs']:g} epochs = {text}"
    if isinstance(acct.get("images"), int):
        text += f" ({acct['images']:,} images seen)"
    if acct.get("completed") is False:
        text += " (stopped before the schedule's end)"
    if d.get("dataset") == "synthetic" and isinstance(d.get("synthetic_train"), int):
        text += f" over {d['synthetic_train']:,} embedded training images"
    elif d.get("dataset"):
        text += f" over {d['dataset']}"
    if isinstance(d.get("img_size"), int):
        text += f", {d['img_size']}-px crops"
    return text


def budget_lines(spec: Any, views: Iterable[RowView]) -> list[str]:
    """Per transfer kind of the floor columns, the legend line of its stages' budgets (rows named where they
    differ)."""
    out = []
    views = list(views)
    for kind in dict.fromkeys(floor_kind(c) for c in floor_columns(spec)):
        rows: dict[str, list[str]] = {}
        frameworks: set[str] = set()
        for rv in views:
            for r in rv.results.get(str(kind), []):
                if (b := budget(r)) is not None and rv.row.label not in rows.setdefault(b, []):
                    rows[b].append(rv.row.label)
                if isinstance(fw := (r.get("config") or {}).get("framework"), str):
                    frameworks.add(fw)
        if not rows:
            continue
        name = f"{kind} ({', '.join(sorted(frameworks))})" if frameworks else str(kind)
        text = next(iter(rows)) if len(rows) == 1 else "; ".join(f"{b} ({', '.join(ls)})" for b, ls in rows.items())
        out.append(f"- tiny budget of the {name} stages (from their results): {text}.")
    return out


def floor_legend(spec: Any, views: Iterable[RowView]) -> list[str]:
    """The tiny legend's lines on the transfer columns: each kind's floor (value, or range over the rows' data) and
    the budget of its stages; [] when no row recorded a floor."""
    views = list(views)
    cols = floor_columns(spec)
    found = {c.id: [f for rv in views for f in rv.floors(c)] for c in cols}
    if not any(found.values()):
        return []
    out = []
    for kind in dict.fromkeys(floor_kind(c) for c in cols):
        mine = [c for c in cols if floor_kind(c) == kind and found[c.id]]
        if not mine:
            continue
        what = FLOOR_KINDS[str(kind)][0]
        vals = ", ".join((f"{c.title} " if len(mine) > 1 else "") + floor_range(found[c.id], digits_for(c))
                         for c in mine)
        out.append(f"- floor: {what}, measured on each stage's own evaluation data: {vals}.")
    order = f" per column ({' / '.join(c.title for c in cols)})" if len(cols) > 1 else ""
    out.append(f"- `{FLOOR_TITLE}`: ours minus the floor of the row's own stages{order}, with the seed-noise verdict "
               f"(above: resolved; **{NOT_ABOVE}**: at or below the floor).")
    return out + budget_lines(spec, views)


@dataclass
class Frame:
    """A table at one scale: the readable markdown frame and the full-detail csv frame."""

    md: pd.DataFrame
    csv: pd.DataFrame
    chance: dict[int, float]
    flops: bool  # the markdown shows the tiny-model FLOPs ratio
    reference: str | None
    floor: list[str] = field(default_factory=list)  # legend lines on the transfer floors and budgets (tiny)


def table_frame(spec: Any, views: list[RowView], scale: str) -> Frame:
    """Markdown: row, then per result column the paper's value, ours (mean ± std, n) and the difference against the
    row's reference row with its verdict (at paper scale: ours - paper), at tiny ``vs floor`` where columns have a
    trivial floor (``floor_legend``), then cost. CSV: every number."""
    refs = references(spec, views)
    by_label = {rv.row.label: rv for rv in views}
    results = result_columns(spec)
    costs = cost_columns(spec)
    multi = len(results) > 1
    tiny = scale != "paper"
    flops = tiny and bool(costs) and any(rv.flops() for rv in views)
    floor = floor_legend(spec, views) if tiny else []
    floor_cols = floor_columns(spec) if floor else []
    md_records, csv_records = [], []
    for rv in views:
        row, label = rv.row, rv.row.label
        ref = refs.get(label)
        ref_rv = by_label.get(ref) if ref else None
        status = _status_cell(rv)
        md: dict[str, Any] = {"row": label}
        csv: dict[str, Any] = {"scale": scale, "row": label, "status": rv.status,
                               "reference row": ref if tiny and ref != label else ""}
        for c in spec.columns:
            if not c.measure:
                csv[c.id] = _paper_cell(row.cells.get(c.id))
        checks: list[tuple[str, tuple[float, str] | None]] = []
        for c in results:
            t = f" {c.title}" if multi else ""
            digits = digits_for(c)
            vals = rv.values(c)
            md[f"paper{t}"] = _paper_cell(row.cells.get(c.id), digits)
            md[f"ours{t}"] = status or mean_cell(vals, digits) or NOT_RUN
            d: Diff | None = None
            if status is None and tiny and ref_rv is not None and ref != label:
                d = compare_values(ref_rv.values(c), vals)
            elif status is None and not tiny:
                p = row.value(c.id)
                d = compare_values([p], vals) if isinstance(p, (int, float)) else None
            vs = "vs paper" if not tiny else "vs ref"
            md[f"{vs}{t}"] = ("reference" if tiny and ref == label and status is None and vals else
                              diff_cell(d, digits))
            xs = numbers(vals)
            csv[f"{c.id} paper"] = _paper_cell(row.cells.get(c.id))
            csv[f"{c.id} mean"] = fmt(sum(xs) / len(xs), 4) if xs else ""
            csv[f"{c.id} std"] = fmt(pd.Series(xs).std(), 4) if len(xs) > 1 else ""
            csv[f"{c.id} n"] = len(xs) if xs else ""
            csv[f"{c.id} values"] = ";".join(f"{x:.4f}" for x in xs) or (
                json.dumps([v for v in vals if isinstance(v, list)]) if vals else "")
            csv[f"{c.id} diff"] = f"{d.diff:.4f}" if d else ""
            csv[f"{c.id} tolerance"] = f"{d.tolerance:.4f}" if d and d.tolerance is not None else ""
            csv[f"{c.id} verdict"] = d.word if d else ""
            if c in floor_cols:
                fl = rv.floors(c) if status is None else []
                check = floor_word(fl, vals)
                checks.append((c.title, check))
                csv[f"{c.id} floor"] = fmt(sum(fl) / len(fl), 4) if fl else ""
                csv[f"{c.id} vs floor"] = f"{check[0]:.4f}" if check else ""
                csv[f"{c.id} floor verdict"] = check[1] if check else ""
        if floor_cols:
            md[FLOOR_TITLE] = floor_cell(checks, min(digits_for(c) for c in floor_cols))
            csv["budget"] = " | ".join(dict.fromkeys(b for c in floor_cols for r in rv.results.get(
                str(floor_kind(c)), []) if (b := budget(r)) is not None))
        for c in costs:
            md[f"{c.title}, paper"] = _paper_cell(row.cells.get(c.id))
            csv[f"{c.id} paper"] = _paper_cell(row.cells.get(c.id))
            if not tiny and c.measure != "derived.speedup":
                md[f"{c.title}, ours"] = status or mean_cell(rv.values(c), 3) or NOT_RUN
        if flops:
            per_epoch = not any(c.measure == "pretrain.hours" for c in costs)
            base = ref_rv.flops(per_epoch) if ref_rv is not None else None
            mine = rv.flops(per_epoch)
            md[FLOPS_TITLE] = fmt(mine / base, 2) if mine and base and status is None else ""
        acct = (rv.result("pretrain") or {}).get("accounting", {})
        csv["flops per image"] = fmt(acct.get("flops_per_image"), 0) if acct.get("flops_per_image") else ""
        csv["pretrain flops"] = f"{rv.flops():.4g}" if rv.flops() else ""
        csv["seeds"] = ";".join(str(s) for s in rv.seeds())
        csv["stages"] = ";".join(f"{k}:{Path(d).name}" for k, ds in sorted(rv.dirs.items()) for d in ds)
        hours = [r["accounting"].get("device_hours", 0.0) for rs in rv.results.values() for r in rs]
        csv["device-h"] = fmt(sum(hours), 5) if hours else ""
        subs = sorted({s for rs in rv.results.values() for r in rs for s in r.get("substitutes", [])})
        csv["note"] = "; ".join([*([rv.reason] if rv.reason else []), *(f"SUBSTITUTE: {s}" for s in subs),
                                 *([row.note] if row.note else [])])
        md_records.append(md)
        csv_records.append(csv)
    first_ref = next((r for r in refs.values() if r), None)
    return Frame(pd.DataFrame.from_records(md_records).fillna(""), pd.DataFrame.from_records(csv_records).fillna(""),
                 chance(views, results), flops, first_ref, floor)


def paper_frame(spec: Any) -> pd.DataFrame:
    """A table nobody ran: the paper's values of its measured columns, and each row's status."""
    records = []
    for row in spec.rows:
        rec: dict[str, Any] = {"row": row.label}
        for c in spec.columns:
            if c.measure:
                rec[c.title] = _paper_cell(row.cells.get(c.id))
        status, _ = spec_status(row)
        rec["ours"] = {"reported": "reported only", "pending": "pending"}.get(status, NOT_RUN)
        records.append(rec)
    return pd.DataFrame.from_records(records).fillna("")


# ---- writers -------------------------------------------------------------------------------------------------------


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    esc = [str(c).replace("|", "\\|") for c in cols]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _latex(df: pd.DataFrame, caption: str, label: str) -> str:
    special = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$",
               "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}

    def tex(s: Any) -> str:
        return "".join(special.get(ch, ch) for ch in str(s).replace("**", "").replace("±", "+-"))

    cols = list(df.columns)
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(caption)}}}", f"\\label{{tab:{label}}}",
             "\\begin{tabular}{" + "l" * len(cols) + "}", "\\hline",
             " & ".join(tex(c) for c in cols) + " \\\\", "\\hline"]
    lines += [" & ".join(tex(r[c]) for c in cols) + " \\\\" for _, r in df.iterrows()]
    lines += ["\\hline", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def legend(spec: Any, frame: Frame, scale: str, cost_link: str | None) -> list[str]:
    """The lines under a scale's heading that say how to read its columns."""
    out = [f"> {SCALE_NOTE.get(scale, scale)}", ""]
    if scale != "paper":
        out.append("- ours: mean ± std over seeds (n); `vs ref`: this row minus its reference row"
                   + (f" (**{frame.reference}** unless the csv names another)" if frame.reference else "")
                   + ", with the seed-noise verdict (resolved: |diff| > 2 x the Welch standard error of the two "
                     "seed spreads; within noise: not a finding; n=1: no spread to judge by).")
    else:
        out.append("- ours: mean ± std over seeds (n); `vs paper`: ours minus the paper's value.")
    if frame.chance and any(c.measure in ACCURACY_MEASURES for c in result_columns(spec)):
        out.append("- chance level: " + ", ".join(f"{v:.1f}% ({n} classes)" for n, v in frame.chance.items()) + ".")
    if scale != "paper":
        out += frame.floor
    if cost_columns(spec) and scale != "paper":
        where = f"[`{cost_link}`]({Path(cost_link).name})" if cost_link else "[`tables/efficiency`](../efficiency)"
        out.append("- cost: the paper's columns only; no time is measured from tiny runs on a shared CPU. "
                   + (f"`{FLOPS_TITLE}`: this row's tiny pretraining FLOPs (the engine's count per image x images "
                      "seen; per epoch where the paper's cost is per epoch) over its reference row's. "
                      if frame.flops else "")
                   + f"Paper-scale cost, measured by `repro profile`: {where}.")
    out.append("- every measure, seed, stage folder and device-hours: the csv beside this file.")
    return [*out, ""]


def table_markdown(spec: Any, frames: Mapping[str, Frame], overrides: Mapping[str, list[str]],
                   stale: Mapping[str, int] | None = None, cost_link: str | None = None) -> str:
    lines = [f"# {spec.id}: {spec.caption}", "", f"Paper values from {spec.source}. Generated by `repro report`; "
             "do not edit.", ""]
    for scale, n in (stale or {}).items():
        if n:
            lines += [f"**{n} {scale}-scale result(s) of this table were made by older code (a results-version has "
                      f"changed since) and are left out**: `repro run {spec.id} --scale {scale}` recomputes them.", ""]
    for scale, frame in frames.items():
        lines += [f"## {scale} scale", ""]
        lines += legend(spec, frame, scale, cost_link)
        if overrides.get(scale):
            lines += [f"Run with overrides: `{' '.join(overrides[scale])}`.", ""]
        lines += [to_markdown(frame.md), ""]
    if not frames:
        lines += [f"_Not run: no run of this table has finished a stage (`repro run {spec.id}`). The paper's values:_",
                  "", to_markdown(paper_frame(spec)), ""]
    row_notes = [(r.label, r.note) for r in spec.rows if r.note]
    reasons = {rv_label: why for f in frames.values()
               for rv_label, why in zip(f.csv["row"], f.csv["note"]) if why}
    flagged = [(r.label, cid, c.flag) for r in spec.rows for cid, c in r.cells.items() if c.flag]
    if spec.notes or flagged or row_notes or reasons:
        lines += ["Notes:", ""]
        lines += [f"- {n}" for n in spec.notes]
        shown = reasons or dict(row_notes)
        lines += [f"- {label}: {why}" for label, why in shown.items()]
        lines += [f"- {label} / {cid}: flagged: {why}" for label, cid, why in flagged]
        lines.append("")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------------


Point = tuple[float, float, float]  # x, mean, std over seeds


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    from repro.record.compare import summarize

    s = summarize(vals)
    return s.mean, s.std


def _paper_points(spec: Any) -> dict[str, list[Point]]:
    plot = spec.plot or {}
    out: dict[str, list[Point]] = {}
    for row in spec.rows:
        x = row.x if plot.get("x", "x") == "x" else row.value(plot["x"])
        y = row.value(plot["y"])
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            out.setdefault(row.series or spec.id, []).append((float(x), float(y), 0.0))
    return {k: sorted(v) for k, v in sorted(out.items())}


def flops_axis(spec: Any, scale: str) -> bool:
    """Whether the plot's x axis is a cost (time) column: at tiny it becomes the tiny models' pretraining FLOPs."""
    x = (spec.plot or {}).get("x", "x")
    return scale != "paper" and x != "x" and spec.column(x).measure in COST_MEASURES


def _our_points(spec: Any, views: list[RowView], scale: str) -> dict[str, list[Point]]:
    plot = spec.plot or {}
    xcol, ycol = plot.get("x", "x"), spec.column(plot["y"])
    by_flops = flops_axis(spec, scale)
    out: dict[str, list[Point]] = {}
    for rv in views:
        vals = rv.values(ycol) if ycol.measure else []
        curves = [v for v in vals if isinstance(v, list) and v]
        if curves:  # a per-layer curve (analysis measures): x = layer (1-based), mean over seeds per layer
            for i in range(min(len(c) for c in curves)):
                m, s = _mean_std([float(c[i]) for c in curves])
                out.setdefault(rv.row.series or rv.row.label, []).append((i + 1.0, m, s))
            continue
        xs = numbers(vals)
        if by_flops:
            x = rv.flops()
        elif xcol == "x":
            x = rv.row.x
        else:
            col = spec.column(xcol)
            xv = numbers(rv.values(col)) if col.measure else [rv.row.value(xcol)]
            x = sum(numbers(xv)) / len(numbers(xv)) if numbers(xv) else None
        if x is None or not xs:
            continue
        m, s = _mean_std(xs)
        out.setdefault(rv.row.series or spec.id, []).append((float(x), m, s))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _curves(views: list[RowView]) -> dict[str, list[Point]]:
    """Row -> (epoch, mean, std) of the kNN curves recorded during pretraining, over seeds."""
    out: dict[str, list[Point]] = {}
    for rv in views:
        by_epoch: dict[int, list[float]] = {}
        for r in rv.results.get("pretrain", []):
            for e, v in knn_curve(r):
                by_epoch.setdefault(e, []).append(v)
        if by_epoch:
            out[rv.row.label] = [(float(e), *_mean_std(vs)) for e, vs in sorted(by_epoch.items())]
    return out


def render_plot(spec: Any, views: list[RowView], scale: str, path: Path) -> Path | None:
    """Figures: the paper's points and ours at ``scale`` (error bars: std over seeds; the chance level on accuracy
    axes at tiny, the trivial floor on mIoU / AP axes), a panel only where there is something to draw; kNN-curve
    tables: our kNN-vs-epoch curves. Returns the path, or None (and no file) when nothing can be drawn."""
    import io
    import textwrap

    curves = any(c.measure == "pretrain.knn_curve" for c in spec.columns)
    if spec.plot is None and not curves:
        return None
    plot = spec.plot or {}
    panels: list[tuple[str, dict[str, list[Point]]]] = []
    if spec.plot is not None and (paper := _paper_points(spec)):
        panels.append(("paper", paper))
    ours = _curves(views) if curves else _our_points(spec, views, scale)
    if ours:
        panels.append(("ours", ours))
    if not panels:
        path.unlink(missing_ok=True)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"svg.hashsalt": "repro", "font.size": 9})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 0.5, 3.8), squeeze=False)
    ycol = spec.column(plot["y"]) if plot.get("y") else None
    xlabel = plot.get("xlabel") or plot.get("x", "x")
    ylabel = plot.get("ylabel") or (ycol.title if ycol else "kNN top-1 (%)")
    accuracy = curves or (ycol is not None and ycol.measure in ACCURACY_MEASURES)
    levels = chance(views, [c for c in spec.columns if c.measure in ACCURACY_MEASURES and (
        c.measure == "pretrain.knn_curve" if curves else c is ycol)])
    # the trivial floors of a transfer measure on the y axis (one line per distinct value of the rows' data)
    floors = sorted({round(f, 4) for rv in views for f in rv.floors(ycol)}) if ycol is not None and not curves else []
    for ax, (which, series) in zip(axes[0], panels):
        for name, pts in series.items():
            xs, ms, ss = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            if which == "ours":
                ax.errorbar(xs, ms, yerr=ss, marker="o", ms=4, capsize=3, label=name)
            else:
                ax.plot(xs, ms, marker="o", ms=4, linestyle="--", label=name)
        if which == "ours" and accuracy and scale != "paper":
            for n, v in levels.items():
                ax.axhline(v, color="gray", linestyle=":", linewidth=1, label=f"chance ({v:.0f}%, {n} classes)")
        if which == "ours" and scale != "paper":
            for f in floors:
                ax.axhline(f, color="gray", linestyle=":", linewidth=1,
                           label=f"floor ({f:.1f}, {FLOOR_KINDS[str(floor_kind(ycol))][1]})")
        title = "paper" if which == "paper" else f"ours, {scale} scale" + (
            " (mean ± std over seeds; not comparable with the paper)" if scale != "paper" else "")
        ax.set_title(title, fontsize=9)
        if which == "ours" and curves:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 2.5
        elif which == "ours" and flops_axis(spec, scale):
            ax.set_xlabel("tiny-model pretraining FLOPs (no wall time at tiny)")
        else:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if plot.get("logx") and not (curves and which == "ours"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, f"paper values: {spec.source}", fontsize=7, color="gray")
    fig.suptitle(textwrap.fill(f"{spec.id}: {spec.caption}", 55 * len(panels)), fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- everything ----------------------------------------------------------------------------------------------------

SCALES = ("paper", "tiny")


def cost_table(repo_root: Path, spec: Any) -> str | None:
    """The committed `repro profile` cost table of this table, if any (``tables/<paper>/<id>-cost.md``)."""
    paper, short = spec.id.split("/", 1)
    rel = f"tables/{paper}/{short}-cost.md"
    return rel if (repo_root / rel).is_file() else None


def render_table(spec: Any, runs_root: Path, repo_root: Path, results: Mapping[str, Any]) -> list[Path]:
    """Write one table's md (always), csv and tex (when a scale has results) and plot; returns the written paths."""
    frames: dict[str, Frame] = {}
    overrides: dict[str, list[str]] = {}
    views_at: dict[str, list[RowView]] = {}
    stale: dict[str, int] = {}
    for scale in SCALES:
        m = read_manifest(runs_root, scale, spec.id)
        if m is None:
            continue
        views = row_views(spec, m, results)
        stale[scale] = sum(rv.stale for rv in views)
        if not any(rs for rv in views for rs in rv.results.values()):
            continue
        views_at[scale] = views
        frames[scale] = table_frame(spec, views, scale)
        overrides[scale] = list(m.get("overrides") or [])
    paper, short = spec.id.split("/", 1)
    base = repo_root / "tables" / paper / short
    md = table_markdown(spec, frames, overrides, stale, cost_table(repo_root, spec))
    written = [atomic_write_text(base.with_suffix(".md"), md)]
    if frames:
        full = pd.concat([f.csv for f in frames.values()], ignore_index=True)
        readable = pd.concat([f.md for f in frames.values()], ignore_index=True).fillna("")
        written.append(atomic_write_text(base.with_suffix(".csv"), full.to_csv(index=False)))
        written.append(atomic_write_text(base.with_suffix(".tex"),
                                         _latex(readable, f"{spec.id}: {spec.caption}", spec.id.replace("/", ":"))))
    scale = "paper" if "paper" in views_at else next(iter(views_at), "tiny")
    png = render_plot(spec, views_at.get(scale, []), scale, repo_root / "plots" / paper / f"{short}.png")
    if png is not None:
        written.append(png)
    return written


def render_all(runs_root: Path, repo_root: Path, ids: Iterable[str] = ("all",)) -> list[Path]:
    """Write every table (md, csv, tex) and plot from the recorded manifests and results; returns the written
    paths."""
    from repro.spec import select

    results = load_results(runs_root)
    written: list[Path] = []
    for spec in select(list(ids)):
        written += render_table(spec, Path(runs_root), Path(repo_root), results)
    return written
