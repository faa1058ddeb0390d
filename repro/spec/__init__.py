"""Every table and figure of the three papers (LoMaR, LocalMIM, ExtreMA) as data.

``load_specs()`` (``repro.spec.load``) reads ``repro/spec/{lomar,localmim,extrema}.yaml`` (schema:
``repro.spec.schema``) into one ``TableSpec`` per paper table or figure, ids ``<paper>/<id>`` as in ``TABLES.md``;
``get_spec`` and ``select`` pick them by id, by paper name, ``claims`` (``repro.spec.claims``) or ``all``. The
planner (``repro.pipeline.plan``) turns their rows into stages and the report (``repro.report``) shows the paper's
numbers beside ours.
"""

from __future__ import annotations

from repro.config import ConfigError
from repro.spec.load import get_spec, load_file, load_specs, spec_root
from repro.spec.schema import MEASURES, PAPERS, Cell, Column, Row, TableSpec

__all__ = ["MEASURES", "PAPERS", "Cell", "Column", "Row", "TableSpec", "get_spec", "load_file", "load_specs",
           "select", "spec_root"]


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
