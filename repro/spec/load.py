"""The paper tables as data: ``repro/spec/{lomar,localmim,extrema}.yaml`` read and validated (schema:
``repro.spec.schema``) into one ``TableSpec`` per table or figure, by id (cached)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from repro.config import ConfigError
from repro.spec.schema import PAPERS, TableSpec, parse_paper


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
