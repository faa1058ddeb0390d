"""Collect finished stages into a table and render RESULTS.md (generated; never edit it by hand)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from repro.io import atomic_write_json, atomic_write_text
from repro.pipeline.stage import RESULT

RUN_HISTORY = "run-history.json"

METRIC_COLUMNS = {
    "finetune": [("top1", "fine-tune top-1")],
    "linear": [("linear_top1", "linear top-1")],
    "knn": [("knn_top1_k20", "kNN top-1 (k=20)"), ("knn_top1_k200", "kNN top-1 (k=200)")],
}


def collect(runs_root: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(Path(runs_root).glob(f"*/*/*/{RESULT}")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("status") == "done":
            r["_dir"] = str(p.parent)
            out.append(r)
    return out


def chain_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (scale, pretraining or random init, evaluation recipe set): the evaluation metrics side by side."""
    by_dir = {r["_dir"]: r for r in results}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r["kind"] not in METRIC_COLUMNS:
            continue
        init_dir = r.get("inputs", {}).get("init")
        pre = by_dir.get(init_dir) if init_dir else None
        cfg = r["config"]
        if pre is not None:
            m = pre["config"]["method"]
            who = f"{m['name']} ({pre['config']['optim']['epochs']} ep)"
            pre_h = pre["accounting"]["device_hours"]
        else:
            who, pre_h = "random init", 0.0
        arch = f"{cfg['model']['arch']}/{cfg['model']['patch_size']} @{cfg['data']['img_size']}"
        key = (r["scale"], who, arch, cfg["data"]["dataset"])
        row = rows.setdefault(key, {"scale": r["scale"], "pretraining": who, "encoder": arch,
                                    "data": cfg["data"]["dataset"], "pretrain device-h": pre_h,
                                    "eval device-h": 0.0, "commit": (r["provenance"].get("commit") or "?")[:8]})
        for metric, col in METRIC_COLUMNS[r["kind"]]:
            if metric in r["metrics"]:
                row[col] = r["metrics"][metric]
        row["eval device-h"] += r["accounting"]["device_hours"]
    df = pd.DataFrame(list(rows.values()))
    if not df.empty:
        df = df.sort_values(["scale", "data", "encoder", "pretraining"], ignore_index=True)
    return df


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no finished stages yet_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append("" if pd.isna(v) else (f"{v:.2f}" if "top-1" in c else f"{v:.4f}"))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pretraining_effect(df: pd.DataFrame) -> list[str]:
    """Plain statements comparing each pretrained encoder with random init under the same evaluation budget."""
    out = []
    if df.empty:
        return out
    for (scale, data, enc), g in df.groupby(["scale", "data", "encoder"]):
        base = g[g["pretraining"] == "random init"]
        if base.empty:
            continue
        for _, row in g[g["pretraining"] != "random init"].iterrows():
            parts = []
            for col in [c for cols in METRIC_COLUMNS.values() for _, c in cols]:
                if col in row and col in base and not pd.isna(row[col]) and not pd.isna(base[col].iloc[0]):
                    d = row[col] - base[col].iloc[0]
                    parts.append(f"{col} {row[col]:.1f} vs {base[col].iloc[0]:.1f} ({d:+.1f})")
            if parts:
                out.append(f"- {scale}, {data}, {enc}: {row['pretraining']} vs random init: " + "; ".join(parts))
    return out


def run_history(runs_root: Path) -> list[dict[str, Any]]:
    p = Path(runs_root) / RUN_HISTORY
    if not p.is_file():
        return []
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return []


def record_run(runs_root: Path, entry: dict[str, Any]) -> None:
    """Append one `repro run` invocation (tables, scale, wall time, stage counts) to the runs folder's history."""
    hist = run_history(runs_root)[-49:]
    atomic_write_json(Path(runs_root) / RUN_HISTORY, [*hist, entry])


def _tables_section(runs_root: Path, repo_root: Path) -> list[str]:
    """Render tables/ and plots/ and return RESULTS.md's section embedding every table and plot."""
    from repro.report.tables import render_all
    from repro.spec import load_specs

    written = set(render_all(runs_root, repo_root))
    lines = ["## Paper tables", ""]
    for spec in load_specs().values():
        short = spec.id.split("/", 1)[1]
        md = repo_root / "tables" / spec.paper / f"{short}.md"
        png = repo_root / "plots" / spec.paper / f"{short}.png"
        body = md.read_text().split("\n", 1)[1].strip() if md in written else ""
        lines += [f"### {spec.id}: {spec.caption}", "", body, "",
                  f"File: [`tables/{spec.paper}/{short}.md`](tables/{spec.paper}/{short}.md)", ""]
        if png in written:
            lines += [f"![{spec.id}](plots/{spec.paper}/{short}.png)", ""]
    return lines


def write_results_md(runs_root: Path, out: Path, repo_root: Path | None = None) -> Path:
    repo_root = Path(repo_root) if repo_root is not None else Path(out).parent
    results = collect(runs_root)
    df = chain_table(results)
    commits = sorted({(r["provenance"].get("commit") or "?")[:8] + ("+dirty" if r["provenance"].get("dirty") else "")
                      for r in results})
    devices = sorted({f"{r['accounting'].get('device', '?')} ({r['provenance'].get('device_name', '?')})"
                      for r in results})
    scales = sorted({r["scale"] for r in results})
    finished = [r.get("finished") for r in results if r.get("finished")]
    dates = (f"{time.strftime('%Y-%m-%d', time.gmtime(min(finished)))} to "
             f"{time.strftime('%Y-%m-%d', time.gmtime(max(finished)))} (UTC)") if finished else "-"
    total_h = sum(r["accounting"].get("device_hours", 0.0) for r in results)
    on_slurm = [r["accounting"] for r in results if "device_hours_sacct" in r["accounting"]]
    units = "/".join(sorted({a.get("device_hours_sacct_unit", "device-hours") for a in on_slurm}))
    sacct_note = (f"; for the {len(on_slurm)} stages run on Slurm the scheduler (sacct: elapsed x allocated GPUs, or "
                  f"CPUs without GPUs) charged {sum(a['device_hours_sacct'] for a in on_slurm):.3f} {units}"
                  if on_slurm else "")
    lines = [
        "# RESULTS",
        "",
        "Generated by `repro report` from the result files under the runs folder; do not edit by hand.",
        "",
        f"- scales present: {', '.join(scales) or '-'}"
        + (" — **tiny-scale numbers come from micro models on the embedded procedural data; they are NOT comparable "
           "to the papers' ImageNet numbers**" if "tiny" in scales else ""),
        f"- code: {', '.join(commits) or '-'}",
        f"- hardware: {', '.join(devices) or '-'}",
        f"- stages finished: {len(results)}, {total_h:.3f} device-hours in all (engine-measured: training wall x "
        f"processes){sacct_note}; results dated {dates}",
        "",
    ]
    hist = [h for h in run_history(runs_root) if h.get("tables") == ["all"]]
    if hist:
        h = hist[-1]
        lines += ["## The main job", "",
                  f"`repro run all --scale {h['scale']}`: {h['wall_s'] / 60:.1f} min wall on {h['host']} "
                  f"({h['cpus']} CPUs), {h['ran']} stages run, {h['skipped']} already done, {h['failed']} failed "
                  f"(commit {h['commit'][:8]}).", ""]
    lines += _tables_section(runs_root, repo_root)
    try:
        from repro.profile.report import efficiency_section
    except ImportError:
        efficiency_section = None
    if efficiency_section is not None:
        lines += [efficiency_section(repo_root).rstrip(), ""]
    lines += [
        "## Pretrain -> evaluate chains",
        "",
        _md(df),
        "## Does pretraining help? (same evaluation budget, random initialisation as the baseline)",
        "",
        *(pretraining_effect(df) or ["_no baseline rows yet: run `repro chain RECIPE --baseline random`_"]),
        "",
    ]
    notes = Path(__file__).with_name("notes.md")
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    atomic_write_text(out, "\n".join(lines))
    return out
