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
import math
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from repro.errors import ConfigError  # defined there (shared with repro.kinds); repro.config.ConfigError is the same
from repro.kinds import recipe_kinds  # the recipe folders of the registered stage kinds

SCALES = ("paper", "tiny")


def recipes_root() -> Path:
    return Path(str(resources.files("repro") / "recipes"))


def list_recipes(kind: str | None = None) -> dict[str, list[str]]:
    """Recipe names per recipe kind (files starting with ``_`` are bases, not runnable recipes)."""
    out: dict[str, list[str]] = {}
    for k in recipe_kinds() if kind is None else (kind,):
        d = recipes_root() / k
        out[k] = sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")) if d.is_dir() else []
    return out


def find_recipe(name: str, kind: str | None = None) -> tuple[str, Path]:
    """Locate a recipe by ``name`` or ``kind/name``; error lists the valid names."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99})?", name):
        raise ConfigError(f"recipe name {short(name)} is not a recipe name (letters, digits, _ . -; at most 100 "
                          "characters; see `repro recipes`)")
    if "/" in name:
        kind, name = name.split("/", 1)
    valid_kinds = recipe_kinds()
    kinds = (kind,) if kind else valid_kinds
    for k in kinds:
        if k not in valid_kinds:
            raise ConfigError(f"unknown recipe kind '{k}'; valid kinds: {', '.join(valid_kinds)}")
        p = recipes_root() / k / f"{name}.yaml"
        if p.is_file():
            return k, p
    valid = [f"{k}/{n}" for k, names in list_recipes().items() if k in kinds for n in names]
    raise ConfigError(f"unknown recipe '{name}'; valid recipes: {', '.join(valid)} (see `repro recipes`)")


_YAML_CACHE: dict[tuple[str, int, int], Any] = {}


def _load_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's mapping (a fresh copy; parsed once per file version: planning all tables reads each file
    thousands of times)."""
    st = Path(path).stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _YAML_CACHE:
        with open(path) as f:
            _YAML_CACHE[key] = yaml.safe_load(f) or {}
    data = _YAML_CACHE[key]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at top level")
    return copy.deepcopy(data)


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
        problem = getattr(e, "problem", None) or "not YAML"
        raise ConfigError(f"cannot parse value {short(text)}: {problem} (quote it, e.g. 'a: b')") from None
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
        parts = key.strip().split(".")
        if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", p) for p in parts):
            raise ConfigError(f"override key {short(key)} is not a dotted name (e.g. model.depth=4)")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"overrides conflict: '{key}' sets a key under '{'.'.join(parts[:i + 1])}', "
                                  f"which another override sets to {short(node)}; give one of them")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"overrides conflict: '{key}' replaces '{key}.*' set by another override; "
                              "give one of them")
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
            if path in RULES:
                RULES[path].check(path, v)
            raise ConfigError(f"bad value for '{path}': {v!r} (expected {type(d).__name__}, like {d!r})")


# ---- value rules: every recipe key has a type and a range -------------------------------------------------------
NUMBER = (int, float)
SDPA_NAMES = ("flash", "cudnn", "efficient", "math")  # train.sdpa: torch's SDPA kernels (repro.engine.train)


@dataclass(frozen=True)
class Rule:
    """What one key accepts: a type, an optional closed/open range, an enum, a list shape, null or not."""

    type: type | tuple[type, ...]
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    item: Rule | None = None  # lists: the rule of each item
    length: int | None = None  # lists: exact length
    ordered: bool = False  # lists: non-decreasing
    path: bool = False  # strings: a file system path (no name longer than 255 bytes)

    def describe(self) -> str:
        if self.choices:
            what = "one of " + ", ".join(map(str, self.choices))
        elif self.item is not None:
            n = f"{self.length} " if self.length else ""
            what = f"a list of {n}{self.item.describe()}" + (" (non-decreasing)" if self.ordered else "")
        else:
            names = {int: "an int", float: "a float", str: "a string", bool: "true/false (bool)"}
            what = names.get(self.type, "a number") if isinstance(self.type, type) else "a number"
            lo = f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else ""
            hi = f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else ""
            if lo and hi:
                what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            elif lo or hi:
                what += f" {lo or hi}"
        if self.type is str and not self.choices:
            what += " without control characters" + (" (no name over 255 bytes)" if self.path else "")
        return what + (", or null" if self.nullable else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if self.choices:
            return isinstance(v, Hashable) and not isinstance(v, bool) and v in self.choices
        if self.item is not None:
            return (isinstance(v, (list, tuple)) and (self.length is None or len(v) == self.length)
                    and (self.length is not None or len(v) > 0) and all(self.item.ok(x) for x in v)
                    and (not self.ordered or all(a <= b for a, b in zip(v, v[1:]))))
        if self.type is bool:
            return isinstance(v, bool)
        if isinstance(v, bool):
            return False
        if self.type is int and not isinstance(v, int):
            return False
        if self.type in (float, NUMBER):
            if not isinstance(v, NUMBER) or not math.isfinite(v):
                return False
        elif not isinstance(v, self.type):
            return False
        if isinstance(v, str):
            return (not CONTROL.search(v) and len(v) <= 4096
                    and not (self.path and any(len(part.encode()) > 255 for part in v.split("/"))))
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def check(self, key: str, v: Any) -> None:
        if not self.ok(v):
            raise ConfigError(f"bad value for '{key}': {short(v)} (allowed: {self.describe()})")


def short(v: Any, n: int = 60) -> str:
    """A value as one short line (user strings can be long or hold newlines)."""
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # newline, tab, escape...: never in a name, a path or a value
POS_INT = Rule(int, lo=1)
NAT = Rule(int, lo=0)
PROB = Rule(float, 0.0, 1.0)
POS = Rule(float, lo=0.0, lo_open=True)
NONNEG = Rule(float, lo=0.0)
TEXT = Rule(str)
# The rules of every key of _common.yaml + <kind>/_base.yaml (tests/test_bad_inputs.py checks none is missing).
# ``method.*`` is checked against the method's defaults (types) and its own ``validate`` (ranges).
RULES: dict[str, Rule] = {
    "description": TEXT, "source": TEXT, "tiny_reason": TEXT,
    "seed": NAT,
    "data.dataset": Rule(str, choices=("imagenet1k", "imagenet22k", "inat2018", "inat2019", "synthetic", "digits",
                                       "ade20k", "coco")),
    "data.path": Rule(str, nullable=True, path=True),
    "data.img_size": Rule(int, 8, 4096),
    "data.num_classes": POS_INT,
    "data.train_fraction": Rule(float, 0.0, 1.0, lo_open=True),
    "data.interpolation": Rule(str, choices=("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")),
    "data.synthetic_train": POS_INT, "data.synthetic_val": POS_INT, "data.synthetic_classes": Rule(int, 2, 1000),
    "data.crop_scale": Rule(list, item=PROB, length=2, ordered=True),
    "data.hflip": PROB,
    "data.decode": Rule(str, choices=("cpu", "device")),
    "model.arch": TEXT,  # the valid names come from repro.models (checked in resolve.validate)
    "model.patch_size": Rule(int, 1, 256),
    "model.embed_dim": Rule(int, lo=1, nullable=True), "model.depth": Rule(int, lo=1, nullable=True),
    "model.num_heads": Rule(int, lo=1, nullable=True),
    "model.mlp_ratio": Rule(float, lo=0, lo_open=True, nullable=True),
    "model.window_size": Rule(int, lo=1, nullable=True),
    "model.drop_path": Rule(float, 0.0, 1.0, hi_open=True),
    "model.pos_embed": Rule(str, choices=("sincos", "learned", "none")),
    "model.rel_pos": Rule(str, choices=("none", "bias", "irpe")),
    "model.layer_scale": Rule(float, lo=0, lo_open=True, nullable=True),
    "model.global_pool": Rule(str, choices=("token", "avg")),
    "model.class_token": Rule(bool),
    "train.batch_per_device": POS_INT, "train.num_workers": Rule(int, 0, 256),
    "train.precision": Rule(str, choices=("auto", "fp32", "bf16", "fp16")),
    "train.log_every": POS_INT, "train.keep_every": NAT, "train.max_steps": Rule(int, lo=1, nullable=True),
    "train.compile": Rule(bool, nullable=True), "train.fused_optim": Rule(bool, nullable=True),
    "train.compile_mode": Rule(str, nullable=True, choices=("default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs")),
    "train.fused_attn": Rule(bool, nullable=True), "train.sync_free": Rule(bool, nullable=True),
    "train.embed_visible": Rule(bool, nullable=True),
    "train.compile_scope": Rule(str, nullable=True, choices=("blocks", "all")),
    "train.sdpa": Rule(list, item=Rule(str, choices=SDPA_NAMES), nullable=True),
    "train.knn_every": NAT, "train.grad_norms": Rule(bool),
    "optim.name": Rule(str, choices=("adamw", "lars", "sgd")),
    "optim.epochs": POS_INT, "optim.warmup_epochs": NONNEG, "optim.batch_size": POS_INT,
    "optim.blr": POS, "optim.lr": Rule(float, lo=0, lo_open=True, nullable=True), "optim.min_lr": NONNEG,
    "optim.weight_decay": NONNEG, "optim.betas": Rule(list, item=Rule(float, 0.0, 1.0, hi_open=True), length=2),
    "optim.momentum": Rule(float, 0.0, 1.0, hi_open=True),
    "optim.schedule": Rule(str, choices=("cosine", "multistep")),
    "optim.milestones": Rule(list, item=POS, ordered=True, nullable=True), "optim.decay_rate": POS,
    "optim.warmup_lr": NONNEG,
    "optim.clip_grad": Rule(float, lo=0, lo_open=True, nullable=True),
    "optim.layer_decay": Rule(float, 0.0, 1.0, lo_open=True, nullable=True),
    "aug.eval_crop_pct": Rule(float, 0.0, 1.0, lo_open=True),
    "aug.rand_aug": Rule(str, nullable=True), "aug.color_jitter": Rule(float, lo=0, nullable=True),
    "aug.reprob": PROB, "aug.mixup": NONNEG, "aug.cutmix": NONNEG, "aug.mixup_prob": PROB,
    "aug.mixup_switch_prob": PROB, "aug.smoothing": Rule(float, 0.0, 1.0, hi_open=True),
    "init": Rule(str, path=True), "resolution": Rule(str, choices=("inherit", "own")),
    "feature": Rule(str, choices=("auto", "cls", "avg", "instance")),
    "k": Rule(list, item=POS_INT), "temperature": POS, "batch_size": POS_INT,
    "metrics": Rule(list, item=Rule(str, choices=("nmi", "kl", "grad_norm"))),
    "num_images": POS_INT, "tokens": Rule(str, choices=("patches", "all")), "kl_eps": POS,
    # segment (segment/_base.yaml)
    "data.resize": Rule(list, item=Rule(int, lo=1), length=2),
    "data.ratio_range": Rule(list, item=POS, length=2, ordered=True),
    "data.cat_max_ratio": Rule(float, 0.0, 1.0, lo_open=True),
    "data.photometric": Rule(bool),
    "model.out_indices": Rule(list, item=NAT, length=4, ordered=True),
    "model.final_norm": Rule(bool),
    "model.rescales": Rule(list, item=Rule(float, choices=(4.0, 2.0, 1.0, 0.5, 0.25)), length=4),
    "model.decoder_channels": POS_INT, "model.aux_channels": POS_INT, "model.aux_weight": NONNEG,
    "model.dropout": Rule(float, 0.0, 1.0, hi_open=True),
    "optim.iters": POS_INT, "optim.warmup_iters": NAT, "optim.warmup_ratio": PROB,
    "optim.poly_power": POS,
    "eval.mode": Rule(str, choices=("slide", "whole")), "eval.stride": POS_INT,
    "train.ckpt_every": POS_INT,
    # detect (detect/_base.yaml)
    "framework": Rule(str, choices=("detectron2", "mmdet")),
    "optim.warmup_factor": Rule(float, 0.0, 1.0, lo_open=True),
    "optim.steps": Rule(list, item=Rule(float, 0.0, 1.0, lo_open=True, hi_open=True), ordered=True),
    "detect.window_size": NAT, "detect.global_blocks": Rule(list, item=NAT),
    "detect.out_indices": Rule(list, item=NAT, length=4, ordered=True), "detect.use_rel_pos": Rule(bool),
    "detect.lsj_scale": Rule(list, item=POS, length=2, ordered=True),
    "detect.scale_factors": Rule(list, item=Rule(float, choices=(4.0, 2.0, 1.0, 0.5))),
    "detect.fpn_channels": POS_INT, "detect.roi_batch_per_image": POS_INT, "detect.max_dets": POS_INT,
    "detect.checkpoint_every": POS_INT,
    "detect.rpn_pre_nms_topk": Rule(list, item=POS_INT, length=2),
    "detect.rpn_post_nms_topk": Rule(list, item=POS_INT, length=2),
    "detect.score_thresh": PROB,
}


def check_values(cfg: Mapping[str, Any], rules: Mapping[str, Rule] | None = None, skip: Iterable[str] = ()) -> None:
    """Check every value of ``cfg`` that has a rule (dotted keys); the first bad one raises a one-line ConfigError."""
    rules = RULES if rules is None else rules
    skip = tuple(skip)
    flat = flatten({k: v for k, v in cfg.items() if k not in skip})
    for key, rule in rules.items():
        if key in flat:
            rule.check(key, flat[key])


def accumulation(cfg: Mapping[str, Any], world_size: int) -> int:
    """Gradient-accumulation steps that keep the recipe's effective batch on ``world_size`` devices: each device takes
    the largest divisor of its share that is at most ``train.batch_per_device``, accumulation makes up the rest."""
    eff, per = cfg["optim"]["batch_size"], cfg["train"]["batch_per_device"]
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"the world size must be a positive integer, not {world_size!r}")
    if eff % world_size:
        raise ConfigError(f"optim.batch_size={eff} is not divisible by the world size {world_size}; "
                          f"use a batch size that is a multiple of {world_size} or change the number of devices")
    per_dev = eff // world_size
    per = max(d for d in range(1, min(per, per_dev) + 1) if per_dev % d == 0)
    return per_dev // per


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
