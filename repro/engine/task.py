"""What the engine trains: a *task* is a module whose ``forward(batch, generator)`` returns a ``StepOutput``.

Pretraining methods, the fine-tuning classifier and the linear probe are all tasks. The engine owns the loop; a task
owns its model, its masks (drawn from ``generator``, whose state the engine checkpoints) and its loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class StepOutput:
    """One forward pass: the loss to minimise and scalars worth logging (tensors are reduced only at log steps)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """The engine's view of a trainable module. Optional members, looked up with ``getattr``:
    ``param_groups(optim_cfg) -> list[dict]`` (default: no weight decay on biases and norms),
    ``after_step(step, total_steps)`` (EMA teachers, a method's own schedules) and
    ``find_unused_parameters`` (a DDP flag)."""

    def __call__(self, batch: Any, generator: torch.Generator) -> StepOutput: ...

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]: ...
