"""Which rows each efficiency table profiles, the paper's time for each, the reference row of every speed-up, and the
one declared calibration row per paper.

Rows and paper numbers come from the table specs (``repro.spec``) where a paper's spec file exists: every trainable
row with a pretraining recipe, its paper-level overrides, and the value of the table's time column (the column whose
measure is ``pretrain.hours`` or ``pretrain.hours_per_epoch``). Until a paper's spec exists, the small fallback
below (transcribed from the papers, ``source`` says where) stands in. Speed-up references are declared here because
the papers' headline claims are relative to MAE / ExtreMA x1, whereas some printed speed-up columns are relative
to BEiT; every paper ratio is recomputed from the paper's own time column, so it needs no printed ratio.
"""

from __future__ import annotations

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
    source: str  # "repro.spec" or the fallback's citation


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

# Recipes some spec rows name before they exist: the same configuration by overrides of an existing recipe.
RECIPE_FALLBACK = {
    "mae_384": ("mae", {"data.img_size": 384}),
    "mae_448": ("mae", {"data.img_size": 448}),
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


def _r(label: str, recipe: str | None, paper: float | None, **ov: Any) -> CostRow:
    return CostRow(label, recipe, {k.replace("__", "."): v for k, v in ov.items()}, paper)


def _fallback() -> dict[str, CostTable]:
    """Paper numbers for tables whose spec file is not written yet (the spec wins when it exists)."""
    t12 = []
    for ratio, times in ((75, (30, 40, 60)), (80, (29, 36, 58)), (90, (28, 30, 58))):
        for (masks, ep), t in zip(((1, 300), (2, 300), (1, 600)), times):
            t12.append(_r(f"{ratio}% x{masks} {ep}ep", "extrema_1mask", t, method__mask_ratio=ratio / 100,
                          method__num_masks=masks, optim__epochs=ep))
    return {
        "localmim/t1": CostTable("localmim/t1", "localmim", "GPU-h/epoch (1xV100)", True, [
            _r("MAE ViT-B 800ep", "mae", 1.1, optim__epochs=800),
            _r("MAE ViT-B 1600ep", "mae", 1.1, optim__epochs=1600),
            _r("MAE ViT-L 1600ep", "mae", 1.7, model__arch="vit_large", optim__epochs=1600),
            _r("BEiT ViT-B 800ep", "beit", 2.4, optim__epochs=800),
            _r("MaskFeat ViT-B 1600ep", "maskfeat", 3.9, optim__epochs=1600),
            _r("LoMaR ViT-B 1600ep", "lomar", 1.4, optim__epochs=1600),
            _r("LocalMIM-HOG ViT-B 100ep", "localmim_100ep", 0.7),
            _r("LocalMIM-HOG ViT-B 1600ep", "localmim", 0.7, optim__epochs=1600),
            _r("LocalMIM-HOG ViT-L 800ep", "localmim_vit_large", 1.0),
        ], REFERENCES["localmim/t1"], "localmim.md Table 1 (ViT rows; Swin rows belong to the Swin engineer)"),
        "localmim/t4c": CostTable("localmim/t4c", "localmim", "GPU-h/epoch (1xV100)", True, [
            _r("512D-16H", "localmim_100ep", 1.0, method__decoder_dim=512, method__decoder_heads=16),
            _r("256D-8H", "localmim_100ep", 0.7),
            _r("128D-4H", "localmim_100ep", 0.6, method__decoder_dim=128, method__decoder_heads=4),
        ], REFERENCES["localmim/t4c"], "localmim.md Table 4c (ViT-B column)"),
        "localmim/t5": CostTable("localmim/t5", "localmim", "GPU-h/epoch (1xV100)", True, [
            _r("LocalMIM ViT-B", "localmim_100ep", 0.7),
            _r("w/ isolated grad ViT-B", "localmim_100ep", 0.7, method__grad_isolation=True),
        ], REFERENCES["localmim/t5"], "localmim.md Table 5 (ViT-B rows)"),
        "extrema/t8": CostTable("extrema/t8", "extrema", "h (8xV100)", False, [
            _r("BEiT", "beit", 240, optim__epochs=800),
            _r("MAE", "mae", 650, optim__epochs=1600),
            _r("ExtreMA 80% x1", "extrema_1mask", 29),
            _r("ExtreMA 80% x2", "extrema_2mask", 36),
            _r("ExtreMA 80% x5", "extrema", 60),
        ], REFERENCES["extrema/t8"], "extrema.md Table 8 (DINO is reported-only)"),
        "extrema/t12": CostTable("extrema/t12", "extrema", "h (8xV100)", False, t12, REFERENCES["extrema/t12"],
                                 "extrema.md Table 12"),
    }


def _from_spec(table_id: str) -> CostTable | None:
    """The cost table of a spec (None when the paper's spec is not available)."""
    try:
        from repro.spec import get_spec

        spec = get_spec(table_id)
    except Exception:  # noqa: BLE001 - a missing or half-written spec file: use the fallback
        return None
    cols = [c for c in spec.columns if c.measure in ("pretrain.hours", "pretrain.hours_per_epoch")]
    if not cols:
        return None
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


def cost_table(table_id: str) -> CostTable:
    """The rows of an efficiency table: from the spec when it exists, else the fallback transcription."""
    t = _from_spec(table_id)
    if t is not None:
        return t
    fb = _fallback()
    if table_id not in fb:
        raise ConfigError(f"no cost rows for table '{table_id}' (its spec is missing or has no time column); "
                          f"tables with cost rows: {', '.join(EFFICIENCY_TABLES)}")
    return fb[table_id]


def resolve_row(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A row's paper-scale config (recipes named before they exist fall back to RECIPE_FALLBACK)."""
    from repro.config import recipes_root
    from repro.resolve import resolve

    ov = {k: v for k, v in overrides.items()}
    if not (recipes_root() / "pretrain" / f"{recipe}.yaml").exists() and recipe in RECIPE_FALLBACK:
        recipe, extra = RECIPE_FALLBACK[recipe]
        ov = {**extra, **ov}
    return resolve(recipe, "paper", [f"{k}={v}" for k, v in ov.items()], kind="pretrain")
