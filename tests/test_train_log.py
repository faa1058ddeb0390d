"""The training log: one plain line per logging interval, scalars.csv rows and TensorBoard events with the task's
StepOutput.logs, no duplicate steps after a resume; a non-finite loss fails the stage naming its step."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from repro.engine.dist import DistEnv
from repro.engine.fit import fit
from repro.engine.hooks import SCALARS_FILE, TB_DIR
from repro.engine.task import StepOutput
from repro.resolve import resolve

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LINE = re.compile(r"^\[test\] step (\d+)/12 epoch (\d)/3 loss (\S+) lr (\S+) img/s (\S+) eta (\S+) \| aux (\S+)$")


class Logged(nn.Module):
    """Linear regression that logs an extra scalar (a tensor, as methods do), and can return a NaN loss."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        self.calls += 1
        x, y = batch
        loss = (self.lin(x).squeeze(1) - y).pow(2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach(), "aux": x.abs().mean().detach()})


def _cfg(**over: Any) -> dict[str, Any]:
    """32 samples, batch 8 as 2 micro-batches: 4 steps per epoch, 3 epochs = 12 steps; a line every 2 steps."""
    base = {"optim.epochs": 3, "optim.warmup_epochs": 0.5, "optim.batch_size": 8, "train.batch_per_device": 4,
            "optim.blr": 1.0e-3, "train.log_every": 2}
    base.update(over)
    return resolve("mae", "tiny", [f"{k}={v}" for k, v in base.items()])


def _fit(out: Path, task: Logged | None = None, **over: Any) -> dict[str, Any]:
    torch.manual_seed(7)
    task = task or Logged()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, generator=g))
    return fit(task, data, _cfg(**over), out, env=CPU, desc="test")


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / SCALARS_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def test_one_line_per_interval_csv_and_tensorboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acct = _fit(tmp_path)
    assert acct["completed"]
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err  # no progress bar in a file
    lines = [m for m in map(LINE.match, out.out.splitlines()) if m]
    assert [int(m[1]) for m in lines] == [2, 4, 6, 8, 10, 12]
    assert [int(m[2]) for m in lines] == [1, 1, 2, 2, 3, 3]
    assert lines[-1][6] == "0s" and all(float(m[7]) > 0 for m in lines)  # eta, and the task's own scalar

    rows = _rows(tmp_path)
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "images_per_s", "aux"]  # logs' own "loss" not twice
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(float(r["loss"]) > 0 and float(r["aux"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    # The interval means: the last two steps' mean loss is the mean of their four micro-batch losses, so it lies
    # within the epoch's range, and the epoch-3 history loss is the mean of rows 10 and 12 (2 steps each).
    assert float(rows[-1]["loss"]) + float(rows[-2]["loss"]) == pytest.approx(2 * acct["history"][-1]["loss"],
                                                                             rel=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / TB_DIR).glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / TB_DIR))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/aux", "train/images_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/aux")] == [2, 4, 6, 8, 10, 12]


def test_no_duplicate_steps_after_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stop at step 6 with its checkpoint; a later segment ran to 12 and was lost (its checkpoint replaced by the
    step-6 one, as after a kill before the next save): the resumed run drops rows 8-12 and writes them again."""
    straight = tmp_path / "straight"
    _fit(straight)
    d = tmp_path / "resumed"
    _fit(d, **{"train.max_steps": 6})
    assert [int(r["step"]) for r in _rows(d)] == [2, 4, 6]
    shutil.copy(d / "checkpoints" / "last.pth", tmp_path / "step6.pth")
    _fit(d)
    shutil.copy(tmp_path / "step6.pth", d / "checkpoints" / "last.pth")
    capsys.readouterr()
    _fit(d)
    assert "resumed from" in capsys.readouterr().out
    rows, ref = _rows(d), _rows(straight)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    # Training is exactly the uninterrupted run's: so are the logged losses and the task's scalars.
    for a, b in zip(rows, ref, strict=True):
        assert (a["step"], a["loss"], a["lr"], a["aux"]) == (b["step"], b["loss"], b["lr"], b["aux"])


def test_mid_interval_resume_keeps_the_interval_mean(tmp_path: Path) -> None:
    """A stop at step 5 (mid-interval, mid-epoch): the row of step 6 averages steps 5 and 6 all the same."""
    _fit(tmp_path / "a")
    _fit(tmp_path / "b", **{"train.max_steps": 5})
    _fit(tmp_path / "b")
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    assert [float(r["loss"]) for r in rows_b] == pytest.approx([float(r["loss"]) for r in rows_a], rel=1e-5)


def test_non_finite_loss_fails_naming_the_step(tmp_path: Path) -> None:
    """Checked at log steps, not per step: a NaN in micro-batch 7 (step 3, 0-based) is found at step 4."""
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(seen at step 4\)"):
        _fit(tmp_path, Logged(nan_at=7))
    assert not (tmp_path / "checkpoints" / "last.pth").exists()  # the epoch-end save refused the NaN weights
