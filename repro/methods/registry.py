"""Method metadata that planning reads without torch: one ``MethodSpec`` per method, registered by name.

A spec holds the class-level facts of a method: its knobs with their defaults (the schema of a recipe's ``method:``
section), range checks, the tiny-scale rule, the features evaluations read, its analytic FLOPs, and where its
``nn.Module`` lives. Specs live in ``repro/methods/specs/<name>.py`` (torch-free, all imported here); the module
``repro/methods/<name>.py`` holds the implementation, a class that subclasses its spec and ``PretrainMethod``, so
``cls.defaults`` and the rest read the same on either. ``get_method`` imports the implementation only when asked.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, ClassVar

from repro.config import ConfigError


class MethodSpec:
    """Class-level facts about a pretraining method (never instantiated: everything is a class attribute/method)."""

    name: ClassVar[str]
    # Every knob of the method with its default: the schema of a recipe's `method:` section.
    defaults: ClassVar[dict[str, Any]]
    # "module:Class" of the implementation (imported by get_method / implementation()).
    impl_path: ClassVar[str]
    # The feature linear probing and kNN use (`cls`, `avg`, or `instance` for a method's own head).
    linear_feature: ClassVar[str] = "cls"
    # What the fine-tuning classifier pools (`avg` of patch tokens, or `token`).
    finetune_pool: ClassVar[str] = "avg"
    # Knobs that change what a step computes but not what it costs: left out of the profile key (profile.bench).
    cost_free: ClassVar[tuple[str, ...]] = ()
    # Bumped by any change to the method's code that alters its results: part of its stages' identity (a finished
    # stage made by an older version is recomputed; repro.pipeline.stage.results_version).
    results_version: ClassVar[int] = 1
    # Methods of the implementation that ``train.compile`` with ``train.compile_scope=all`` runs as one graph each
    # through ``PretrainMethod.run_unit`` (e.g. everything after the encoder): the glue between the compiled blocks
    # fused, not op by op.
    compiled_units: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        """Raise ConfigError for values out of range (keys and types are checked against ``defaults``)."""

    @classmethod
    def inert(cls, cfg: Mapping[str, Any]) -> tuple[str, ...]:
        """Knobs that do nothing in the resolved ``cfg`` (e.g. a Swin-only knob on a ViT): left out of its stages'
        identity, so a knob added for one architecture keeps the others' finished stages."""
        return ()

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """The tiny-scale counterpart of the method's size knobs (see repro.scales.TinyRule)."""
        return params

    @classmethod
    def substitutes(cls, params: Mapping[str, Any]) -> list[str]:
        """Parts of this configuration that stand in for something the paper used and the suite cannot have (reports
        print them beside every number the stage produces)."""
        return []

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """Analytic per-image FLOPs of one training step of a resolved pretraining config (``repro.profile.cost``):
        ``{"parts": {name: flops}, "tokens": {name: description}}``; None where the method has no cost model."""
        return None

    @classmethod
    def implementation(cls, cfg: Mapping[str, Any] | None = None) -> type[Any]:
        """The ``nn.Module`` class that runs this method (imports torch); ``cfg`` lets a method pick by arch."""
        return load_class(cls.impl_path)

    @classmethod
    def build(cls, cfg: Mapping[str, Any]) -> Any:
        """The method module for a resolved pretraining config."""
        return cls.implementation(cfg)(cfg)


def load_class(path: str) -> type[Any]:
    """The class at ``"module:Class"``, its module imported on first use (specs never import their implementation)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


METHODS: dict[str, type[MethodSpec]] = {}


def register(spec: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator for a spec in ``repro/methods/specs/``."""
    METHODS[spec.name] = spec
    return spec


def get_spec(name: str) -> type[MethodSpec]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str) -> type[Any]:
    """The implementation class of method ``name`` (imports torch and the method's module)."""
    return get_spec(name).implementation()


def check_ratio(name: str, value: float) -> None:
    if not (0.0 < float(value) < 1.0):
        raise ConfigError(f"method.{name}={value} is outside (0, 1); pass e.g. method.{name}=0.75")


def _discover() -> None:
    from repro.methods import specs

    for m in pkgutil.iter_modules(specs.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{specs.__name__}.{m.name}")


_discover()
