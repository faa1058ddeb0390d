"""Pretraining methods: a torch-free spec per method (``repro/methods/specs/``, registered in
``repro.methods.registry``) and its ``nn.Module`` in ``repro/methods/<name>.py`` (imported when first asked for).

Importing this package imports no torch; ``PretrainMethod`` and ``StepOutput`` load ``repro.methods.base`` on access.
"""

from __future__ import annotations

from typing import Any

from repro.methods.registry import METHODS, MethodSpec, get_method, get_spec, register

__all__ = ["METHODS", "MethodSpec", "PretrainMethod", "StepOutput", "get_method", "get_spec", "register"]


def __getattr__(name: str) -> Any:
    if name in ("PretrainMethod", "StepOutput"):
        from repro.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
