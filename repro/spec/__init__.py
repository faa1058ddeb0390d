"""Every table and figure of the three papers (LoMaR, LocalMIM, ExtreMA) as data.

``load_specs()`` reads ``repro/spec/{lomar,localmim,extrema}.yaml`` (schema: ``repro.spec.schema``) into one
``TableSpec`` per paper table or figure, ids ``<paper>/<id>`` as in ``TABLES.md``; ``get_spec`` and ``select`` pick
them by id, by paper name or ``all``. The planner (``repro.pipeline.plan``) turns their rows into stages and the
report (``repro.report``) shows the paper's numbers beside ours.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from repro.config import ConfigError
from repro.spec.schema import MEASURES, PAPERS, Cell, Column, Row, TableSpec, parse_paper

__all__ = ["MEASURES", "PAPERS", "Cell", "Column", "Row", "TableSpec", "get_spec", "load_file", "load_specs",
           "select", "spec_root"]


def spec_root() -> Path:
    return Path(str(resources.files("repro") / "spec"))


def load_file(path: str | Path) -> list[TableSpec]:
    """The validated specs of one paper file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_paper(data, path.name)


@lru_cache(maxsize=1)
def _load() -> tuple[TableSpec, ...]:
    specs: list[TableSpec] = []
    for paper in PAPERS:
        for spec in load_file(spec_root() / f"{paper}.yaml"):
            if spec.paper != paper:
                raise ConfigError(f"{paper}.yaml: declares paper '{spec.paper}'; it must be '{paper}'")
            specs.append(spec)
    return tuple(specs)


def load_specs() -> dict[str, TableSpec]:
    """All specs by id, ordered by paper (lomar, localmim, extrema) then by their order in the file (cached)."""
    return {s.id: s for s in _load()}


def get_spec(table_id: str) -> TableSpec:
    specs = load_specs()
    if table_id not in specs:
        raise ConfigError(f"unknown table id '{table_id}'; valid ids: {', '.join(specs)}")
    return specs[table_id]


CLAIMS = "claims"  # the selector of the tables a signal bar or a claim rests on (their rows only: repro.pipeline.plan)


def select(ids: list[str]) -> list[TableSpec]:
    """Specs named by ``ids``: table ids, paper names (``lomar``: all its tables), ``claims`` (the tables of
    repro/spec/claims.yaml, signal bars first) or ``all``; order kept, no repeats."""
    specs = load_specs()
    out: dict[str, TableSpec] = {}
    for name in ids:
        if name == "all":
            out.update(specs)
        elif name == CLAIMS:
            from repro.spec.claims import load as load_claims

            claims, signal = load_claims()
            out.update({c.table: specs[c.table] for c in (*signal, *claims)})
        elif name in PAPERS:
            out.update({k: s for k, s in specs.items() if s.paper == name})
        elif name in specs:
            out[name] = specs[name]
        else:
            raise ConfigError(f"unknown table '{name}'; use all, claims, a paper ({', '.join(PAPERS)}) or an id: "
                              f"{', '.join(specs)}")
    return list(out.values())
