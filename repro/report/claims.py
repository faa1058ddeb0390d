"""The papers' headline claims and the tiny-scale signal bars (``repro/spec/claims.yaml``), checked against what was
recorded. The claims file, its schema and loader: ``repro.spec.claims``.

A difference gets the verdict of ``repro.record.compare.verdict`` over the seeds (via ``repro.report.tables``); a cost
column (time) is compared at tiny by the tiny models' FLOPs per image (an exact count: no noise verdict needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.spec.claims import DIRECTIONS, Claim, claims_path, load, parse  # noqa: F401 - re-exported

# ---- checking ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One row of a claim against its first row: ours (with the verdict) and the paper's numbers."""

    base: str
    head: str
    ours: str  # e.g. "+1.2 (within noise, ±2.3)", "not run"
    direction: str  # higher / lower / within noise / no verdict / not run / equal
    paper: str  # the paper's difference, "" when it prints no number


def _views(runs_root: Path, scale: str, table: str, results: Mapping[str, Any], cache: dict[str, Any]) -> Any:
    from repro.report.tables import table_views
    from repro.spec import get_spec

    if table not in cache:
        cache[table] = table_views(runs_root, scale, get_spec(table), results)
    return cache[table]


def _flops_direction(base: Any, head: Any, per_epoch: bool) -> tuple[str, str]:
    """The tiny models' pretraining FLOPs ratio (head / base) and its direction (an exact count: no noise)."""
    fb, fh = base.flops(per_epoch), head.flops(per_epoch)
    if not fb or not fh:
        return "not run", "not run"
    ratio = fh / fb
    word = "equal" if abs(ratio - 1) < 0.01 else ("higher" if ratio > 1 else "lower")
    return f"pretraining FLOPs{' per epoch' if per_epoch else ''} x{ratio:.2f} (exact count)", word


def compare_rows(claim: Claim, runs_root: Path, scale: str, results: Mapping[str, Any],
                 cache: dict[str, Any]) -> list[Comparison]:
    """Each row of ``claim`` after the first against the first, at ``scale``."""
    from repro.report.tables import COST_MEASURES, NO_VERDICT, RESOLVED, compare_values, diff_cell, digits_for
    from repro.spec import get_spec

    spec = get_spec(claim.table)
    col = spec.column(claim.measure)
    views = _views(runs_root, scale, claim.table, results, cache)
    by_label = {rv.row.label: rv for rv in views or []}
    out = []
    base = claim.rows[0]
    for head in claim.rows[1:]:
        pb, ph = spec.row(base).value(col.id), spec.row(head).value(col.id)
        paper = (f"{ph - pb:+g}" if isinstance(pb, (int, float)) and isinstance(ph, (int, float)) else "")
        b, h = by_label.get(base), by_label.get(head)
        if b is None or h is None:
            out.append(Comparison(base, head, "not run", "not run", paper))
            continue
        if col.measure in COST_MEASURES and scale != "paper":
            text, word = _flops_direction(b, h, col.measure == "pretrain.hours_per_epoch")
            out.append(Comparison(base, head, text, word, paper))
            continue
        d = compare_values(b.values(col), h.values(col))
        if d is None:
            out.append(Comparison(base, head, "not run", "not run", paper))
            continue
        word = ("higher" if d.diff > 0 else "lower") if d.word == RESOLVED else (
            "no verdict" if d.word == NO_VERDICT else "within noise")
        out.append(Comparison(base, head, diff_cell(d, digits_for(col)).replace("**", ""), word, paper))
    return out


def outcome(direction: str, comps: list[Comparison]) -> str:
    """Whether our directions agree with the paper's: agrees / disagrees / tiny cannot resolve / not run."""
    if not comps or all(c.direction == "not run" for c in comps):
        return "not run"
    agree = {"higher": ("higher",), "lower": ("lower",), "not lower": ("higher", "equal"),
             "not higher": ("lower", "equal"), "similar": ("equal",)}[direction]
    against = {"higher": ("lower", "equal"), "lower": ("higher", "equal"), "not lower": ("lower",),
               "not higher": ("higher",), "similar": ("higher", "lower")}[direction]
    words = [c.direction for c in comps if c.direction != "not run"]
    if any(w in against for w in words):
        return "disagrees"
    if all(w in agree for w in words) and len(words) == len(comps):
        return "agrees"
    if any(w in ("within noise", "no verdict") for w in words):
        return "tiny cannot resolve"
    return "partly run"


def claims_section(runs_root: Path, results: Mapping[str, Any], scale: str = "tiny") -> list[str]:
    """RESULTS.md's "Claims at tiny scale": per claim, the rows, our direction with its verdict, the paper's."""
    claims, _ = load()
    lines = [f"## Claims at {scale} scale", "",
             "Each headline claim of the papers (`repro/spec/claims.yaml`), checked on the rows it rests on: each row "
             "against the claim's first row, ours as mean difference with the seed-noise verdict (resolved, within "
             "noise, or n=1: no verdict), the paper's printed difference beside it. Cost claims are compared at tiny "
             "by the tiny models' FLOPs per image (exact); measured paper-scale cost: `tables/efficiency`. "
             "\"tiny cannot resolve\": the differences are within the seed noise (or one seed only): no finding.",
             "", "| claim | paper says | table | rows (vs first) | ours | paper | verdict |",
             "|---|---|---|---|---|---|---|"]
    cache: dict[str, Any] = {}
    for c in claims:
        comps = compare_rows(c, runs_root, scale, results, cache)
        ours = "; ".join(f"{x.head}: {x.ours}" for x in comps)
        paper = "; ".join(f"{x.head}: {x.paper or 'not printed'}" for x in comps)
        rows = f"{c.rows[0]} vs " + ", ".join(c.rows[1:])
        cells = [f"{c.id}: {c.text}", c.paper_direction, f"[{c.table}](tables/{c.table}.md)", rows, ours, paper,
                 f"**{outcome(c.paper_direction, comps)}**"]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    notes = [f"- {c.id}: {c.tiny_note}" for c in claims if c.tiny_note]
    return [*lines, *(["", "What limits some claims at this scale (measured):", "", *notes] if notes else []), ""]


def signal_lines(runs_root: Path, results: Mapping[str, Any], scale: str = "tiny") -> list[str]:
    """The table-row signal bars: a row against chance, or a row against another, with verdicts."""
    from repro.record.compare import summarize
    from repro.report.tables import compare_values, mean_cell, numbers
    from repro.spec import MEASURES, get_spec

    _, bars = load()
    cache: dict[str, Any] = {}
    out = []
    for bar in bars:
        spec = get_spec(bar.table)
        col = spec.column(bar.measure)
        views = _views(runs_root, scale, bar.table, results, cache)
        by_label = {rv.row.label: rv for rv in views or []}
        rvs = [by_label.get(r) for r in bar.rows]
        vals = [numbers(rv.values(col)) if rv is not None else [] for rv in rvs]
        where = f"[{bar.table}](tables/{bar.table}.md) " + " vs ".join(f"'{r}'" for r in reversed(bar.rows))
        if not all(vals):
            out.append(f"- {bar.text} ({where}): not run")
            continue
        if len(rvs) == 1:
            levels = sorted(rvs[0].classes([MEASURES[col.measure][0]])) if rvs[0] is not None else []
            if not levels:
                out.append(f"- {bar.text} ({where}): {mean_cell(vals[0], 1)}; chance level unknown")
                continue
            level = 100.0 / levels[0]
            d = compare_values([level, level], vals[0])  # chance: a constant side without spread
            std = summarize(vals[0]).std
            out.append(f"- {bar.text} ({where}): {mean_cell(vals[0], 1)} vs chance {level:.1f}% "
                       f"({levels[0]} classes): {_in_std(d, std)}{aim_text(bar, vals[0], d)}")
        else:
            d = compare_values(vals[0], vals[1])
            out.append(f"- {bar.text} ({where}): {mean_cell(vals[1], 1)} vs {mean_cell(vals[0], 1)}: {_in_std(d)}"
                       f"{aim_text(bar, vals[1], d)}")
    return out


def aim_met(aim: tuple[str, float], head: list[float], d: Any) -> bool | None:
    """Whether a bar's aim is met by the row's values ``head`` and the difference ``d`` (None: cannot tell)."""
    from repro.report.tables import RESOLVED

    kind, value = aim
    if kind == "at_least":
        return sum(head) / len(head) >= value
    if d is None:
        return None
    if kind == "std_above":
        return d.pooled_std is not None and d.diff > value * d.pooled_std
    return d.diff >= 0 or d.word != RESOLVED  # not_worse: not resolved below


def aim_text(bar: Claim, head: list[float], d: Any) -> str:
    """``; aim (>= 60): **met**`` or ``...: **missed**: <why, measured>``; empty without an aim."""
    if bar.aim is None:
        return ""
    kind, value = bar.aim
    desc = {"at_least": f">= {value:g}", "std_above": f"difference > {value:g} x seed std",
            "not_worse": "not resolved below"}[kind]
    met = aim_met(bar.aim, head, d)
    if met is None:
        return f"; aim ({desc}): no verdict"
    if met:
        return f"; aim ({desc}): **met**"
    return f"; aim ({desc}): **missed**" + (f". Why: {bar.if_missed}" if bar.if_missed else "")


def _in_std(d: Any, std: float | None = None) -> str:
    """A difference, in units of the seed std (``std``, else the two sides' pooled) where there is one, with its
    verdict."""
    if d is None:
        return "not run"
    std = std if std is not None else d.pooled_std
    if std:
        return f"{d.diff:+.1f} = {d.diff / std:+.1f} seed std, {d.word} (±{d.tolerance:.1f})"
    if d.tolerance == 0.0:
        return f"{d.diff:+.1f}, seeds identical ({d.word})"
    return f"{d.diff:+.1f} ({d.word})"
