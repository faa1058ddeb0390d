"""Which rows each efficiency table profiles, the paper's time for each, the reference row of every speed-up, and the
one declared calibration row per paper.

Rows and paper numbers come from the table specs (``repro.spec``), the only copy of the papers' numbers: every
trainable row with a pretraining recipe, its paper-level overrides, and the value of the table's time column (the
column whose measure is ``pretrain.hours`` or ``pretrain.hours_per_epoch``). Speed-up references are declared here
because the papers' headline claims are relative to MAE / ExtreMA x1, whereas some printed speed-up columns are
relative to BEiT; every paper ratio is recomputed from the paper's own time column, so it needs no printed ratio.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from repro.config import ConfigError

# The tables the efficiency section covers (issue: lomar/t1, t2, t5, t6-f4; localmim/t1, t4c, t5; extrema/t8, t12).
EFFICIENCY_TABLES = ("lomar/t1", "lomar/t2", "lomar/t5", "lomar/t6-f4", "localmim/t1", "localmim/t4c", "localmim/t5",
                     "extrema/t8", "extrema/t12")


@dataclass
class CostRow:
    label: str
    recipe: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None  # the paper's time (unit of the table)
    approx: bool = False
    skip: str | None = None  # why the row is not measured (reported-only, pending)


@dataclass
class CostTable:
    id: str
    paper: str
    unit: str  # e.g. "h (4xA100)"
    per_epoch: bool  # the paper's time column is per epoch (LocalMIM) rather than total
    rows: list[CostRow]
    reference: Callable[[str], str]  # row label -> label of its reference row
    source: str  # "repro.spec (<the spec's source>)"


@dataclass(frozen=True)
class Calibration:
    """The declared reference row of a paper: paper-hardware hours per measured device-hour are taken from it."""
    table: str
    label: str
    recipe: str
    overrides: dict[str, Any]
    paper: float
    per_epoch: bool
    hardware: str


CALIBRATION = {
    "lomar": Calibration("lomar/t2", "MAE", "mae", {"optim.epochs": 400}, 58.0, False, "4x A100-80GB (wall h)"),
    "localmim": Calibration("localmim/t1", "MAE ViT-B 800ep", "mae", {"optim.epochs": 800}, 1.1, True,
                            "1x V100-32GB (GPU-h per epoch)"),
    "extrema": Calibration("extrema/t8", "ExtreMA 80% x1", "extrema_1mask", {}, 29.0, False,
                           "8x V100 (wall h)"),
}


def _fixed(label: str) -> Callable[[str], str]:
    return lambda _row: label


def _lomar_t1_ref(label: str) -> str:
    # "LoMaR, IN-1K 384" -> "MAE, IN-1K 384": the claim is LoMaR 2.5x / 3.1x faster than MAE at 384 / 448.
    return "MAE," + label.split(",", 1)[1] if "," in label else label


def _extrema_t12_ref(label: str) -> str:
    # "80%, 2 masks, 300 ep" -> "80%, 1 mask, 300 ep": each ratio against its single-mask 300-epoch row.
    return label.split(",", 1)[0] + ", 1 mask, 300 ep"


def _same_backbone(head: str) -> Callable[[str], str]:
    # "256D - 8H, Swin-B" -> "512D - 16H, Swin-B": each backbone's rows against that backbone's reference.
    return lambda label: f"{head}, {label.split(', ', 1)[1]}" if ", " in label else head


REFERENCES: dict[str, Callable[[str], str]] = {
    "lomar/t1": _lomar_t1_ref,
    "lomar/t2": _fixed("MAE"),
    "lomar/t5": _fixed("BEiT"),
    "lomar/t6-f4": _fixed("encoder 14x14"),
    "localmim/t1": _fixed("MAE, ViT-B 800"),
    "localmim/t4c": _same_backbone("512D - 16H"),
    "localmim/t5": _same_backbone("LocalMIM"),
    "extrema/t8": _fixed("ExtreMA (80% ratio x1)"),
    "extrema/t12": _extrema_t12_ref,
}


def cost_table(table_id: str) -> CostTable:
    """The rows of an efficiency table, from its spec (a spec that fails to load raises its own one-line error)."""
    from repro.spec import get_spec

    spec = get_spec(table_id)
    cols = [c for c in spec.columns if c.measure in ("pretrain.hours", "pretrain.hours_per_epoch")]
    if not cols:
        raise ConfigError(f"no cost rows for table '{table_id}' (its spec has no pretrain.hours column); "
                          f"tables with cost rows: {', '.join(EFFICIENCY_TABLES)}")
    col = cols[0]
    rows = []
    for r in spec.rows:
        if r.pretrain is None:
            continue
        cell = r.cells.get(col.id)
        value = cell.value if cell is not None and isinstance(cell.value, (int, float)) else None
        skip = r.reported or r.pending
        rows.append(CostRow(r.label, r.pretrain, dict(r.overrides), value, bool(cell and cell.approx), skip))
    ref = REFERENCES.get(table_id) or _fixed(spec.reference_row or rows[0].label)
    return CostTable(table_id, spec.paper, col.unit or "h", col.measure == "pretrain.hours_per_epoch", rows, ref,
                     f"repro.spec ({spec.source})")


def cost_suffix(device: str | None) -> str:
    """The device part of a cost table's file name: none for a CPU (the project's machine), else ``.<device>``
    (``t1-cost.nvidia-h200.md``), so each device's table sits beside the others."""
    if not device or device.startswith("CPU"):
        return ""
    return "." + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def resolve_row(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A row's paper-scale config."""
    from repro.resolve import resolve

    return resolve(recipe, "paper", [f"{k}={v}" for k, v in overrides.items()], kind="pretrain")
