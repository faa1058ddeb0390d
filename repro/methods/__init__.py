"""Pretraining methods, one file each, behind ``repro.methods.base.PretrainMethod``.

Every module in this package registers its method on import; all of them are imported here.
"""

from __future__ import annotations

import importlib
import pkgutil

from repro.config import ConfigError
from repro.methods.base import METHODS, PretrainMethod, StepOutput, register

__all__ = ["METHODS", "PretrainMethod", "StepOutput", "get_method", "register"]

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base",) and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def get_method(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
