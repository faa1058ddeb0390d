"""Paper tables with our numbers beside the paper's: ``tables/<paper>/<id>.{md,csv,tex}``, the figures and efficiency
views as ``plots/<paper>/<id>.png``, all from the finished stages under the runs folder (generated; never edit).

Each `repro run` writes a manifest per table and scale (``<runs>/<scale>/tables/<paper>/<id>.json``: every row's
status and stage folders, and the run's overrides); the report reads it, so a row finds exactly the stages the run
made. A table with no manifest is planned afresh with the default recipes. Rendering is deterministic: same results
in, byte-identical files out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from repro.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from repro.pipeline.plan import TablePlan, plan_tables

SCALE_NOTE = {
    "tiny": "tiny scale: micro models on the embedded procedural data. These numbers check that the code paths run "
            "and learn; they are NOT comparable with the paper's ImageNet numbers. Compare directions inside the "
            "table (each row against the reference row), never values against the paper.",
    "paper": "paper scale: the papers' protocol.",
}


# ---- values ------------------------------------------------------------------------------------------------------


def load_results(runs_root: Path) -> dict[str, dict[str, Any]]:
    """Finished stages' results by stage folder."""
    from repro.report.results import collect

    return {r["_dir"]: r for r in collect(runs_root)}


# ---- manifests: what a run made for each row -----------------------------------------------------------------------


def manifest_path(runs_root: Path, scale: str, table_id: str) -> Path:
    paper, short = table_id.split("/", 1)
    return Path(runs_root) / scale / "tables" / paper / f"{short}.json"


def manifest(tp: TablePlan, runs_root: Path, scale: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    return {"table": tp.spec.id, "scale": scale, "overrides": list(overrides),
            "rows": [{"label": rp.row.label, "status": rp.status, "reason": rp.reason,
                      "stages": {s.kind: str(s.dir(runs_root)) for s in rp.stages}} for rp in tp.rows]}


def write_manifests(plans: Iterable[TablePlan], runs_root: Path, scale: str, overrides: Iterable[str] = ()) -> None:
    for tp in plans:
        atomic_write_json(manifest_path(runs_root, scale, tp.spec.id), manifest(tp, runs_root, scale, overrides))


def read_manifest(runs_root: Path, scale: str, spec: Any, plan: TablePlan | None) -> dict[str, Any] | None:
    """The run's manifest for this table, or one made from a fresh default plan (``plan``)."""
    import json

    p = manifest_path(runs_root, scale, spec.id)
    if p.is_file():
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            m = None
        if m and [r["label"] for r in m["rows"]] == [r.label for r in spec.rows]:
            return m
    return manifest(plan, runs_root, scale) if plan is not None else None


class RowView:
    """One row of a table at one scale: the spec row, its status and its finished stage results by kind."""

    def __init__(self, row: Any, entry: Mapping[str, Any], results: Mapping[str, Any]):
        self.row = row
        self.status = entry["status"]
        self.reason = entry.get("reason", "")
        self.dirs: dict[str, str] = dict(entry.get("stages", {}))
        found = {k: results.get(d) for k, d in self.dirs.items()}
        # A result made by code whose results-version has changed since is not shown (the numbers would mix code
        # versions); ``stale`` names it, and the table says how to recompute it.
        self.stale = {k: d for k, d in self.dirs.items() if found[k] is not None and not current_code(found[k])}
        self.results = {k: None if k in self.stale else r for k, r in found.items()}

    def result(self, kind: str) -> dict[str, Any] | None:
        return self.results.get(kind)


def current_code(result: Mapping[str, Any]) -> bool:
    """Whether ``result`` was made by the code's current results-versions (a result from before they were recorded
    counts as version 1 everywhere)."""
    from repro.pipeline.stage import changed_code, results_version

    made = (result.get("provenance") or {}).get("results_version") or {}
    cfg = result.get("config") or {}
    return changed_code(made) == changed_code(results_version(str(result.get("kind", "")), cfg))


def row_views(spec: Any, m: Mapping[str, Any], results: Mapping[str, Any]) -> list[RowView]:
    return [RowView(row, entry, results) for row, entry in zip(spec.rows, m["rows"])]


def knn_curve(result: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(epoch, kNN top-1) points recorded during pretraining."""
    hist = result.get("accounting", {}).get("history", [])
    return [(int(h["epoch"]), float(h["knn_top1_k20"])) for h in hist if "knn_top1_k20" in h]


def measure(measure: str, result: Mapping[str, Any] | None) -> float | None:
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


def row_values(spec: Any, rv: RowView) -> dict[str, float | None]:
    """Column id -> our value for one row (derived columns are filled by ``table_frame``)."""
    from repro.spec.schema import MEASURES

    out: dict[str, float | None] = {}
    for c in spec.columns:
        if not c.measure or c.measure == "derived.speedup":
            continue
        out[c.id] = measure(c.measure, rv.result(MEASURES[c.measure][0]))
    return out


def row_hours(rv: RowView) -> float | None:
    """Device-hours of every stage the row needs (shared stages count in each row that uses them)."""
    rs = list(rv.results.values())
    if not rs or any(r is None for r in rs):
        return None
    return sum(r["accounting"]["device_hours"] for r in rs if r is not None)


def _paper_cell(cell: Any) -> str:
    if cell is None or (cell.value is None and not cell.flag):
        return ""
    if cell.value is None:
        return "? (flagged)"
    v = cell.value
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return ("~" if cell.approx else "") + text + (" (?)" if cell.flag else "")


def _num(v: float | list[float] | None, digits: int = 2) -> str:
    if isinstance(v, list):  # a per-layer curve: its ends here, the whole curve in the plot
        return f"{len(v)} layers: {_num(v[0], digits)} .. {_num(v[-1], digits)} (plot)" if v else ""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _diff(a: Any, b: Any) -> float | None:
    """a - b when both are numbers (not curves, not blanks)."""
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return float(a) - float(b) if ok else None


def references(spec: Any, views: list[RowView]) -> dict[str, str | None]:
    """Row label -> the row it is compared with at tiny scale: the spec's ``reference_row`` if it names one, else
    the first trainable row with the same descriptive text (the same backbone in a table of ViT-B and Swin-B rows)."""
    if spec.reference_row:
        return {rv.row.label: spec.reference_row for rv in views}
    text = [c.id for c in spec.columns if c.type == "text" and not c.measure]
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str | None] = {}
    for rv in views:
        group = tuple(rv.row.value(c) for c in text)
        if rv.status == "trainable":
            first.setdefault(group, rv.row.label)
        out[rv.row.label] = first.get(group)
    return out


def reference_label(spec: Any, views: list[RowView]) -> str | None:
    """The table's main reference row (the first group's), for headings."""
    refs = [r for r in references(spec, views).values() if r]
    return refs[0] if refs else None


def table_frame(spec: Any, views: list[RowView], scale: str) -> pd.DataFrame:
    """One row per spec row: descriptive columns as printed, and per measured column the paper's value, ours and the
    difference (at paper scale: ours - paper; at tiny: this row - its reference row, ours beside the paper's, since
    only directions carry over)."""
    ours = {rv.row.label: row_values(spec, rv) for rv in views}
    refs = references(spec, views)
    for c in spec.columns:  # derived speed-ups: reference row's / this row's value of the referenced column (time)
        if c.measure != "derived.speedup":
            continue
        base_label = spec.reference_row
        for rv in views:
            if spec.reference_row is None and rv.row.value(c.id) == 1:
                base_label = rv.row.label  # the paper's own 1.0x row heads its group (e.g. BEiT per resolution)
            base = ours.get(base_label, {}).get(c.reference or "") if base_label else None
            v = ours[rv.row.label].get(c.reference or "")
            ours[rv.row.label][c.id] = base / v if isinstance(base, float) and isinstance(v, float) and v else None
    records = []
    for rp in views:
        row = rp.row
        ref = refs.get(row.label)
        rec: dict[str, Any] = {"row": row.label}
        for c in spec.columns:
            rec[f"{c.title}" if not c.measure else f"{c.title} (paper)"] = _paper_cell(row.cells.get(c.id))
            if not c.measure:
                continue
            v = ours[row.label].get(c.id)
            if rp.status != "trainable":
                rec[f"{c.title} (ours)"] = rp.status
            else:
                rec[f"{c.title} (ours)"] = _num(v) if v is not None else "not run"
            if scale == "paper":
                rec[f"{c.title} (ours - paper)"] = _num(_diff(v, row.value(c.id)))
            elif ref is None or rp.status != "trainable":
                rec[f"{c.title} - ref (paper)"] = rec[f"{c.title} - ref (ours)"] = ""
            elif ref == row.label:
                rec[f"{c.title} - ref (paper)"] = rec[f"{c.title} - ref (ours)"] = "ref"
            else:
                rec[f"{c.title} - ref (paper)"] = _num(_diff(row.value(c.id), spec.row(ref).value(c.id)))
                rec[f"{c.title} - ref (ours)"] = _num(_diff(v, ours.get(ref, {}).get(c.id)))
        if scale != "paper":
            rec["reference row"] = ref if rp.status == "trainable" and ref != row.label else ""
        rec["scale"] = scale if rp.status == "trainable" else ""
        h = row_hours(rp) if rp.status == "trainable" else None
        rec["device-h (ours)"] = _num(h, 4) if h is not None else ""
        subs = sorted({s for r in rp.results.values() if r for s in r.get("substitutes", [])})
        rec["note"] = rp.reason if rp.status != "trainable" else "; ".join(
            [*(f"SUBSTITUTE: {s}" for s in subs), *([row.note] if row.note else [])])
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
        return "".join(special.get(ch, ch) for ch in str(s))

    cols = list(df.columns)
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(caption)}}}", f"\\label{{tab:{label}}}",
             "\\begin{tabular}{" + "l" * len(cols) + "}", "\\hline",
             " & ".join(tex(c) for c in cols) + " \\\\", "\\hline"]
    lines += [" & ".join(tex(r[c]) for c in cols) + " \\\\" for _, r in df.iterrows()]
    lines += ["\\hline", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def table_markdown(spec: Any, frames: Mapping[str, pd.DataFrame], refs: Mapping[str, str | None],
                   overrides: Mapping[str, list[str]], stale: Mapping[str, int] | None = None) -> str:
    lines = [f"# {spec.id}: {spec.caption}", "", f"Paper values from {spec.source}. Generated by `repro report`; "
             "do not edit.", ""]
    for scale, n in (stale or {}).items():
        if n:
            lines += [f"**{n} {scale}-scale result(s) of this table were made by older code (a results-version has "
                      f"changed since) and are left out**: `repro run {spec.id} --scale {scale}` recomputes them.", ""]
    for scale, df in frames.items():
        lines += [f"## Ours at {scale} scale", "", f"> {SCALE_NOTE.get(scale, scale)}", ""]
        if overrides.get(scale):
            lines += [f"Run with overrides: `{' '.join(overrides[scale])}`.", ""]
        if refs.get(scale) and scale != "paper":
            lines += ["`- ref` columns: this row minus its reference row (`reference row`; the first row of its group, "
                      f"e.g. **{refs[scale]}**), the paper's difference beside ours.", ""]
        lines += [to_markdown(df), ""]
    if not frames:
        lines += ["_No stage of this table has finished yet: `repro run " + spec.id + "`._", ""]
    flagged = [(r.label, cid, c.flag) for r in spec.rows for cid, c in r.cells.items() if c.flag]
    if flagged or spec.notes:
        lines += ["Notes:", ""]
        lines += [f"- {n}" for n in spec.notes]
        lines += [f"- {label} / {cid}: flagged: {why}" for label, cid, why in flagged]
        lines.append("")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------------------


def _xy(spec: Any, views: list[RowView], which: str) -> dict[str, list[tuple[float, float]]]:
    """Series -> sorted (x, y) points, from the paper's values (every spec row) or from ours (``views``)."""
    plot = spec.plot or {}
    xcol, ycol = plot.get("x", "x"), plot["y"]
    out: dict[str, list[tuple[float, float]]] = {}
    for item in (views if which == "ours" else spec.rows):
        row = item.row if which == "ours" else item
        vals = row_values(spec, item) if which == "ours" else {}

        def val(col: str, row: Any = row, vals: dict[str, Any] = vals) -> float | None:
            if col == "x":
                return row.x
            column = spec.column(col)
            if which == "ours" and column.measure:
                return vals.get(col)
            v = row.value(col)
            return float(v) if isinstance(v, (int, float)) else None

        y = val(ycol)
        if isinstance(y, list):  # a per-layer curve (analysis measures): x = layer (1-based)
            out.setdefault(row.series or row.label, []).extend((i + 1.0, float(v)) for i, v in enumerate(y))
            continue
        x = val(xcol)
        if x is None or y is None:
            continue
        out.setdefault(row.series or spec.id, []).append((float(x), float(y)))
    return {k: sorted(v) for k, v in sorted(out.items())}


def render_plot(spec: Any, views: list[RowView], scale: str, path: Path) -> Path | None:
    """Figures: the paper's points (left) and ours at ``scale`` (right), one line per series; kNN-curve tables: our
    kNN-vs-epoch curves. Returns the path, or None when there is nothing to draw."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = any(c.measure == "pretrain.knn_curve" for c in spec.columns)
    if spec.plot is None and not curves:
        return None
    plt.rcParams.update({"svg.hashsalt": "repro", "font.size": 9})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    plot = spec.plot or {}
    xlabel = plot.get("xlabel") or ("epoch" if curves else plot.get("x", "x"))
    ylabel = plot.get("ylabel") or (spec.column(plot["y"]).title if plot.get("y") else "kNN top-1 (%)")
    drawn = 0
    if spec.plot is not None:
        for ax, which in zip(axes, ("paper", "ours")):
            for series, pts in _xy(spec, views, which).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=series,
                        linestyle="--" if which == "paper" else "-")
                drawn += which == "ours"
    if curves:
        ax = axes[1]
        for rp in views:
            r = rp.result("pretrain")
            pts = knn_curve(r) if r else []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=rp.row.label)
                drawn += 1
    axes[0].set_title("paper")
    axes[1].set_title(f"ours, {scale} scale" + (" (not comparable with the paper)" if scale == "tiny" else ""))
    fig.text(0.01, 0.01, f"paper values: {spec.source}", fontsize=7, color="gray")
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if plot.get("logx"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "the paper gives these values only as a plot:\nsee its figure" if ax is axes[0]
                    else "not run yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    import textwrap

    fig.suptitle(textwrap.fill(f"{spec.id}: {spec.caption}", 110), fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- everything ----------------------------------------------------------------------------------------------------


def scales_present(results: Mapping[str, Any]) -> list[str]:
    return [s for s in ("paper", "tiny") if any(r.get("scale") == s for r in results.values())]


def render_all(runs_root: Path, repo_root: Path, ids: Iterable[str] = ("all",)) -> list[Path]:
    """Write every table (md, csv, tex) and plot; returns the written paths."""
    from repro.spec import select

    results = load_results(runs_root)
    scales = scales_present(results)
    written: list[Path] = []
    fresh: dict[str, dict[str, TablePlan]] = {}
    for spec in select(list(ids)):
        frames: dict[str, pd.DataFrame] = {}
        refs: dict[str, str | None] = {}
        overrides: dict[str, list[str]] = {}
        views_at: dict[str, list[RowView]] = {}
        stale: dict[str, int] = {}
        for scale in scales:
            m = read_manifest(runs_root, scale, spec, None)
            if m is None:  # no run wrote this table: plan it with the default recipes to find its stages
                if scale not in fresh:
                    fresh[scale] = {tp.spec.id: tp for tp in plan_tables(list(ids), scale)}
                m = manifest(fresh[scale][spec.id], runs_root, scale)
            views = row_views(spec, m, results)
            stale[scale] = sum(len(rv.stale) for rv in views)
            if not any(r is not None for rv in views for r in rv.results.values()):
                continue
            views_at[scale] = views
            frames[scale] = table_frame(spec, views, scale)
            refs[scale] = reference_label(spec, views)
            overrides[scale] = list(m.get("overrides") or [])
        paper, short = spec.id.split("/", 1)
        base = repo_root / "tables" / paper / short
        written.append(atomic_write_text(base.with_suffix(".md"), table_markdown(spec, frames, refs, overrides, stale)))
        if frames:
            full = pd.concat(list(frames.values()), ignore_index=True)
            written.append(atomic_write_text(base.with_suffix(".csv"), full.to_csv(index=False)))
            written.append(atomic_write_text(base.with_suffix(".tex"),
                                             _latex(full, f"{spec.id}: {spec.caption}", spec.id.replace("/", ":"))))
        scale = "paper" if "paper" in views_at else next(iter(views_at), "tiny")
        png = render_plot(spec, views_at.get(scale, []), scale, repo_root / "plots" / paper / f"{short}.png")
        if png is not None:
            written.append(png)
    return written
