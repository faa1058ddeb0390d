"""Paper tables and figures as data: the dataclasses and the validation of the YAML files that hold them.

One YAML file per paper (``repro/spec/<paper>.yaml``) holds every table and figure of that paper: the printed
numbers exactly (``approx`` marks values printed with "~", ``null`` a printed blank or a value that exists only in a
plot, ``flags`` a value the source garbles), and for each row the recipe that reproduces it (a pretraining recipe +
paper-level dotted ``overrides`` + the evaluation recipes) or why it cannot be run (``reported``). A row whose
measures need a stage kind that ``repro.kinds`` does not register (segmentation, detection) is planned as pending
with a derived reason; ``pending`` holds only a reason the planner cannot know.

File layout::

    paper: lomar
    title: ...
    tables:
      - id: t2                    # becomes lomar/t2
        kind: table               # table | figure
        caption: ...
        source: "lomar.md, Table 2"
        columns: [{id: top1, title: Top-1 Acc, measure: finetune.top1, unit: "%"}, ...]
        rows:
          - {label: MAE, values: {top1: 83.1, time_h: 58}, approx: [time_h], pretrain: mae,
             overrides: {optim.epochs: 400}}

Any unknown key, a value for a column the table lacks, a measure outside ``MEASURES`` or a duplicate id/label is a
``ConfigError`` naming the file and the table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from repro.config import ConfigError
from repro.kinds import KINDS

# Measures of the papers' tables that no registered kind declares: the transfer measures, by the stage kind that is
# to produce them (`segment`, `detect`: while it is not registered, a row that needs it is planned as pending), and
# the report's derived columns. A registered kind's own StageKind.measures go over these.
OTHER_MEASURES: dict[str, tuple[str, str]] = {
    "segmentation.miou": ("segment", "miou"),
    "detection.ap_box": ("detect", "ap_box"),
    "detection.ap_mask": ("detect", "ap_mask"),
    "detection.ap50_box": ("detect", "ap50_box"),
    "detection.ap75_box": ("detect", "ap75_box"),
    "detection.ap50_mask": ("detect", "ap50_mask"),
    "detection.ap75_mask": ("detect", "ap75_mask"),
    "derived.speedup": ("derived", "speedup"),  # computed by the report from a reference row
}


class _Measures(Mapping[str, tuple[str, str]]):
    """What a column measures (``<kind>.<measure>``) -> (stage kind producing it, metric key in that stage's
    result.json), read from the stage-kind registry (``repro.kinds``) each time, then ``OTHER_MEASURES``."""

    def _all(self) -> dict[str, tuple[str, str]]:
        own = {m: (k.name, key) for k in KINDS.values() for m, key in k.measure_names().items()}
        return {**own, **{m: v for m, v in OTHER_MEASURES.items() if m not in own}}

    def __getitem__(self, measure: str) -> tuple[str, str]:
        return self._all()[measure]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


MEASURES: Mapping[str, tuple[str, str]] = _Measures()
NOT_EVALUATIONS = ("pretrain", "derived")  # measure kinds a row's evals / eval_overrides cannot name


def eval_kind_names() -> list[str]:
    """Stage kinds a row's ``evals`` / ``eval_overrides`` may name: every measured kind but these."""
    return list(dict.fromkeys(k for k, _ in MEASURES.values() if k not in NOT_EVALUATIONS))


PAPERS = ("lomar", "localmim", "extrema", "suite")  # suite: the suite's own signal table
TABLE_KINDS = ("table", "figure")
COLUMN_TYPES = ("number", "text")

FILE_KEYS = ("paper", "title", "tables")
TABLE_KEYS = ("id", "kind", "caption", "source", "columns", "rows", "reference_row", "plot", "notes")
COLUMN_KEYS = ("id", "title", "type", "measure", "unit", "reference")
ROW_KEYS = ("label", "values", "approx", "flags", "pretrain", "overrides", "evals", "eval_overrides", "init",
            "reported", "pending", "x", "series", "note", "same_stage_ok")
PLOT_KEYS = ("x", "y", "series", "xlabel", "ylabel", "logx")


@dataclass(frozen=True)
class Column:
    id: str  # short key used in rows' values, e.g. "top1", "lin", "time_h"
    title: str  # as printed in the paper
    type: str = "number"  # number | text
    measure: str | None = None  # a MEASURES key: what our run puts in this column (None: descriptive column)
    unit: str | None = None  # "%", "h", "GPU-h", ...
    reference: str | None = None  # for derived.speedup: which column it is a ratio of, e.g. "time_h"


@dataclass(frozen=True)
class Cell:
    value: float | str | None  # None = printed blank / missing
    approx: bool = False  # printed with "~"
    flag: str | None = None  # e.g. "illegible in the source"; value stays None unless legible


@dataclass
class Row:
    label: str  # as printed (method name, setting); unique within its table
    cells: dict[str, Cell]  # column id -> paper value
    pretrain: str | None = None  # pretraining recipe (repro/recipes/pretrain/<name>.yaml)
    overrides: dict[str, Any] = field(default_factory=dict)  # paper-level dotted overrides of the pretrain recipe
    evals: dict[str, str] | None = None  # stage kind -> recipe, over the pretrain recipe's own `evals:`
    eval_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per kind, paper-level dotted overrides
    init: str | None = None  # "random": no pretraining (scratch / supervised from scratch); pretrain is then None
    reported: str | None = None  # reported-only: why
    # pending for a reason the planner cannot know (a measure whose stage kind is not registered is pending anyway)
    pending: str | None = None
    x: float | None = None  # figures: the x value of this point
    series: str | None = None  # figures: the curve this point belongs to
    note: str | None = None
    same_stage_ok: str | None = None  # why this row may share its stage with a row that prints another value

    @property
    def trainable(self) -> bool:
        return self.reported is None and (self.pretrain is not None or self.init == "random")

    def value(self, column: str) -> float | str | None:
        """The paper's value in ``column`` (None when blank or the row has no cell there)."""
        cell = self.cells.get(column)
        return None if cell is None else cell.value


@dataclass
class TableSpec:
    id: str  # "lomar/t2"
    paper: str  # lomar | localmim | extrema
    kind: str  # table | figure
    caption: str
    source: str  # where the numbers were transcribed from
    columns: list[Column]
    rows: list[Row]
    reference_row: str | None = None  # label of the row speed-ups/differences are relative to
    plot: dict[str, Any] | None = None  # {"x": column id or "x", "y": column id, "series": "series", ...}
    notes: list[str] = field(default_factory=list)

    def column(self, column_id: str) -> Column:
        for c in self.columns:
            if c.id == column_id:
                return c
        raise ConfigError(f"{self.id}: no column '{column_id}'; columns: {', '.join(c.id for c in self.columns)}")

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise ConfigError(f"{self.id}: no row '{label}'; rows: {', '.join(r.label for r in self.rows)}")

    def cell(self, label: str, column_id: str) -> Cell:
        self.column(column_id)
        return self.row(label).cells.get(column_id, Cell(None))


# ---- YAML -> dataclasses ---------------------------------------------------------------------------------------------


def _keys(obj: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    bad = [k for k in obj if k not in allowed]
    if bad:
        raise ConfigError(f"{where}: unknown key '{bad[0]}'; valid keys: {', '.join(allowed)}")
    return obj


def _str(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise ConfigError(f"{where}: '{key}' is required")
        return None
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {v!r}")
    return v


def _column(raw: Any, where: str) -> Column:
    raw = _keys(raw, COLUMN_KEYS, where)
    cid = _str(raw, "id", where, required=True)
    where = f"{where} column '{cid}'"
    ctype = raw.get("type", "number")
    if ctype not in COLUMN_TYPES:
        raise ConfigError(f"{where}: bad type {ctype!r}; valid: {', '.join(COLUMN_TYPES)}")
    measure = raw.get("measure")
    if measure is not None and measure not in MEASURES:
        raise ConfigError(f"{where}: unknown measure {measure!r}; valid measures: {', '.join(MEASURES)}")
    if measure == "derived.speedup" and not raw.get("reference"):
        raise ConfigError(f"{where}: a derived.speedup column needs 'reference' (the column it is a ratio of)")
    return Column(id=cid, title=_str(raw, "title", where, required=True) or cid, type=ctype, measure=measure,
                  unit=_str(raw, "unit", where), reference=_str(raw, "reference", where))


def _dotted(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and k for k in obj):
        raise ConfigError(f"{where}: expected a mapping of dotted keys (e.g. optim.epochs: 100), got {obj!r}")
    return dict(obj)


def _row(raw: Any, columns: dict[str, Column], where: str) -> Row:
    raw = _keys(raw, ROW_KEYS, where)
    label = _str(raw, "label", where, required=True)
    assert label is not None
    where = f"{where} row '{label}'"
    values = raw.get("values") or {}
    approx = raw.get("approx") or []
    flags = raw.get("flags") or {}
    if not isinstance(values, dict) or not isinstance(approx, list) or not isinstance(flags, dict):
        raise ConfigError(f"{where}: 'values' and 'flags' must be mappings and 'approx' a list of column ids")
    for group, ids in (("values", values), ("approx", approx), ("flags", flags)):
        for cid in ids:
            if cid not in columns:
                raise ConfigError(f"{where}: {group} names unknown column '{cid}'; columns: {', '.join(columns)}")
    cells: dict[str, Cell] = {}
    for cid in dict.fromkeys([*values, *approx, *flags]):
        v = values.get(cid)
        col = columns[cid]
        if v is not None:
            if col.type == "number" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{where}: column '{cid}' is a number column, got {v!r} (quote nothing; use null "
                                  "for a blank)")
            if col.type == "text" and not isinstance(v, (str, int, float)):
                raise ConfigError(f"{where}: column '{cid}' holds text, got {v!r}")
        flag = flags.get(cid)
        if flag is not None and (not isinstance(flag, str) or not flag.strip()):
            raise ConfigError(f"{where}: flags.{cid} must say why the value is flagged")
        cells[cid] = Cell(value=v, approx=cid in approx, flag=flag)
    evals = raw.get("evals")
    if evals is not None:
        if not isinstance(evals, dict) or not all(isinstance(v, str) for v in evals.values()):
            raise ConfigError(f"{where}: 'evals' must map a stage kind to a recipe name")
        for kind in evals:
            if kind not in eval_kind_names():
                raise ConfigError(f"{where}: evals names unknown stage kind '{kind}'; valid: "
                                  f"{', '.join(eval_kind_names())}")
    eval_ov = raw.get("eval_overrides") or {}
    if not isinstance(eval_ov, dict):
        raise ConfigError(f"{where}: 'eval_overrides' must map a stage kind to dotted overrides")
    for kind in eval_ov:
        if kind not in eval_kind_names():
            raise ConfigError(f"{where}: eval_overrides names unknown stage kind '{kind}'")
    init = raw.get("init")
    pretrain = _str(raw, "pretrain", where)
    if init is not None and init != "random":
        raise ConfigError(f"{where}: init must be 'random' (a row without pretraining) or absent, got {init!r}")
    if init == "random" and pretrain is not None:
        raise ConfigError(f"{where}: init: random and pretrain: {pretrain} exclude each other")
    for key in ("x",):
        if raw.get(key) is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float))):
            raise ConfigError(f"{where}: '{key}' must be a number, got {raw[key]!r}")
    return Row(label=label, cells=cells, pretrain=pretrain, overrides=_dotted(raw.get("overrides"), where),
               evals=dict(evals) if evals is not None else None,
               eval_overrides={k: _dotted(v, f"{where} eval_overrides.{k}") for k, v in eval_ov.items()},
               init=init, reported=_str(raw, "reported", where), pending=_str(raw, "pending", where),
               x=raw.get("x"), series=None if raw.get("series") is None else str(raw["series"]),
               note=_str(raw, "note", where), same_stage_ok=_str(raw, "same_stage_ok", where))


def _table(raw: Any, paper: str, where: str) -> TableSpec:
    raw = _keys(raw, TABLE_KEYS, where)
    tid = _str(raw, "id", where, required=True)
    where = f"{where} table '{tid}'"
    kind = raw.get("kind", "table")
    if kind not in TABLE_KINDS:
        raise ConfigError(f"{where}: bad kind {kind!r}; valid: {', '.join(TABLE_KINDS)}")
    if not isinstance(raw.get("columns"), list) or not raw["columns"]:
        raise ConfigError(f"{where}: 'columns' must be a non-empty list")
    if not isinstance(raw.get("rows"), list) or not raw["rows"]:
        raise ConfigError(f"{where}: 'rows' must be a non-empty list")
    columns: dict[str, Column] = {}
    for c in raw["columns"]:
        col = _column(c, where)
        if col.id in columns:
            raise ConfigError(f"{where}: duplicate column id '{col.id}'")
        columns[col.id] = col
    for col in columns.values():
        if col.reference is not None and col.reference not in columns:
            raise ConfigError(f"{where}: column '{col.id}' references unknown column '{col.reference}'")
    rows: list[Row] = []
    for r in raw["rows"]:
        row = _row(r, columns, where)
        if any(o.label == row.label for o in rows):
            raise ConfigError(f"{where}: duplicate row label '{row.label}' (labels must be unique within a table)")
        rows.append(row)
    ref = raw.get("reference_row")
    if ref is not None and ref not in {r.label for r in rows}:
        raise ConfigError(f"{where}: reference_row '{ref}' is not a row label")
    plot = raw.get("plot")
    if plot is not None:
        plot = dict(_keys(plot, PLOT_KEYS, f"{where} plot"))
        for key in ("x", "y"):
            v = plot.get(key)
            if v is None or (v not in columns and not (key == "x" and v == "x")):
                raise ConfigError(f"{where}: plot.{key} must be a column id{' or x' if key == 'x' else ''}, got {v!r}")
    notes = raw.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ConfigError(f"{where}: 'notes' must be a list of strings")
    return TableSpec(id=f"{paper}/{tid}", paper=paper, kind=kind,
                     caption=_str(raw, "caption", where, required=True) or "",
                     source=_str(raw, "source", where, required=True) or "", columns=list(columns.values()),
                     rows=rows, reference_row=ref, plot=plot, notes=list(notes))


def parse_paper(data: Any, where: str) -> list[TableSpec]:
    """One paper file's parsed YAML -> its table specs (ids prefixed with the paper), validated."""
    data = _keys(data, FILE_KEYS, where)
    paper = data.get("paper")
    if paper not in PAPERS:
        raise ConfigError(f"{where}: 'paper' must be one of {', '.join(PAPERS)}, got {paper!r}")
    if not isinstance(data.get("tables"), list):
        raise ConfigError(f"{where}: 'tables' must be a list")
    specs: list[TableSpec] = []
    for raw in data["tables"]:
        spec = _table(raw, paper, where)
        if any(s.id == spec.id for s in specs):
            raise ConfigError(f"{where}: duplicate table id '{spec.id}'")
        specs.append(spec)
    return specs
