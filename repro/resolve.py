"""Recipe name + scale + overrides -> one validated stage configuration."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from repro.config import (
    CONTROL,
    ConfigError,
    _load_yaml,
    check_keys,
    check_values,
    deep_merge,
    load_recipe,
    parse_overrides,
    recipes_root,
    short,
)
from repro.scales import apply_scale

OPEN_KEYS = ("evals", "tiny_overrides", "method")


def schema(kind: str) -> dict[str, Any]:
    return deep_merge(_load_yaml(recipes_root() / "_common.yaml"), _load_yaml(recipes_root() / kind / "_base.yaml"))


def _method_section(method: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    from repro.methods.registry import get_spec

    cls = get_spec(method.get("name", "mae"))
    check_keys(method, cls.defaults, "method.")
    return cls, deep_merge(cls.defaults, method)


def nested(overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted strings (``["a.b=1"]``), a dotted mapping (``{"a.b": 1}``) or a nested mapping -> a nested dict."""
    if not isinstance(overrides, Mapping):
        return parse_overrides(overrides)
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        node = out
        *parents, last = str(k).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = deep_merge(node[last], v) if isinstance(v, Mapping) and isinstance(node.get(last), Mapping) \
            else v
    return out


def resolve(name: str, scale: str = "paper", overrides: Iterable[str] | Mapping[str, Any] = (),
            kind: str | None = None, paper_overrides: Mapping[str, Any] | Iterable[str] = ()) -> dict[str, Any]:
    """Load recipe ``name``, apply ``paper_overrides`` (a variant of the paper recipe: they go through the scale rule
    like the recipe's own values), then ``scale``, then ``overrides`` (as given, after the scale), and validate.
    Both kinds of overrides are dotted strings, a dotted mapping or a nested mapping."""
    kind, cfg = load_recipe(name, kind)
    sch = schema(kind)
    pov = nested(paper_overrides)
    if pov:
        check_keys(pov, sch, open_keys=("method",))
        cfg = deep_merge(cfg, pov)
    check_keys({k: v for k, v in cfg.items() if k not in ("kind", "recipe")}, sch, open_keys=OPEN_KEYS)
    method_cls = None
    if kind == "pretrain":
        method_cls, cfg["method"] = _method_section(cfg["method"])
    cfg = apply_scale(cfg, scale, method_cls)
    cfg["scale"] = scale
    ov = nested(overrides)
    if ov:
        check_keys(ov, sch, open_keys=("method",))
        cfg = deep_merge(cfg, ov)
        if kind == "pretrain":
            method_cls, cfg["method"] = _method_section(cfg["method"])
    validate(cfg, method_cls)
    return cfg


def validate(cfg: Mapping[str, Any], method_cls: Any = None) -> None:
    """Value checks that keys/types cannot express."""
    from repro.models.archs import ARCHS, SWIN_ARCHS, check_geometry, is_swin, swin_dims

    check_values(cfg, skip=OPEN_KEYS)
    if method_cls is not None:
        for k, v in cfg["method"].items():  # method knobs: types from its defaults, ranges in its validate()
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"bad value for 'method.{k}': {v!r} (allowed: a finite number)")
            if isinstance(v, str) and CONTROL.search(v):
                raise ConfigError(f"bad value for 'method.{k}': {short(v)} (allowed: no control characters)")
    arch = cfg["model"]["arch"]
    if arch not in ARCHS and arch not in SWIN_ARCHS:
        raise ConfigError(f"bad value for 'model.arch': {arch!r}; valid: {', '.join([*ARCHS, *SWIN_ARCHS])}")
    if is_swin(arch) and cfg.get("kind") != "detect":  # detect: mmdet's Swin pads each stage to its window
        d = swin_dims(cfg["model"])
        check_geometry(cfg["data"]["img_size"], cfg["model"]["patch_size"], d["depths"], d["window_size"])
    img, p = cfg["data"]["img_size"], cfg["model"]["patch_size"]
    if img % p:
        raise ConfigError(f"data.img_size={img} is not a multiple of model.patch_size={p}")
    o = cfg.get("optim")
    d = cfg["data"]
    if o and d["dataset"] == "synthetic":  # the embedded set's size is known: refuse a batch it cannot fill
        k, total, frac = max(1, d["synthetic_classes"]), d["synthetic_train"], d.get("train_fraction", 1.0)
        # label = index % classes; a fraction keeps round(count * fraction) (at least 1) per class, as build_split
        n = total if frac >= 1.0 else sum(max(1, round((total // k + (c < total % k)) * frac)) for c in range(k))
        if n < o["batch_size"]:
            raise ConfigError(f"optim.batch_size={o['batch_size']} is larger than the {n} training images "
                              f"(data.synthetic_train={d['synthetic_train']}, data.train_fraction="
                              f"{d.get('train_fraction', 1.0)}); lower optim.batch_size or raise data.synthetic_train")
    if o and o.get("schedule") == "multistep":
        ms = o.get("milestones") or []
        if not ms or ms[0] < o["warmup_epochs"]:  # as SimMIM's scheduler; milestones past the last epoch never act
            raise ConfigError(f"optim.schedule=multistep needs optim.milestones (epochs), none before the warm-up's "
                              f"end (optim.warmup_epochs={o['warmup_epochs']}); got {o.get('milestones')}")
    if method_cls is not None:
        method_cls.validate(cfg["method"])
