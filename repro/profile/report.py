"""The "Efficiency claims: paper vs measured" section of RESULTS.md, built from the committed cost tables
(``tables/<paper>/<id>-cost.json``, written by ``repro profile``); no number here is measured or typed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repro.profile.tables import EFFICIENCY_TABLES

TITLE = "Efficiency claims: paper vs measured"


def _f(x: Any, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def load_cost_table(repo_root: Path, table_id: str, suffix: str = "") -> dict[str, Any] | None:
    """A committed cost table (``suffix``: the device part of its file name, ``tables.cost_suffix``; none = CPU)."""
    paper, tid = table_id.split("/", 1)
    p = Path(repo_root) / "tables" / paper / f"{tid}-cost{suffix}.json"
    return json.loads(p.read_text()) if p.exists() else None


def cost_table_suffixes(repo_root: Path, table_id: str) -> list[str]:
    """The device suffixes of a table's committed cost tables: the CPU's ('') first, then the others by name."""
    paper, tid = table_id.split("/", 1)
    found = [p.name[len(f"{tid}-cost"):-len(".json")] for p in (Path(repo_root) / "tables" / paper).glob(
        f"{tid}-cost*.json")]
    return sorted((x for x in found if x == "" or x.startswith(".")), key=lambda x: (x != "", x))


def efficiency_section(repo_root: Path) -> str:
    """Markdown: per efficiency table and per device it was measured on, each row's measured and paper speed-up
    against its reference row and their ratio, with the device, attention implementation and date of the run."""
    lines = [f"## {TITLE}", "",
             "Speed-up = reference row's pretraining time / the row's, both for the paper's schedule. Measured: one "
             "`repro profile` run per table and device (projected from timed training steps at the paper "
             "configuration); paper: from the paper's own time column. Each device's cost table is a separate file "
             "(`<id>-cost.md` on the project's CPU, `<id>-cost.<gpu>.md` on a GPU). A CPU measures compute and memory "
             "traffic, not the papers' GPU systems, so read its ratios together with the FLOPs columns of each cost "
             "table. Regenerate with `repro profile all --flops` (on each device); the official code beside ours on "
             "a GPU: tables/efficiency/side-by-side-*.md.", ""]
    missing = []
    for table_id in EFFICIENCY_TABLES:
        suffixes = cost_table_suffixes(repo_root, table_id)
        if not suffixes:
            missing.append(table_id)
        for suffix in suffixes:
            lines += _table_lines(repo_root, table_id, suffix)
    if missing:
        lines += [f"No cost table yet for: {', '.join(missing)} (run `repro profile {' '.join(missing)}`).", ""]
    return "\n".join(lines)


def _table_lines(repo_root: Path, table_id: str, suffix: str) -> list[str]:
    data = load_cost_table(repo_root, table_id, suffix)
    m = data["meta"]
    paper, tid = table_id.split("/", 1)
    name = f"{tid}-cost{suffix}"
    compile_ = {None: "", True: ", compiled", False: ", eager"}[m.get("compile")]
    lines = [f"### {table_id} on {m['device']} ([cost table](tables/{paper}/{name}.md), "
             f"[plot](plots/{paper}/{name}.png))", "",
             f"Measured on {m['device']}, attention: {m['attention']}, {m['precision']}{compile_}, {m['date']}; "
             f"paper unit: {m['unit']}.", "",
             "| row | vs | GFLOPs/img (fwd+bwd) | speed-up measured | speed-up paper | measured / paper | "
             "calibrated h | paper h |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("reference") in (None, "", r["row"]):
            continue
        if r.get("measured_speedup") is None and r.get("paper_speedup") is None:
            continue
        lines.append(f"| {r['row']} | {r['reference']} | {_f(r.get('gflops_per_image'), 1)} | "
                     f"{_f(r.get('measured_speedup'))} | {_f(r.get('paper_speedup'))} | "
                     f"{_f(r.get('measured_over_paper'))} | {_f(r.get('calibrated_h'), 2)} | "
                     f"{_f(r.get('paper_time'), 2)} |")
    not_measured = [r["row"] for r in data["rows"] if not str(r.get("status", "")).startswith("measured")]
    if not_measured:
        lines += ["", f"Not measured: {', '.join(not_measured)} (see the cost table for why)."]
    lines.append("")
    return lines
