"""``fit``: a ``Trainer`` with the default hooks, the one call pretraining, fine-tuning and linear probing make."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from repro.engine.dist import DistEnv
from repro.engine.hooks import Accounting, Checkpointer, EpochEval, GradNorms, Preemption, StopFlag, TrainLog
from repro.engine.train import HookBase, Trainer


def default_hooks(task: nn.Module, cfg: Mapping[str, Any], out_dir: str | Path,
                  epoch_hook: Callable[[int], Mapping[str, Any]] | None = None,
                  extra: Sequence[HookBase] = (), stop: StopFlag | None = None) -> list[HookBase]:
    """The hooks ``fit`` trains with, in the order they run (``stop``: a signal flag installed by the caller)."""
    tcfg, out_dir = cfg["train"], Path(out_dir)
    hooks: list[HookBase] = [Checkpointer(out_dir / "checkpoints", tcfg.get("keep_every") or 0), Accounting()]
    if tcfg.get("grad_norms"):
        hooks.append(GradNorms(task))
    if epoch_hook is not None:
        hooks.append(EpochEval(epoch_hook))
    hooks += list(extra)
    hooks += [TrainLog(out_dir, int(tcfg.get("log_every", 50))), Preemption(stop)]
    return hooks


def fit(task: nn.Module, train_set: Dataset, cfg: Mapping[str, Any], out_dir: str | Path, *,
        epoch_hook: Callable[[int], Mapping[str, Any]] | None = None, desc: str = "train",
        env: DistEnv | None = None, hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train ``task`` on ``train_set`` under ``cfg['optim']``/``cfg['train']``, resuming from ``out_dir`` if possible.

    Returns the accounting and per-epoch history. Raises ``Preempted`` after checkpointing when signalled.
    The accounting (wall time, device-seconds, images) sums every process segment of the stage: the totals are
    kept in the checkpoint, so a stage killed or requeued and resumed reports what it cost in all.
    ``epoch_hook(epoch)`` runs after each epoch (task in eval mode) and adds to its record; ``hooks`` are more.
    """
    with StopFlag() as stop:  # from the start: a signal during the set-up stops the run after its first step
        trainer = Trainer(task, train_set, cfg, env=env, desc=desc)
        trainer.register_hooks(default_hooks(task, cfg, out_dir, epoch_hook, hooks, stop))
        return trainer.train()
