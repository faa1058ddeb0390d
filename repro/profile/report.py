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


def load_cost_table(repo_root: Path, table_id: str) -> dict[str, Any] | None:
    paper, tid = table_id.split("/", 1)
    p = Path(repo_root) / "tables" / paper / f"{tid}-cost.json"
    return json.loads(p.read_text()) if p.exists() else None


def efficiency_section(repo_root: Path) -> str:
    """Markdown: per efficiency table, each row's measured and paper speed-up against its reference row and their
    ratio, with the device, attention implementation and date of the run that measured them."""
    lines = [f"## {TITLE}", "",
             "Speed-up = reference row's pretraining time / the row's, both for the paper's schedule. Measured: one "
             "`repro profile` run per table (projected from timed training steps at the paper configuration); paper: "
             "from the paper's own time column. A CPU measures compute and memory traffic, not the papers' GPU "
             "systems, so read ratios together with the FLOPs columns of each cost table. Regenerate with "
             "`repro profile all --flops`.", ""]
    missing = []
    for table_id in EFFICIENCY_TABLES:
        data = load_cost_table(repo_root, table_id)
        if data is None:
            missing.append(table_id)
            continue
        m = data["meta"]
        paper, tid = table_id.split("/", 1)
        lines += [f"### {table_id} ([cost table](tables/{paper}/{tid}-cost.md), "
                  f"[plot](plots/{paper}/{tid}-cost.png))", "",
                  f"Measured on {m['device']}, attention: {m['attention']}, {m['precision']}, {m['date']}; "
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
    if missing:
        lines += [f"No cost table yet for: {', '.join(missing)} (run `repro profile {' '.join(missing)}`).", ""]
    return "\n".join(lines)
