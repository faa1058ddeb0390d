"""Consistency of the specs with what they resolve to (``repro tables --check``).

Two classes of spec bug that no single row shows:

- two rows print DIFFERENT paper values for the same measure (and unit) but resolve to the SAME stage: one of them
  runs an experiment other than the one the paper ran (unless a row says why with ``same_stage_ok: reason``);
- a row's paper-level override (``overrides`` or ``eval_overrides``) changes nothing in the resolved stage: the row
  believes it runs a variant that it does not (e.g. an inherited key the planner used to put back).

Both are judged at paper scale, where the specs' numbers live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from repro.config import ConfigError
from repro.spec.schema import MEASURES, Row, TableSpec

Entry = tuple[str, str]  # (kind of finding, one line)


def _numbers(spec: TableSpec, row: Row) -> Iterable[tuple[str, str, float]]:
    """(measure, unit, value) of each printed number of ``row`` in a measured, non-derived column."""
    for col in spec.columns:
        v = row.value(col.id)
        if col.measure and not col.measure.startswith("derived.") and isinstance(v, (int, float)):
            yield col.measure, col.unit or "", float(v)


def same_stage_conflicts(plans: Iterable[Any]) -> list[Entry]:
    """Pairs of rows that print different values for one (measure, unit) but whose producing stage is the same."""
    seen: dict[tuple[str, str, str], list[tuple[str, Row, float]]] = {}
    for tp in plans:
        for rp in tp.rows:
            if rp.status != "trainable":
                continue
            for measure, unit, value in _numbers(tp.spec, rp.row):
                stage = rp.stage_for(MEASURES[measure][0])
                if stage is not None:
                    seen.setdefault((measure, unit, stage.key), []).append((tp.spec.id, rp.row, value))
    out: list[Entry] = []
    for (measure, _, key), rows in seen.items():
        for i, (ta, ra, va) in enumerate(rows):
            for tb, rb, vb in rows[i + 1:]:
                if va != vb and not (ra.same_stage_ok or rb.same_stage_ok):
                    out.append(("same-stage", f"{ta} '{ra.label}' ({va:g}) and {tb} '{rb.label}' ({vb:g}) print "
                                              f"different {measure} but share stage {key[:10]}"))
    return out


def _drop(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def no_effect_overrides(spec: TableSpec, row: Row, scale: str = "paper") -> list[Entry]:
    """Keys of ``row``'s overrides whose removal leaves the stage they are meant for unchanged."""
    from repro.pipeline.plan import row_plan

    base = row_plan(spec, row, scale)
    if base.status != "trainable":
        return []
    out: list[Entry] = []

    def same(changed: Row, kind: str) -> bool:
        try:
            other = row_plan(spec, changed, scale)
        except ConfigError:
            return False  # the row needs the key (without it the configuration is invalid)
        a, b = base.stage_for(kind), other.stage_for(kind)
        return a is not None and b is not None and a.key == b.key

    for key in row.overrides:
        if same(dataclasses.replace(row, overrides=_drop(row.overrides, key)), "pretrain"):
            out.append(("no-effect", f"{spec.id} '{row.label}': overrides.{key} changes nothing"))
    for kind, ov in row.eval_overrides.items():
        for key in ov:
            if same(dataclasses.replace(row, eval_overrides={**row.eval_overrides, kind: _drop(ov, key)}), kind):
                out.append(("no-effect", f"{spec.id} '{row.label}': eval_overrides.{kind}.{key} changes nothing"))
    return out


def check(ids: Iterable[str] = ("all",), scale: str = "paper") -> list[Entry]:
    """Every finding for the tables ``ids`` (empty: consistent)."""
    from repro.pipeline.plan import plan_tables

    plans = plan_tables(list(ids), scale)
    out = same_stage_conflicts(plans)
    for tp in plans:
        for rp in tp.rows:
            if rp.status == "trainable":
                out.extend(no_effect_overrides(tp.spec, rp.row, scale))
    return out
