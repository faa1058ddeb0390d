"""Collect finished stages into a table and render RESULTS.md (generated; never edit it by hand)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from repro.io import atomic_write_json, atomic_write_text
from repro.record.store import finished_results

RUN_HISTORY = "run-history.json"

METRIC_COLUMNS = {
    "finetune": [("top1", "fine-tune top-1")],
    "linear": [("linear_top1", "linear top-1")],
    "knn": [("knn_top1_k20", "kNN top-1 (k=20)"), ("knn_top1_k200", "kNN top-1 (k=200)")],
}


def table_folders(runs_root: Path) -> set[str]:
    """Stage folders (``rel_folder``) that a table manifest lists: those render in their tables."""
    from repro.report.tables import rel_folder, stage_lists

    out: set[str] = set()
    for p in sorted(Path(runs_root).glob("*/tables/*/*.json")):
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in m.get("rows", []) if isinstance(m, dict) else []:
            out.update(rel_folder(d) for ds in stage_lists(entry).values() for d in ds)
    return out


def chain_results(runs_root: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of `repro chain` runs: evaluations that no table manifest lists now or listed in an earlier run
    (the store remembers those: a table stage that a code or recipe change superseded is no chain), and every
    pretraining (their inputs)."""
    from repro.record.store import tabled_folders
    from repro.report.tables import rel_folder

    in_tables = table_folders(runs_root) | tabled_folders(runs_root)
    return [r for r in results if r["kind"] == "pretrain" or rel_folder(r["_dir"]) not in in_tables]


def chain_groups(results: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(scale, pretraining or random init, encoder, data) -> per evaluation metric the values over seeds, and the
    device-hours: one entry per chain, whatever its number of seeds."""
    by_dir = {r["_dir"]: r for r in results}
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in results:
        if r["kind"] not in METRIC_COLUMNS:
            continue
        init_dir = r.get("inputs", {}).get("init")
        pre = by_dir.get(init_dir) if init_dir else None
        cfg = r["config"]
        if pre is not None:
            who = f"{pre['config']['method']['name']} ({pre['config']['optim']['epochs']} ep)"
        else:
            who = "random init"
        arch = f"{cfg['model']['arch']}/{cfg['model']['patch_size']} @{cfg['data']['img_size']}"
        key = (r["scale"], who, arch, cfg["data"]["dataset"])
        row = rows.setdefault(key, {"values": {}, "pre": {}, "eval_h": 0.0, "commits": set()})
        for metric, col in METRIC_COLUMNS[r["kind"]]:
            if isinstance(r["metrics"].get(metric), (int, float)):
                row["values"].setdefault(col, []).append(float(r["metrics"][metric]))
        if pre is not None:
            row["pre"][pre["_dir"]] = pre["accounting"]["device_hours"]
        row["eval_h"] += r["accounting"]["device_hours"]
        row["commits"].add((r["provenance"].get("commit") or "?")[:8])
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][2], kv[0][1])))


def chain_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (scale, pretraining or random init, encoder, data): the evaluation metrics side by side, each as
    mean ± std over seeds (n)."""
    from repro.report.tables import mean_cell

    records = []
    for (scale, who, arch, data), g in chain_groups(results).items():
        rec: dict[str, Any] = {"scale": scale, "pretraining": who, "encoder": arch, "data": data,
                               "pretrain device-h": f"{sum(g['pre'].values()):.4f}",
                               "eval device-h": f"{g['eval_h']:.4f}", "commit": ", ".join(sorted(g["commits"]))}
        for _, cols in METRIC_COLUMNS.items():
            for _, col in cols:
                if col in g["values"]:
                    rec[col] = mean_cell(g["values"][col], 2)
        records.append(rec)
    return pd.DataFrame.from_records(records).fillna("")


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no chain outside the paper tables has finished (`repro chain RECIPE --baseline random`)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return "\n".join(lines) + "\n"


def chain_signal(results: list[dict[str, Any]]) -> list[str]:
    """Each pretrained encoder against random init under the same evaluation (same encoder, data and recipes), per
    metric: both means over seeds and the difference in seed std with its noise verdict."""
    from repro.report.claims import _in_std
    from repro.report.tables import compare_values, mean_cell

    groups = chain_groups(results)
    out = []
    for (scale, who, arch, data), g in groups.items():
        base = groups.get((scale, "random init", arch, data))
        if who == "random init" or base is None:
            continue
        parts = [f"{col} {mean_cell(v, 1)} vs {mean_cell(base['values'][col], 1)}: "
                 f"{_in_std(compare_values(base['values'][col], v))}"
                 for col, v in g["values"].items() if col in base["values"]]
        if parts:
            out.append(f"- {scale}, {data}, {arch}: {who} vs random init: " + "; ".join(parts))
    return out


def signal_section(runs_root: Path, results: list[dict[str, Any]], chains: list[dict[str, Any]]) -> list[str]:
    """RESULTS.md's "Signal at tiny scale": can the tiny scale measure anything? The bars of claims.yaml (table
    rows against chance or against each other) and every chain's pretrained vs random-init evaluations."""
    from repro.report.claims import signal_lines
    from repro.report.tables import rel_folder

    by_rel = {rel_folder(r["_dir"]): r for r in results}
    lines = ["## Signal at tiny scale", "",
             "Whether the tiny scale measures anything: the bars of `repro/spec/claims.yaml` (from the table rows "
             "named) and each chain's pretrained encoder against random-init features with the same evaluation "
             "budget. Means over seeds (n); differences in units of the seed std, with the noise verdict "
             "(resolved: |diff| > 2 x the Welch standard error; within noise: no finding).", ""]
    lines += signal_lines(runs_root, by_rel, "tiny") or ["- no signal bar is declared"]
    chain_lines = chain_signal([r for r in chains if r["scale"] == "tiny"])
    lines += chain_lines or ["- pretrained vs random-init features (linear, kNN, fine-tuning): not run "
                             "(`repro chain mae --scale tiny --baseline random`)"]
    return [*lines, ""]


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
    """Render tables/ and plots/ and return RESULTS.md's section embedding every table and plot (the tables'
    headings one level down, under the table's own)."""
    import re

    from repro.report.tables import render_all
    from repro.spec import load_specs

    written = set(render_all(runs_root, repo_root))
    lines = ["## Paper tables", ""]
    for spec in load_specs().values():
        short = spec.id.split("/", 1)[1]
        md = repo_root / "tables" / spec.paper / f"{short}.md"
        png = repo_root / "plots" / spec.paper / f"{short}.png"
        body = md.read_text().split("\n", 1)[1].strip() if md in written else ""
        body = re.sub(r"^## ", "#### ", body, flags=re.M)
        lines += [f"### {spec.id}: {spec.caption}", "", body, "",
                  f"File: [`tables/{spec.paper}/{short}.md`](tables/{spec.paper}/{short}.md)", ""]
        if png in written:
            lines += [f"![{spec.id}](plots/{spec.paper}/{short}.png)", ""]
    return lines


def _run_line(h: Mapping[str, Any]) -> str:
    """One recorded `repro run`: what it ran, its measured wall time, and whether it was interrupted."""
    what = (f"interrupted after {h.get('wall_s', 0) / 60:.1f} min wall: {h.get('ran', '?')} stages run, "
            f"{h.get('left', '?')} of its {h.get('stages', '?')} still to run (the same command resumes)"
            if h.get("interrupted") else
            f"{h.get('wall_s', 0) / 60:.1f} min wall, measured: {h.get('ran', '?')} stages run, "
            f"{h.get('skipped', '?')} already done, {h.get('failed', '?')} failed")
    return (f"`repro run {' '.join(h.get('tables', []))} --scale {h.get('scale', '?')}`: {what} (commit "
            f"{str(h.get('commit', '?'))[:8]}, {h.get('host', '?')}, {h.get('cpus', '?')} CPUs, {h.get('jobs', '?')} "
            "jobs)")


def main_job_lines(runs_root: Path, results: list[dict[str, Any]] | None = None) -> list[str]:
    """The main job (`make reproduce`: `repro run claims`, then `repro run all`) as `repro run` recorded it: each
    invocation's measured wall time and stages (an interrupted one too), their total, and the runs recorded after
    it, so a reader sees what the numbers came from. A run that found every stage done (none run, none failed, not
    interrupted) measured nothing and is left out: `make reproduce` again on a finished folder keeps the job. Given
    the ``results`` shown, earlier runs whose commit made some of them count too: an `all` after a code change
    re-runs only the stages it changed, and the rest of the report still comes from the runs before it."""
    hist = [h for h in run_history(runs_root)
            if h.get("interrupted") or int(h.get("ran") or 0) or int(h.get("failed") or 0)]
    alls = [i for i, h in enumerate(hist) if h.get("tables") == ["all"]]
    lines = ["## The main job", ""]
    if alls:
        # The job: every run since the previous complete `all` (claims, resumed segments of `all`, tables run in
        # between: stages a later `all` finds done), up to the last `all`.
        i = alls[-1]
        first = i
        while first > 0 and not (hist[first - 1].get("tables") == ["all"] and not hist[first - 1].get("interrupted")):
            first -= 1
        made = {str((r.get("provenance") or {}).get("commit") or "")[:8] for r in results or []}
        earlier = [h for h in hist[:first] if results is not None and str(h.get("commit", ""))[:8] in made]
        job = earlier + hist[first:i + 1]
        lines.append("`make reproduce` (`repro run claims`, then `repro run all`), as `repro run` measured it "
                     "(first stage start to last stage end), every run since the last complete `repro run all`"
                     + (" and the earlier runs whose stages this report still shows" if earlier else "") + ":")
        lines.append("")
        lines += [f"- {_run_line(h)}" for h in job]
        total = sum(float(h.get("wall_s", 0)) for h in job)
        done = "incomplete: " if job[-1].get("interrupted") else ""
        lines += ["", f"Total: **{done}{total / 60:.1f} min wall** for {sum(int(h.get('ran', 0)) for h in job)} "
                      "stages run" + (f"; {job[-1].get('left')} stages of `all` are still to run" if done else "")
                  + "."]
        if results is not None and not any(str(h.get("commit", ""))[:8] in made for h in job):
            lines.append("Its stages are not in this runs folder any more (made by older code); its report is in the "
                         "repository's history (`git log -- RESULTS.md`).")
    else:
        lines.append("_No `repro run all` is recorded in this runs folder's history._")
    later = hist[alls[-1] + 1:] if alls else hist
    if later:
        lines += ["", "Runs recorded after it (only their tables' stages are rendered from them):", ""]
        lines += [f"- {_run_line(h)}" for h in later]
    return [*lines, ""]


def write_results_md(runs_root: Path, out: Path, repo_root: Path | None = None) -> Path:
    from repro.report.claims import claims_section
    from repro.report.tables import rel_folder

    repo_root = Path(repo_root) if repo_root is not None else Path(out).parent
    results = finished_results(runs_root)
    chains = chain_results(runs_root, results)
    df = chain_table(chains)
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
    lines += main_job_lines(runs_root, results)
    lines += signal_section(runs_root, results, chains)
    by_rel = {rel_folder(r["_dir"]): r for r in results}
    lines += claims_section(runs_root, by_rel, "tiny")
    lines += _tables_section(runs_root, repo_root)
    try:
        from repro.profile.report import efficiency_section
    except ImportError:
        efficiency_section = None
    if efficiency_section is not None:
        lines += [efficiency_section(repo_root).rstrip(), ""]
    lines += ["## Pretrain -> evaluate chains", "",
              "Chains run by `repro chain` (evaluations outside the paper tables); mean ± std over seeds (n).", "",
              _md(df)]
    notes = Path(__file__).with_name("notes.md")
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    atomic_write_text(out, "\n".join(lines))
    return out
