"""The method interface every pretraining method implements (one file per method in this package).

A method is an ``nn.Module`` whose ``forward(batch, generator)`` returns a ``StepOutput`` (loss + logs). The engine
owns the optimisation loop; the method owns its model, masks (drawn from ``generator``, whose state is checkpointed)
and loss. After pretraining, ``export()`` gives the encoder as a plain timm-compatible state dict, and ``extras()``
any further tensors an evaluation needs (e.g. ExtreMA's class-attention head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from repro.config import ConfigError


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class PretrainMethod(nn.Module):
    name: ClassVar[str]
    # Every knob of the method with its default: the schema of a recipe's `method:` section.
    defaults: ClassVar[dict[str, Any]]
    # The feature linear probing and kNN use (`cls`, `avg`, or `instance` for a method's own head).
    linear_feature: ClassVar[str] = "cls"
    # What the fine-tuning classifier pools (`avg` of patch tokens, or `token`).
    finetune_pool: ClassVar[str] = "avg"
    # Knobs that change what a step computes but not what it costs: left out of the profile key (profile.bench).
    cost_free: ClassVar[tuple[str, ...]] = ()
    # Bumped by any change to the method's code that alters its results: part of its stages' identity (a finished
    # stage made by an older version is recomputed; repro.pipeline.stage.results_version).
    results_version: ClassVar[int] = 1

    encoder: nn.Module

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.params = dict(cfg["method"])

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        """Raise ConfigError for values out of range (keys and types are checked against ``defaults``)."""

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        """The tiny-scale counterpart of the method's size knobs (see repro.scales.TinyRule)."""
        return params

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
    def substitutes(cls, params: Mapping[str, Any]) -> list[str]:
        """Parts of this configuration that stand in for something the paper used and the suite cannot have (reports
        print them beside every number the stage produces)."""
        return []

    @classmethod
    def instance_head(cls, cfg: Mapping[str, Any], extras: Mapping[str, torch.Tensor]) -> nn.Module | None:
        """For ``linear_feature = 'instance'``: a module mapping the encoder's output tokens (B, N, D), after its
        final norm, to the instance vector (B, D'), with ``extras`` loaded into it."""
        return None


METHODS: dict[str, type[PretrainMethod]] = {}


def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    METHODS[cls.name] = cls
    return cls


def check_ratio(name: str, value: float) -> None:
    if not (0.0 < float(value) < 1.0):
        raise ConfigError(f"method.{name}={value} is outside (0, 1); pass e.g. method.{name}=0.75")
