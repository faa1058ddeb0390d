"""The papers' headline claims and the suite's tiny-scale signal bars, as data (``repro/spec/claims.yaml``), loaded
and validated against the table specs. Torch-free: the planner reads which rows carry a claim (they get several
seeds at tiny scale); ``repro.report.claims`` checks them against what was recorded.

Schema of ``claims.yaml``::

    claims:                       # one entry per headline claim of a paper
      - id: lomar-accuracy        # unique
        paper: lomar              # lomar | localmim | extrema; the table's paper
        text: ...                 # the claim, in the paper's words or close
        table: lomar/t2           # a spec table id
        rows: [MAE, LoMaR]        # row labels: each row after the first is compared with the first
        measure: top1             # a measured column id of the table
        paper_direction: not lower   # of (row - first row): higher | lower | not lower | not higher | similar
        tiny_note: ...            # optional: what limits the claim at tiny scale, with the measured numbers
    signal:                       # the tiny-scale bars: is there anything to measure at all?
      - id: scratch-finetune
        text: ...
        table: lomar/t2
        rows: [No Pretraining]    # one row: compared with chance (100 / classes); two: the second against the first
        measure: top1
        aim: {at_least: 60}       # optional, the bar to meet: at_least V (the row's mean), std_above K (the
                                  # difference > K x the seed std), not_worse: true (not resolved below the first row)
        if_missed: ...            # optional: why the aim is missed, with the measured numbers (printed when missed)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from repro.config import ConfigError
from repro.spec.load import load_specs, spec_root

DIRECTIONS = ("higher", "lower", "not lower", "not higher", "similar")
CLAIM_KEYS = ("id", "paper", "text", "table", "rows", "measure", "paper_direction")
SIGNAL_KEYS = ("id", "text", "table", "rows", "measure")
SIGNAL_OPTIONAL = ("aim", "if_missed")
CLAIM_OPTIONAL = ("tiny_note",)
AIMS = ("at_least", "std_above", "not_worse")
CLAIMS_FILE = "claims.yaml"


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    table: str
    rows: tuple[str, ...]
    measure: str
    paper: str = ""
    paper_direction: str = ""
    aim: tuple[str, float] | None = None  # signal bars: (one of AIMS, its value)
    if_missed: str = ""
    tiny_note: str = ""  # claims: what limits the claim at tiny scale (printed under the claims table)


def claims_path() -> Path:
    return spec_root() / CLAIMS_FILE


def _aim(raw: Any, where: str) -> tuple[str, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in AIMS:
        raise ConfigError(f"{where}: 'aim' must be one of {{at_least: V}}, {{std_above: K}}, {{not_worse: true}}")
    (kind, value), = raw.items()
    if isinstance(value, bool) != (kind == "not_worse") or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: aim {kind} needs {'true' if kind == 'not_worse' else 'a number'}")
    return str(kind), float(value)


def _entry(raw: Any, keys: tuple[str, ...], where: str, specs: Mapping[str, Any], signal: bool) -> Claim:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    bad = [k for k in raw if k not in keys + (SIGNAL_OPTIONAL if signal else CLAIM_OPTIONAL)]
    missing = [k for k in keys if raw.get(k) in (None, "", [])]
    if bad:
        raise ConfigError(f"{where}: unknown key '{bad[0]}'; valid keys: {', '.join(keys)}")
    if missing:
        raise ConfigError(f"{where}: '{missing[0]}' is required")
    where = f"{where} '{raw['id']}'"
    if raw["table"] not in specs:
        raise ConfigError(f"{where}: unknown table '{raw['table']}'")
    spec = specs[raw["table"]]
    rows = raw["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ConfigError(f"{where}: 'rows' must be a list of row labels")
    if not (1 if signal else 2) <= len(rows) <= (2 if signal else 99):
        raise ConfigError(f"{where}: 'rows' needs {'one or two rows' if signal else 'two rows or more'}")
    labels = [r.label for r in spec.rows]
    for r in rows:
        if r not in labels:
            raise ConfigError(f"{where}: table {spec.id} has no row '{r}'")
    cols = {c.id: c for c in spec.columns if c.measure}
    if raw["measure"] not in cols:
        raise ConfigError(f"{where}: '{raw['measure']}' is not a measured column of {spec.id}; "
                          f"measured columns: {', '.join(cols)}")
    if not signal:
        if raw["paper"] != spec.paper:
            raise ConfigError(f"{where}: paper '{raw['paper']}' but table {spec.id} is {spec.paper}'s")
        if raw["paper_direction"] not in DIRECTIONS:
            raise ConfigError(f"{where}: paper_direction must be one of {', '.join(DIRECTIONS)}")
    return Claim(id=str(raw["id"]), text=str(raw["text"]), table=spec.id, rows=tuple(rows),
                 measure=str(raw["measure"]), paper=str(raw.get("paper", "")),
                 paper_direction=str(raw.get("paper_direction", "")), aim=_aim(raw.get("aim"), where),
                 if_missed=" ".join(str(raw.get("if_missed") or "").split()),
                 tiny_note=" ".join(str(raw.get("tiny_note") or "").split()))


def parse(data: Any, where: str = CLAIMS_FILE) -> tuple[list[Claim], list[Claim]]:
    """(claims, signal bars) of a parsed claims file, validated against the table specs."""
    if not isinstance(data, dict) or set(data) - {"claims", "signal"}:
        raise ConfigError(f"{where}: expected a mapping with 'claims' and 'signal' lists")
    specs = load_specs()
    out: tuple[list[Claim], list[Claim]] = ([], [])
    for i, (key, keys) in enumerate((("claims", CLAIM_KEYS), ("signal", SIGNAL_KEYS))):
        entries = data.get(key) or []
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: '{key}' must be a list")
        for raw in entries:
            c = _entry(raw, keys, f"{where} {key}", specs, signal=i == 1)
            if any(o.id == c.id for o in out[i]):
                raise ConfigError(f"{where}: duplicate {key} id '{c.id}'")
            out[i].append(c)
    return out


@lru_cache(maxsize=1)
def load() -> tuple[tuple[Claim, ...], tuple[Claim, ...]]:
    """The claims and signal bars of ``repro/spec/claims.yaml`` (cached)."""
    path = claims_path()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML: {str(e).splitlines()[0]}") from None
    claims, signal = parse(data, path.name)
    return tuple(claims), tuple(signal)


def claim_rows() -> set[tuple[str, str]]:
    """(table id, row label) of every row a claim or a signal bar rests on."""
    claims, signal = load()
    return {(c.table, r) for c in (*claims, *signal) for r in c.rows}
