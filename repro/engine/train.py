"""The one training engine: pretraining, fine-tuning and linear probing all run through ``fit``.

A *task* is an ``nn.Module`` whose ``forward(batch, generator)`` returns a ``StepOutput``; it may define
``param_groups(optim_cfg)`` and ``after_step(step, total)``. The engine does the rest: AdamW/LARS/SGD with
lr = blr x effective batch / 256, per-step warm-up + cosine (timm's scheduler), gradient accumulation that keeps the
recipe's effective batch on any number of devices, bf16 autocast on GPU, DDP, clipping, exact checkpoint/resume
(model, optimizer, scheduler, scaler, counters, every RNG including the masking generator), a progress bar, and
accounting (time per step, images/s, peak memory).
"""

from __future__ import annotations

import contextlib
import math
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
from timm.optim import Lars, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from repro.data.loader import ResumableSampler, SeededDataset
from repro.engine.dist import DistEnv, all_reduce_mean, setup
from repro.io import atomic_torch_save, load_checkpoint
from repro.resolve import accumulation

CKPT_VERSION = 1


class Preempted(Exception):
    """Raised after a checkpoint was written because the process was asked to stop; ``signal`` is the signal."""

    def __init__(self, message: str, signal: int | None = None) -> None:
        super().__init__(message)
        self.signal = signal


class StopFlag:
    """One per ``fit`` call, its handlers installed for that call only (the previous ones restored after): set by
    SIGTERM / SIGINT (Ctrl-C) / SIGUSR1 / SIGUSR2 (Slurm preemption, time limit, requeue); the loop then checkpoints
    and raises ``Preempted``. A second Ctrl-C while the checkpoint is pending interrupts at once."""

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


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers share the terminal's process group: a Ctrl-C is the training loop's to handle, not theirs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_requested(env: DistEnv, stop: StopFlag) -> bool:
    """Whether any process was signalled. Under DDP every rank must stop at the same step (the checkpoint is a
    collective), and a signal may reach the ranks at different steps: agree on it with one tiny all-reduce."""
    flag = stop.signal is not None
    if env.distributed:
        t = torch.tensor([float(flag)], device=env.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def base_lr(optim: Mapping[str, Any]) -> float:
    return float(optim["lr"]) if optim.get("lr") is not None else float(optim["blr"]) * optim["batch_size"] / 256


def auto_switch(value: bool | None, device: torch.device) -> bool:
    """A speed switch of ``train`` (``compile``, ``fused_optim``): None means on for CUDA, off elsewhere."""
    return device.type == "cuda" if value is None else bool(value)


def compile_blocks(task: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block of ``task`` in place (``nn.Module.compile``: parameter names and the
    state dict are unchanged); returns how many. Blocks are the members of any ``blocks`` container (ViT, Swin stages,
    decoders, heads): identical blocks share one graph, and the masking, gathers and losses between them stay eager,
    so the masking generator never enters a graph. Static shapes: a recipe's token counts are fixed."""
    n = 0
    for m in task.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            for b in blocks:
                b.compile(backend=backend, dynamic=False)
                n += 1
    return n


def build_optimizer(groups: list[dict[str, Any]], optim: Mapping[str, Any], lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer; ``fused``: AdamW's single-kernel update (else torch's default, foreach)."""
    name = optim["name"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"],
                                 fused=True if fused else None)
    if name == "lars":
        return Lars(groups, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"])
    raise ValueError(f"unknown optimizer {name}")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 autocast on a GPU that supports it, fp16 autocast (with
    a gradient scaler) on one that does not (V100, the hardware of the official LocalMIM / ExtreMA / MAE runs), fp32
    on the CPU; an explicit fp32 / bf16 / fp16 is kept (the engine scales the loss for fp16)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"  # native bf16 from Ampere on


def milestone_steps(optim: Mapping[str, Any], steps_per_epoch: int) -> list[int]:
    """The ``multistep`` schedule's milestones (``optim.milestones``, in epochs) as optimizer steps."""
    return [int(round(m * steps_per_epoch)) for m in optim.get("milestones") or []]


def build_scheduler(opt: torch.optim.Optimizer, optim: Mapping[str, Any], steps_per_epoch: int) -> Scheduler:
    """Per-step (stepped per update) linear warm-up from ``warmup_lr`` (default 0), then ``schedule``: ``cosine``
    (default; half-cosine to ``min_lr``, the MAE schedule) or ``multistep`` (constant, x ``decay_rate`` from each of
    ``milestones``, SimMIM's official schedule)."""
    total = optim["epochs"] * steps_per_epoch
    warm = int(round(optim["warmup_epochs"] * steps_per_epoch))
    warm_lr = float(optim.get("warmup_lr", 0.0))
    if optim.get("schedule", "cosine") == "multistep":
        # timm applies milestone m from step m - 1 (and, with warmup_prefix, counts after the warm-up); SimMIM's
        # official scheduler from step m, counted from the start: hence m + 1 and no prefix.
        steps = [m + 1 for m in milestone_steps(optim, steps_per_epoch)]
        return MultiStepLRScheduler(opt, decay_t=steps, decay_rate=float(optim.get("decay_rate", 0.1)), warmup_t=warm,
                                    warmup_lr_init=warm_lr, warmup_prefix=False, t_in_epochs=False)
    return CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=optim["min_lr"], warmup_t=warm,
                             warmup_lr_init=warm_lr, warmup_prefix=True, t_in_epochs=False)


def lr_at(optim: Mapping[str, Any], steps_per_epoch: int, step: int) -> float:
    """The analytic schedule (for tests and plots): what the lr is during optimizer step ``step`` (0-based)."""
    lr, total = base_lr(optim), optim["epochs"] * steps_per_epoch
    warm = int(round(optim["warmup_epochs"] * steps_per_epoch))
    warm_lr = float(optim.get("warmup_lr", 0.0))
    if step < warm:
        return warm_lr + (lr - warm_lr) * step / warm
    if optim.get("schedule", "cosine") == "multistep":
        passed = sum(step >= m for m in milestone_steps(optim, steps_per_epoch))
        return lr * float(optim.get("decay_rate", 0.1)) ** passed
    t = (step - warm) / max(1, total - warm)
    return optim["min_lr"] + (lr - optim["min_lr"]) * 0.5 * (1 + math.cos(math.pi * t))


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


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


def default_param_groups(task: nn.Module, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """No weight decay on biases and 1-D parameters (norms), as MAE's add_weight_decay."""
    return param_groups_weight_decay(task, optim["weight_decay"])


def fit(task: nn.Module, train_set: Dataset, cfg: Mapping[str, Any], out_dir: str | Path, *,
        epoch_hook: Callable[[int], dict[str, float]] | None = None, desc: str = "train",
        env: DistEnv | None = None) -> dict[str, Any]:
    """Train ``task`` on ``train_set`` under ``cfg['optim']``/``cfg['train']``, resuming from ``out_dir`` if possible.

    Returns the accounting and per-epoch history. Raises ``Preempted`` after checkpointing when signalled.
    The accounting (wall time, device-seconds, images) sums every process segment of the stage: the totals are
    kept in the checkpoint, so a stage killed or requeued and resumed reports what it cost in all.
    """
    with StopFlag() as stop:
        return _fit(task, train_set, cfg, out_dir, epoch_hook=epoch_hook, desc=desc, env=env, stop=stop)


def _fit(task: nn.Module, train_set: Dataset, cfg: Mapping[str, Any], out_dir: str | Path, *,
         epoch_hook: Callable[[int], dict[str, float]] | None, desc: str, env: DistEnv | None,
         stop: StopFlag) -> dict[str, Any]:
    env = env or setup()
    optim, tcfg = cfg["optim"], cfg["train"]
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    accum = accumulation(cfg, env.world_size)
    per = optim["batch_size"] // env.world_size // accum
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed + env.rank)
    np.random.seed(seed + env.rank)
    random.seed(seed + env.rank)
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed * 7919 + env.rank)

    task.to(env.device)
    if auto_switch(tcfg.get("compile"), env.device):
        compile_blocks(task)
    model: nn.Module = task
    if env.distributed:
        model = DistributedDataParallel(task, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                        find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
    groups = task.param_groups(optim) if hasattr(task, "param_groups") else default_param_groups(task, optim)
    opt = build_optimizer(groups, optim, base_lr(optim), fused=auto_switch(tcfg.get("fused_optim"), env.device))

    data = SeededDataset(train_set, seed)
    sampler = ResumableSampler(len(data), env.world_size, env.rank, seed)
    micro_per_epoch = (sampler.per_rank // per) // accum * accum
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training images are too few for an effective batch of "
                         f"{optim['batch_size']}; lower optim.batch_size")
    sched = build_scheduler(opt, optim, steps_per_epoch)
    total_steps = optim["epochs"] * steps_per_epoch
    precision = resolve_precision(tcfg.get("precision", "auto"), env.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")

    state = {"epoch": 0, "step": 0, "micro": 0, "history": [], "version": CKPT_VERSION, "loss_sum": 0.0, "loss_n": 0}
    # Cost of the earlier process segments of this stage (up to their last checkpoint).
    before = {"wall_s": 0.0, "device_s": 0.0, "images": 0, "segments": 0, "step_time_s": None}
    last = ckpt_dir / "last.pth"
    if last.exists():
        ck = load_checkpoint(last)
        task.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][min(env.rank, len(ck["rng"]) - 1)], gen)
        state.update({k: ck[k] for k in ("epoch", "step", "micro", "history")})
        state.update({k: ck[k] for k in ("loss_sum", "loss_n") if k in ck})
        before.update(ck.get("accounting") or {})
        sched.step_update(state["step"])
        if env.is_main:
            print(f"[{desc}] resumed from {last} at epoch {state['epoch']} step {state['step']}", flush=True)

    def save(path: Path) -> None:
        rngs = [rng_state(gen)]
        if env.distributed:
            gathered: list[Any] = [None] * env.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if env.is_main:
            atomic_torch_save({"model": task.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                               "accounting": totals(), **state}, path)  # counters, history, the epoch's loss

    def totals() -> dict[str, Any]:
        """Cost so far, every segment included (this one: since it started)."""
        seg = time.perf_counter() - t_start
        med = float(np.median(step_times)) if step_times else before["step_time_s"]
        return {"wall_s": before["wall_s"] + seg, "device_s": before["device_s"] + seg * env.world_size,
                "images": before["images"] + images * env.world_size, "segments": before["segments"] + (images > 0),
                "step_time_s": med}

    step_times: list[float] = []
    images = 0
    t_start = time.perf_counter()
    max_steps = tcfg.get("max_steps")
    bar = tqdm(total=total_steps, initial=state["step"], desc=desc, unit="step", disable=not env.is_main,
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    stopped = False
    gn_blocks = encoder_blocks(task) if tcfg.get("grad_norms") else None
    task.train()
    while state["epoch"] < optim["epochs"] and not stopped:
        epoch = state["epoch"]
        data.epoch = epoch
        sampler.set_epoch(epoch, start=state["micro"] * per)
        # The loader draws its base seed from `generator` when an iterator starts; with the default (the global torch
        # RNG) a mid-epoch resume would shift the global stream that drop path etc. use.
        loader = DataLoader(data, batch_size=per, sampler=sampler, num_workers=tcfg["num_workers"],
                            pin_memory=env.device.type == "cuda", drop_last=True,
                            persistent_workers=False, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
                            worker_init_fn=_ignore_sigint if tcfg["num_workers"] else None)
        # The epoch's running loss is checkpointed: a resumed epoch reports the mean an uninterrupted one would.
        loss_sum = torch.as_tensor(state["loss_sum"], dtype=torch.float32).to(env.device).clone()
        loss_n = state["loss_n"]
        t_step = time.perf_counter()
        epoch_gn: list[float] | None = None
        for batch in loader:
            if state["micro"] >= micro_per_epoch:
                break
            sync = (state["micro"] + 1) % accum == 0
            batch = _to(batch, env.device)
            ctx = model.no_sync() if env.distributed and not sync else contextlib.nullcontext()
            with ctx, torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(batch, gen)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{desc}] loss is {loss.item()} at step {state['step']}; stopping")
            with ctx:
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            loss_n += 1
            state["loss_sum"], state["loss_n"] = loss_sum, loss_n
            state["micro"] += 1
            images += per
            if not sync:
                continue
            if gn_blocks is not None and state["micro"] == micro_per_epoch:  # the epoch's last step, before clipping
                epoch_gn = block_grad_norms(gn_blocks, scaler.get_scale() if scaler.is_enabled() else 1.0)
            if optim.get("clip_grad"):
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(task.parameters(), optim["clip_grad"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            sched.step_update(state["step"])
            if hasattr(task, "after_step"):
                task.after_step(state["step"], total_steps)
            now = time.perf_counter()
            step_times.append(now - t_step)
            t_step = now
            bar.update(1)
            if state["step"] % max(1, tcfg.get("log_every", 50)) == 0:
                bar.set_postfix(loss=f"{(loss_sum / max(1, loss_n)).item():.4f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            if max_steps is not None and state["step"] >= max_steps and state["micro"] < micro_per_epoch:
                stopped = True  # mid-epoch stop; at an epoch end the epoch is closed first (below)
                break
            if _stop_requested(env, stop):
                save(last)
                bar.close()
                raise Preempted(f"signal {stop.signal} at step {state['step']}; checkpoint written to {last}",
                                stop.signal)
        if stopped:
            break
        mean_loss = all_reduce_mean(loss_sum / max(1, loss_n)).item()
        state["epoch"] += 1
        state["micro"] = 0
        state["loss_sum"], state["loss_n"] = 0.0, 0
        record = {"epoch": state["epoch"], "step": state["step"], "loss": mean_loss, "lr": opt.param_groups[0]["lr"]}
        if epoch_gn is not None:
            record["grad_norms"] = epoch_gn
        if epoch_hook is not None:
            task.eval()
            record.update(epoch_hook(state["epoch"]))
            task.train()
        state["history"].append(record)
        save(last)
        keep = tcfg.get("keep_every") or 0
        if keep and state["epoch"] % keep == 0:
            save(ckpt_dir / f"epoch-{state['epoch']:04d}.pth")
        if max_steps is not None and state["step"] >= max_steps and state["epoch"] < optim["epochs"]:
            stopped = True
            break
    if stopped:
        save(last)
    bar.close()
    tot = totals()
    med, wall = tot["step_time_s"], tot["wall_s"]  # med: None when no segment timed a step
    return {
        "completed": state["epoch"] >= optim["epochs"],
        "epochs": state["epoch"], "steps": state["step"], "steps_per_epoch": steps_per_epoch,
        "accumulation": accum, "batch_per_device": per, "effective_batch": optim["batch_size"],
        "base_lr": base_lr(optim), "wall_s": wall, "device_s": tot["device_s"], "images": tot["images"],
        "segments": tot["segments"], "segment_wall_s": time.perf_counter() - t_start,
        "images_per_s": tot["images"] / wall if wall > 0 else None,
        "step_time_s": med, "epoch_time_s": med * steps_per_epoch if med is not None else None,
        "peak_memory_mb": peak_memory_mb(env.device), "history": state["history"],
        "device": env.device.type, "world_size": env.world_size,
        "precision": precision,  # as run by this process: fp32 | bf16 | fp16 (autocast + GradScaler)
    }
