"""The method interface every pretraining method implements (one file per method in this package).

A method is an ``nn.Module`` whose ``forward(batch, generator)`` returns a ``StepOutput`` (loss + logs). The engine
owns the optimisation loop; the method owns its model, masks (drawn from ``generator``, whose state is checkpointed)
and loss. After pretraining, ``export()`` gives the encoder as a plain timm-compatible state dict, and ``extras()``
any further tensors an evaluation needs (e.g. ExtreMA's class-attention head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from repro.engine.task import StepOutput
from repro.methods.registry import MethodSpec, check_ratio
from repro.models.vit import compile_once

__all__ = ["PretrainMethod", "StepOutput", "check_ratio"]  # StepOutput and check_ratio re-exported for the methods


class PretrainMethod(MethodSpec, nn.Module):
    """The module side of a method; its class-level facts (``defaults``, ``linear_feature``, ``validate`` ...) come
    from ``MethodSpec``, and each method's class also subclasses its own spec (listed first, so its values win)."""

    encoder: nn.Module

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.params = dict(cfg["method"])
        self.unit_compile: tuple[str, str | None] | None = None

    def compile_extra(self, backend: str = "inductor", mode: str | None = None) -> int:
        """``train.compile_scope=all`` (the engine's ``compile_blocks``): turn on the ``compiled_units``; returns their
        count."""
        self.unit_compile = (backend, mode) if self.compiled_units else None
        return len(self.compiled_units)

    def run_unit(self, name: str, *args: Any) -> Any:
        """``self.<name>(*args)``, through torch.compile (static shapes) once ``compile_extra`` has run."""
        fn = getattr(type(self), name)
        key = self.unit_compile
        if key is None or torch.compiler.is_compiling():
            return fn(self, *args)
        return compile_once(fn, *key, dynamic=False)(self, *args)

    def speed_switch(self, name: str, device: torch.device) -> bool:
        """``train.<name>``, a switch that changes kernels, not results (``embed_visible``, ``sync_free``): None is
        on for CUDA, off elsewhere (the CPU keeps the reference path the oracle tests compare)."""
        value = (self.cfg.get("train") or {}).get(name)
        return device.type == "cuda" if value is None else bool(value)

    def train_transform(self) -> Callable[[Any], Any] | None:
        """Per-image training transform; None means the default RandomResizedCrop + flip + normalise."""
        return None

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (EMA teachers, schedules of the method's own)."""

    def export(self) -> dict[str, torch.Tensor]:
        from repro.models.vit import encoder_state_dict

        return encoder_state_dict(self.encoder)

    def extras(self) -> dict[str, torch.Tensor]:
        """Tensors beside the encoder that an evaluation needs (saved as extras.pth)."""
        return {}

    @classmethod
    def instance_head(cls, cfg: Mapping[str, Any], extras: Mapping[str, torch.Tensor]) -> nn.Module | None:
        """For ``linear_feature = 'instance'``: a module mapping the encoder's output tokens (B, N, D), after its
        final norm, to the instance vector (B, D'), with ``extras`` loaded into it."""
        return None
