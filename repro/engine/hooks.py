"""The training loop's hooks: everything around the optimisation step that ``Trainer`` does not own itself.

Each subclasses ``repro.engine.train.HookBase`` and sees the trainer at fixed points of ``Trainer.train``::

    before_train
    for each epoch:  before_epoch
                     for each step:  before_step, run_step (before_update once the gradients are in), after_step
                     epoch_metrics (merged into the epoch's history record), after_epoch
    after_train      (only when the loop ends normally)
    close            (always, also on an exception: release files and signal handlers)
    summary          (after a normal end: merged into what ``train`` returns, the stage's accounting)

A hook with a ``key`` has its ``state_dict()`` saved under that key of the checkpoint and handed back to its
``load_state_dict`` on resume. The default hooks (``repro.engine.fit.default_hooks``), in the order they run:
``Checkpointer`` (resume, save, every RNG state), ``Accounting`` (cost summed over process segments), ``GradNorms``
(per-block gradient norms), ``EpochEval`` (a callable run per epoch, e.g. pretraining's kNN curve), ``TrainLog`` (log
lines, scalars.csv, TensorBoard) and ``Preemption`` (signal -> checkpoint -> ``Preempted``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repro.engine.train import READABLE_VERSIONS, HookBase
from repro.io import CheckpointError, atomic_torch_save, atomic_write_text, load_checkpoint

SCALARS_FILE = "scalars.csv"
TB_DIR = "tb"


# ------------------------------------------------------------------------------------------------------- RNG state
def rng_state(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
        "mask_generator": gen.get_state(),
    }


def set_rng_state(state: Mapping[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    gen.set_state(state["mask_generator"])


# ---------------------------------------------------------------------------------------------------- checkpoints
class Checkpointer(HookBase):
    """Resumes from ``checkpoints/last.pth`` before training; saves it at every epoch end (and a numbered copy every
    ``keep_every`` epochs) and when the loop stops early. Its own state: each rank's RNG streams (python, numpy,
    torch, CUDA, the masking generator) and its sampler position."""

    key = "rng"

    def __init__(self, ckpt_dir: Path, keep_every: int = 0) -> None:
        self.dir = Path(ckpt_dir)
        self.last = self.dir / "last.pth"
        self.keep_every = keep_every
        self._saved_at: int | None = None

    def state_dict(self) -> list[dict[str, Any]]:
        t = self.trainer
        mine = {**rng_state(t.gen), "sampler": {"epoch": t.epoch, "start": t.micro * t.per}}
        if not t.env.distributed:
            return [mine]
        gathered: list[Any] = [None] * t.env.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return gathered

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        t = self.trainer
        mine = state[min(t.env.rank, len(state) - 1)]
        set_rng_state(mine, t.gen)
        if "sampler" in mine:
            t.sampler.set_epoch(mine["sampler"]["epoch"], start=mine["sampler"]["start"])

    def before_train(self) -> None:
        if not self.last.exists():
            return
        ck = load_checkpoint(self.last)
        version = ck.get("version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise CheckpointError(f"{self.last} has checkpoint format {version}; this engine reads {readable}: "
                                  "delete it to train the stage from scratch")
        t = self.trainer
        t.load_state_dict(ck)
        for h in t.hooks:
            if h.key is not None and h.key in ck:
                h.load_state_dict(ck[h.key])
        self._saved_at = t.step
        if t.env.is_main:
            print(f"[{t.desc}] resumed from {self.last} at epoch {t.epoch} step {t.step}", flush=True)

    def save(self, path: Path | None = None) -> None:
        """Write the trainer's and every keyed hook's state (a collective under DDP: every rank calls it)."""
        t = self.trainer
        t.check_finite()
        hooks = {h.key: h.state_dict() for h in t.hooks if h.key is not None}
        if t.env.is_main:
            atomic_torch_save({**t.state_dict(), **hooks}, path or self.last)
        if path is None:
            self._saved_at = t.step

    def after_epoch(self) -> None:
        self.save()
        t = self.trainer
        if self.keep_every and t.epoch % self.keep_every == 0:
            self.save(self.dir / f"epoch-{t.epoch:04d}.pth")

    def after_train(self) -> None:
        if self.trainer.stopped and self._saved_at != self.trainer.step:
            self.save()


# ----------------------------------------------------------------------------------------------------- preemption
class Preempted(Exception):
    """Raised after a checkpoint was written because the process was asked to stop; ``signal`` is the signal."""

    def __init__(self, message: str, signal: int | None = None) -> None:
        super().__init__(message)
        self.signal = signal


class StopFlag:
    """Set by SIGTERM / SIGINT (Ctrl-C) / SIGUSR1 / SIGUSR2 (Slurm preemption, time limit, requeue) while entered;
    the previous handlers are restored on exit. A second Ctrl-C while the checkpoint is pending interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError, OSError):  # not in the main thread: no handler, no preemption
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:  # the first signal says why (USR2 then TERM at a time limit: a requeue)
            self.signal = signum


class Preemption(HookBase):
    """One ``StopFlag`` per trainer, its handlers installed for the run only. After a step in which any process was
    signalled: checkpoint, then raise ``Preempted``. ``flag``: one the caller has installed already (``fit`` does,
    around the trainer's set-up too, so that a signal then is not fatal); else the hook installs its own."""

    def __init__(self, flag: StopFlag | None = None) -> None:
        self.own = flag is None
        self.flag = flag or StopFlag()

    def before_train(self) -> None:
        if self.own:
            self.flag.__enter__()

    def close(self) -> None:
        if self.own:
            self.flag.__exit__()

    def requested(self) -> bool:
        """Under DDP every rank must stop at the same step (the checkpoint is a collective) and a signal may reach
        the ranks at different steps: they agree with one tiny all-reduce."""
        t = self.trainer
        flag = self.flag.signal is not None
        if t.env.distributed:
            v = torch.tensor([float(flag)], device=t.env.device)
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
            flag = bool(v.item())
        return flag

    def after_step(self) -> None:
        t = self.trainer
        if t.stopped or not self.requested():  # a max_steps stop checkpoints anyway
            return
        ckpt = next(h for h in t.hooks if isinstance(h, Checkpointer))
        ckpt.save()
        raise Preempted(f"signal {self.flag.signal} at step {t.step}; checkpoint written to {ckpt.last}",
                        self.flag.signal)


# ----------------------------------------------------------------------------------------------------- accounting
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Accounting(HookBase):
    """Wall time, device-seconds, images and the median step time, summed over the process segments of the stage:
    the totals are kept in the checkpoint, so a stage killed or requeued and resumed reports what it cost in all."""

    key = "accounting"

    def __init__(self) -> None:
        # Cost of the earlier process segments of this stage (up to their last checkpoint).
        self.before: dict[str, Any] = {"wall_s": 0.0, "device_s": 0.0, "images": 0, "segments": 0,
                                       "step_time_s": None}
        self.images = 0
        self.step_times: list[float] = []
        self.t_start = self.t_step = time.perf_counter()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.before.update(state or {})

    def before_train(self) -> None:
        self.t_start = time.perf_counter()

    def before_epoch(self) -> None:
        self.t_step = time.perf_counter()

    def after_step(self) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.t_step)
        self.t_step = now
        self.images += self.trainer.per * self.trainer.accum

    def state_dict(self) -> dict[str, Any]:
        """Cost so far, every segment included (this one: since it started)."""
        b, world = self.before, self.trainer.env.world_size
        seg = time.perf_counter() - self.t_start
        med = float(np.median(self.step_times)) if self.step_times else b["step_time_s"]
        return {"wall_s": b["wall_s"] + seg, "device_s": b["device_s"] + seg * world,
                "images": b["images"] + self.images * world, "segments": b["segments"] + (self.images > 0),
                "step_time_s": med}

    def summary(self) -> dict[str, Any]:
        t = self.trainer
        tot = self.state_dict()
        med, wall = tot["step_time_s"], tot["wall_s"]  # med: None when no segment timed a step
        return {"wall_s": wall, "device_s": tot["device_s"], "images": tot["images"], "segments": tot["segments"],
                "segment_wall_s": time.perf_counter() - self.t_start,
                "images_per_s": tot["images"] / wall if wall > 0 else None,
                "step_time_s": med, "epoch_time_s": med * t.steps_per_epoch if med is not None else None,
                "peak_memory_mb": peak_memory_mb(t.env.device)}


# ------------------------------------------------------------------------------------------------- gradient norms
def encoder_blocks(task: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``task.encoder`` in depth order (ViT ``blocks``; Swin ``layers[i].blocks``)."""
    enc = getattr(task, "encoder", None)
    if enc is not None and hasattr(enc, "blocks"):
        return list(enc.blocks)
    if enc is not None and hasattr(enc, "layers"):
        return [b for layer in enc.layers for b in layer.blocks]
    from repro.config import ConfigError

    raise ConfigError(f"train.grad_norms needs a task with encoder blocks; {type(task).__name__} has none "
                      "(set train.grad_norms=false)")


def block_grad_norms(blocks: list[nn.Module], scale: float = 1.0) -> list[float]:
    """L2 norm of each block's parameter gradient divided by the loss scale (0 for a block without gradients)."""
    out = []
    for b in blocks:
        sq = [p.grad.detach().float().pow(2).sum() for p in b.parameters() if p.grad is not None]
        out.append(float(torch.stack(sq).sum().sqrt()) / scale if sq else 0.0)
    return out


class GradNorms(HookBase):
    """Each encoder block's gradient L2 norm at the last step of every epoch, before clipping (``train.grad_norms``),
    recorded as ``grad_norms`` in the epoch's history."""

    key = "grad_norms"

    def __init__(self, task: nn.Module) -> None:
        self.blocks = encoder_blocks(task)
        self.pending: list[float] | None = None  # measured at the epoch's last step, recorded at its end

    def before_update(self) -> None:
        t = self.trainer
        if t.micro == t.micro_per_epoch:
            self.pending = block_grad_norms(self.blocks, t.scaler.get_scale() if t.scaler.is_enabled() else 1.0)

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        out, self.pending = self.pending, None
        return {"grad_norms": out} if out is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = state.get("pending")


# ----------------------------------------------------------------------------------------------- per-epoch metrics
class EpochEval(HookBase):
    """``fn(epoch)`` after every epoch with the task in eval mode (e.g. pretraining's kNN accuracy curve); what it
    returns goes into the epoch's history record."""

    def __init__(self, fn: Callable[[int], Mapping[str, Any]]) -> None:
        self.fn = fn

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        task = self.trainer.task
        task.eval()
        try:
            return dict(self.fn(epoch))
        finally:
            task.train()


# --------------------------------------------------------------------------------------------------------- logging
def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class TrainLog(HookBase):
    """Every ``log_every`` optimizer steps (and at the last): one plain line on stdout (the stage's log file), one
    row in ``scalars.csv`` and the same scalars in TensorBoard (``tb/``). The values are the means over the interval
    of the loss and of the task's ``StepOutput.logs``; tensors are summed on the device and read once per interval.
    On a terminal a tqdm bar replaces the lines. A resumed run drops the rows past its checkpoint's step."""

    key = "log"

    def __init__(self, out_dir: Path, every: int, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.every = max(1, every)
        self.tensorboard = tensorboard
        self.sums: dict[str, Any] = {}
        self.n = 0
        self.t_interval = time.perf_counter()
        self.steps_in_interval = 0
        self.bar: Any = None
        self.csv: io.TextIOWrapper | None = None
        self.writer: csv.DictWriter | None = None
        self.columns: list[str] | None = None
        self.tb: Any = None

    # ---- state: the interval's partial sums (a resumed interval averages every step it covers)
    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "n": self.n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.n = dict(state.get("sums", {})), int(state.get("n", 0))

    # ---- files
    def before_train(self) -> None:
        t = self.trainer
        if not t.env.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / SCALARS_FILE
        if path.exists():
            self._truncate(path, t.step)
            with path.open(newline="") as f:
                self.columns = next(csv.reader(f), None)
        if self.tensorboard:
            self._open_tensorboard(t.step)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.total_steps, initial=t.step, desc=t.desc, unit="step", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)
        self.t_interval = time.perf_counter()

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        """Keep the header and the rows up to ``step`` (the rows past it are redone by this run)."""
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            path.unlink()
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        if len(keep) < len(rows):
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(keep)
            atomic_write_text(path, buf.getvalue())

    def _open_tensorboard(self, step: int) -> None:
        tb = self.out_dir / TB_DIR
        if step == 0 and tb.exists():  # from scratch: an earlier run's events are no longer this stage's
            for p in tb.glob("events.out.tfevents.*"):
                p.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            print(f"[{self.trainer.desc}] no TensorBoard events ({e})", flush=True)
            return
        # purge_step: TensorBoard hides events at or past it written by an earlier segment after its checkpoint.
        self.tb = SummaryWriter(str(tb), purge_step=step + 1 if step else None, flush_secs=30)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.csv is not None:
            self.csv.close()
            self.csv = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    # ---- per step: device-side sums only
    def after_step(self) -> None:
        t = self.trainer
        if not t.env.is_main:
            return
        for out in t.step_outputs:
            self._add("loss", out.loss)
            for k, v in out.logs.items():
                if k != "loss":  # the task's own copy of the loss
                    self._add(k, v.detach() if isinstance(v, torch.Tensor) else float(v))
        self.n += len(t.step_outputs)
        self.steps_in_interval += 1
        if self.bar is not None:
            self.bar.update(1)
        if t.step % self.every == 0 or t.step == t.total_steps:
            self._emit()

    def _add(self, k: str, v: Any) -> None:
        self.sums[k] = self.sums[k] + v if k in self.sums else v

    def _emit(self) -> None:
        t = self.trainer
        now = time.perf_counter()
        elapsed = now - self.t_interval
        rate = self.steps_in_interval / elapsed if elapsed > 0 else 0.0
        scalars = {k: float(v) / max(1, self.n) for k, v in self.sums.items()}
        row: dict[str, Any] = {"step": t.step, "epoch": t.epoch + 1, "loss": scalars.pop("loss", float("nan")),
                               "lr": t.optimizer.param_groups[0]["lr"],
                               "images_per_s": rate * t.per * t.accum * t.env.world_size, **scalars}
        self.sums, self.n, self.steps_in_interval, self.t_interval = {}, 0, 0, now
        eta = duration((t.total_steps - t.step) / rate) if rate > 0 else "?"
        extra = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", **{k: f"{v:.4g}" for k, v in
                                                                                     scalars.items()}, refresh=False)
        else:
            print(f"[{t.desc}] step {t.step}/{t.total_steps} epoch {row['epoch']}/{t.epochs} loss {row['loss']:.4f} "
                  f"lr {row['lr']:.3e} img/s {row['images_per_s']:.1f} eta {eta}" + (f" | {extra}" if extra else ""),
                  flush=True)
        self._write_row(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, t.step)

    def _write_row(self, row: dict[str, Any]) -> None:
        path = self.out_dir / SCALARS_FILE
        if self.csv is None:
            new = self.columns is None
            self.columns = self.columns or list(row)
            self.csv = path.open("a", newline="")
            self.writer = csv.DictWriter(self.csv, self.columns, restval="", extrasaction="ignore",
                                         lineterminator="\n")
            if new:
                self.writer.writeheader()
        assert self.writer is not None and self.csv is not None
        self.writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.csv.flush()

    def after_epoch(self) -> None:
        """Per-epoch metrics other hooks recorded (e.g. a kNN curve): one line and TensorBoard scalars."""
        t = self.trainer
        if not t.env.is_main or not t.history:
            return
        rec = t.history[-1]
        extra = {k: v for k, v in rec.items() if k not in ("epoch", "step", "loss", "lr") and isinstance(v, float)}
        if not extra:
            return
        if self.bar is None:
            print(f"[{t.desc}] epoch {rec['epoch']}/{t.epochs} loss {rec['loss']:.4f} "
                  + " ".join(f"{k} {v:.4g}" for k, v in extra.items()), flush=True)
        if self.tb is not None:
            for k, v in extra.items():
                self.tb.add_scalar(f"epoch/{k}", v, t.step)
