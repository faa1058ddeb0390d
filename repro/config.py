"""Recipes: YAML data files resolved into one validated, hashable configuration per stage.

A recipe file (``repro/recipes/<kind>/<name>.yaml``) holds the paper's hyper-parameters. It may ``extends:``
another recipe of the same kind; the chain ends in ``repro/recipes/<kind>/_base.yaml``, whose keys (with
``_common.yaml``) are the schema: any key
not present there is rejected with the list of valid keys. The ``method:`` section of a pretraining recipe is checked
against the method's own defaults (``repro.methods``). Scales (``paper``/``tiny``) are applied by ``repro.scales``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

KINDS = ("pretrain", "finetune", "linear", "knn", "analysis")
SCALES = ("paper", "tiny")
META_KEYS = ("extends", "description", "tiny_overrides", "tiny_reason", "evals", "source")


class ConfigError(ValueError):
    """Bad recipe, key or value; the message is one line that names the fix."""


def recipes_root() -> Path:
    return Path(str(resources.files("repro") / "recipes"))


def list_recipes(kind: str | None = None) -> dict[str, list[str]]:
    """Recipe names per kind (files starting with ``_`` are bases, not runnable recipes)."""
    out: dict[str, list[str]] = {}
    for k in KINDS if kind is None else (kind,):
        d = recipes_root() / k
        out[k] = sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")) if d.is_dir() else []
    return out


def find_recipe(name: str, kind: str | None = None) -> tuple[str, Path]:
    """Locate a recipe by ``name`` or ``kind/name``; error lists the valid names."""
    if "/" in name:
        kind, name = name.split("/", 1)
    kinds = (kind,) if kind else KINDS
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"unknown recipe kind '{k}'; valid kinds: {', '.join(KINDS)}")
        p = recipes_root() / k / f"{name}.yaml"
        if p.is_file():
            return k, p
    valid = [f"{k}/{n}" for k, names in list_recipes().items() if k in kinds for n in names]
    raise ConfigError(f"unknown recipe '{name}'; valid recipes: {', '.join(valid)} (see `repro recipes`)")


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at top level")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(name: str, kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """Return ``(kind, raw)`` with ``extends`` resolved (recipe values over its parents over ``_base``)."""
    kind, path = find_recipe(name, kind)
    chain: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while True:
        if path in seen:
            raise ConfigError(f"recipe {path.stem}: circular 'extends'")
        seen.add(path)
        raw = _load_yaml(path)
        chain.append(raw)
        parent = raw.get("extends")
        if parent is None:
            break
        _, path = find_recipe(parent, kind)
    merged = deep_merge(_load_yaml(recipes_root() / "_common.yaml"), _load_yaml(recipes_root() / kind / "_base.yaml"))
    for raw in reversed(chain):
        merged = deep_merge(merged, {k: v for k, v in raw.items() if k != "extends"})
    merged["kind"] = kind
    merged["recipe"] = name.split("/", 1)[-1]
    return kind, merged


def parse_value(text: str) -> Any:
    """Parse a command-line value with YAML rules (``1e-4``, ``[1, 2]``, ``null``, ``true``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value '{text}': {e}") from None
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string
    return value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["model.depth=4", "optim.blr=1e-4"]`` -> nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. model.depth=4)")
        key, val = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(val)
    return out


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def check_keys(cfg: Mapping[str, Any], schema: Mapping[str, Any], where: str = "",
               open_keys: Iterable[str] = ()) -> None:
    """Reject keys absent from ``schema`` and values of the wrong type, recursively."""
    open_keys = set(open_keys)
    for k, v in cfg.items():
        path = f"{where}{k}"
        if path in open_keys:
            continue
        if k not in schema:
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"unknown key '{path}'; valid keys{' under ' + where[:-1] if where else ''}: {valid}")
        d = schema[k]
        if isinstance(d, Mapping) and d and isinstance(v, Mapping):
            check_keys(v, d, f"{path}.", open_keys)
        elif not _type_ok(d, v):
            raise ConfigError(f"bad value for '{path}': {v!r} (expected {type(d).__name__}, like {d!r})")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(cfg: Mapping[str, Any], n: int = 12) -> str:
    return hashlib.sha256(canonical(cfg).encode()).hexdigest()[:n]


def get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(json.loads(canonical(cfg)), sort_keys=False, default_flow_style=None, width=120)
