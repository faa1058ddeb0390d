"""The one training engine: pretraining, fine-tuning and linear probing all run through ``fit``.

A *task* (``repro.engine.task.Task``) is an ``nn.Module`` whose ``forward(batch, generator)`` returns a
``StepOutput``; it may define ``param_groups(optim_cfg)`` and ``after_step(step, total)``. ``Trainer`` owns the loop
and one optimisation step: AdamW/LARS/SGD with lr = blr x effective batch / 256, per-step warm-up + cosine (timm's
scheduler), gradient accumulation that keeps the recipe's effective batch on any number of devices, autocast (bf16,
or fp16 with a gradient scaler), DDP and clipping. Everything around the step is a hook (``repro.engine.hooks``):
exact checkpoint/resume with every RNG state, preemption, accounting, gradient norms, per-epoch evaluations and
the training log. ``repro.engine.fit.fit`` builds a Trainer with the default hooks.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from timm.optim import Lars, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from repro.config import accumulation
from repro.data.loader import ResumableSampler, SeededDataset
from repro.engine.dist import DistEnv, all_reduce_mean, setup
from repro.engine.task import StepOutput

__all__ = ["CKPT_VERSION", "OPTIMIZERS", "HookBase", "Trainer", "base_lr", "build_optimizer", "build_scheduler",
           "lr_at", "new_iteration"]


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers share the terminal's process group: a Ctrl-C is the training loop's to handle, not theirs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def base_lr(optim: Mapping[str, Any]) -> float:
    return float(optim["lr"]) if optim.get("lr") is not None else float(optim["blr"]) * optim["batch_size"] / 256


def auto_switch(value: bool | None, device: torch.device) -> bool:
    """A speed switch of ``train`` (``compile``, ``fused_optim``, ``sync_free``): None means on for CUDA, off
    elsewhere."""
    return device.type == "cuda" if value is None else bool(value)


def apply_fused_attn(task: nn.Module, value: bool | None, device: torch.device) -> bool | None:
    """The ``train.fused_attn`` switch on ``task``: True / False run every attention layer through SDPA / the explicit
    softmax(QK^T)V (``repro.models.vit.set_fused_attn``); None is True for CUDA (timm's Swin window attention
    included, which timm leaves explicit) and elsewhere leaves each layer as built (SDPA, except timm's Swin window
    attention: the CPU keeps its kernels). Returns the value set, None where nothing was."""
    if value is None and device.type != "cuda":
        return None
    from repro.models.vit import set_fused_attn

    on = auto_switch(value, device)
    set_fused_attn(task, on)
    return on


def sdpa_backends(value: Sequence[str] | None) -> contextlib.AbstractContextManager[Any]:
    """The ``train.sdpa`` switch: SDPA's kernels in priority order (``repro.config.SDPA_NAMES``; one not named is not
    used), as a context for the forward pass (the backward runs the kernel the forward chose; a compiled block keeps
    the one chosen when it was traced). None / empty: torch's own order."""
    if not value:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[v] for v in value], set_priority=True)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def compile_blocks(task: nn.Module, backend: str = "inductor", mode: str | None = None, scope: str | None = None,
                   ) -> int:
    """``torch.compile`` every transformer block of ``task`` in place (``nn.Module.compile``: parameter names and the
    state dict are unchanged); returns how many. Blocks are the members of any ``blocks`` container (ViT, Swin stages,
    decoders, heads): identical blocks share one graph, and the masking, gathers and losses between them stay eager,
    so the masking generator never enters a graph. Static shapes: a recipe's token counts are fixed. ``mode``:
    torch.compile's (``train.compile_mode``; None: its default). Swin blocks also get their visible-only forward
    compiled (``repro.models.swin.compile_visible``: GreenMIM's and LocalMIM's encoder on the visible tokens), and a
    module with a ``compile_extra(backend, mode)`` method compiles what it names there (counted in the return).
    ``scope`` (``train.compile_scope``): ``blocks`` (None) stops at the blocks; ``all`` adds the visible-only Swin
    forward and the methods' units (on an H200 not faster for MAE, and LocalMIM-Swin's first steps took over 130 s:
    docs/PERFORMANCE.md)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from repro.models.swin import compile_visible

    n = 0
    for m in task.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            for b in blocks:
                b.compile(backend=backend, dynamic=False, **({"mode": mode} if mode else {}))
                if isinstance(b, SwinTransformerBlock) and scope == "all":
                    compile_visible(b, backend, mode)
                n += 1
    if scope != "all":
        return n
    for m in task.modules():  # a method's own compiled units (e.g. LocalMIM's decoders, heads and losses)
        extra = getattr(m, "compile_extra", None)
        if callable(extra):
            n += extra(backend, mode)
    return n


def new_iteration() -> None:
    """Tell CUDA graph trees (``train.compile_mode=reduce-overhead``) that a new forward begins: called before every
    training micro-batch and every evaluation batch. Without it each call of a block compiled on its own counts as a
    new iteration under ``no_grad`` (an evaluation pass), and the next block's graph reuses the buffers its input
    lives in. A counter increment: free, and a no-op without CUDA graphs. Outputs kept across iterations (features,
    losses) must be copied: the next iteration overwrites them."""
    torch.compiler.cudagraph_mark_step_begin()


def uses_cuda_graphs(tcfg: Mapping[str, Any], device: torch.device) -> bool:
    """Whether the engine's compiled blocks capture CUDA graphs under the ``train`` section ``tcfg`` on ``device``."""
    return (device.type == "cuda" and auto_switch(tcfg.get("compile"), device)
            and tcfg.get("compile_mode") in CUDA_GRAPH_MODES)


def detach_grads(task: nn.Module) -> None:
    """Replace every ``.grad`` of ``task`` by a copy. Under CUDA graphs a grad first set by a graph's backward can
    live in that graph's output buffers, which the next micro-batch's replay overwrites: with gradient accumulation
    the later micro-batches must add into buffers of their own (torch's advice for cudagraph trees). Parameters
    without a grad keep none: the optimizer skips them as in the plain mode."""
    for p in task.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


# Optimizers by ``optim.name``: name -> builder(param groups, optim section, lr, fused). A new one is a builder
# registered here plus its name in the ``optim.name`` rule of repro.config (which validates recipes without torch).
OptimizerBuilder = Callable[[list[dict[str, Any]], Mapping[str, Any], float, bool], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    def add(builder: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS[name] = builder
        return builder
    return add


@register_optimizer("adamw")
def _adamw(groups: list[dict[str, Any]], optim: Mapping[str, Any], lr: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"],
                             fused=True if fused else None)


@register_optimizer("lars")
def _lars(groups: list[dict[str, Any]], optim: Mapping[str, Any], lr: float, fused: bool) -> torch.optim.Optimizer:
    return Lars(groups, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"])


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], optim: Mapping[str, Any], lr: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"])


def build_optimizer(groups: list[dict[str, Any]], optim: Mapping[str, Any], lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer (``OPTIMIZERS``); ``fused``: AdamW's single-kernel update (else torch's default,
    foreach; the other optimizers ignore it)."""
    name = optim["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name}")
    return OPTIMIZERS[name](groups, optim, lr, fused)


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


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def default_param_groups(task: nn.Module, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """No weight decay on biases and 1-D parameters (norms), as MAE's add_weight_decay."""
    return param_groups_weight_decay(task, optim["weight_decay"])


CKPT_VERSION = 2  # 2: hook states under their keys (grad_norms, log); 1 (no hook states) still loads
READABLE_VERSIONS = (1, 2)


class HookBase:
    """A no-op at every point of the loop; subclasses override what they need. ``trainer`` is set on registration."""

    key: str | None = None  # where this hook's state goes in the checkpoint (None: it has none)
    trainer: Trainer

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def before_update(self) -> None:
        """Gradients of the step are accumulated (still scaled, not clipped); the optimizer has not stepped."""

    def after_step(self) -> None:
        pass

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        """Values to add to the history record of the epoch that just ended (``epoch`` counted from 1)."""
        return {}

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """What this hook adds to the trainer's summary (the stage's accounting) when training ends."""
        return {}

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class Trainer:
    """The training loop and one optimisation step; everything else is a hook (``repro.engine.hooks``).

    ``train()`` runs ``before_train``, then per epoch ``before_epoch`` and per optimizer step ``before_step``,
    ``run_step``, ``after_step``, then the epoch's record (``epoch_metrics`` of every hook) and ``after_epoch``,
    and at the end ``after_train``; ``close`` always. The counters (epoch, step, micro-batch, the epoch's running
    loss, the history) are the trainer's state; each keyed hook saves its own beside them.
    """

    def __init__(self, task: nn.Module, train_set: Dataset, cfg: Mapping[str, Any], *, env: DistEnv | None = None,
                 desc: str = "train") -> None:
        env = env or setup()
        self.task, self.cfg, self.env, self.desc = task, cfg, env, desc
        optim, tcfg = cfg["optim"], cfg["train"]
        self.optim_cfg, self.train_cfg = optim, tcfg
        self.accum = accumulation(cfg, env.world_size)
        self.per = optim["batch_size"] // env.world_size // self.accum
        self.seed = seed = int(cfg.get("seed", 0))
        torch.manual_seed(seed + env.rank)
        np.random.seed(seed + env.rank)
        random.seed(seed + env.rank)
        self.gen = torch.Generator(device=env.device)  # the masking generator: checkpointed with the other RNGs
        self.gen.manual_seed(seed * 7919 + env.rank)

        task.to(env.device)
        apply_fused_attn(task, tcfg.get("fused_attn"), env.device)
        if auto_switch(tcfg.get("compile"), env.device):
            compile_blocks(task, mode=tcfg.get("compile_mode"), scope=tcfg.get("compile_scope"))
        # CUDA graphs: a micro-batch's loss and logs are copied out of the graphs' buffers (the next overwrites them)
        self._graphs = uses_cuda_graphs(tcfg, env.device)
        self.model: nn.Module = task
        if env.distributed:
            self.model = DistributedDataParallel(
                task, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
        groups = task.param_groups(optim) if hasattr(task, "param_groups") else default_param_groups(task, optim)
        self.optimizer = build_optimizer(groups, optim, base_lr(optim),
                                         fused=auto_switch(tcfg.get("fused_optim"), env.device))

        self.data = SeededDataset(train_set, seed)
        # A data set whose batches are finished on the device (data.decode=device: repro.data.device_input) moves
        # them there itself; any other is moved as it is.
        self._to_device: Callable[[Any, torch.device], Any] = getattr(train_set, "to_device", None) or _to
        self.sampler = ResumableSampler(len(self.data), env.world_size, env.rank, seed)
        self.micro_per_epoch = (self.sampler.per_rank // self.per) // self.accum * self.accum
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.data)} training images are too few for an effective batch of "
                             f"{optim['batch_size']}; lower optim.batch_size")
        self.scheduler = build_scheduler(self.optimizer, optim, self.steps_per_epoch)
        self.epochs: int = optim["epochs"]
        self.total_steps = self.epochs * self.steps_per_epoch
        self.max_steps: int | None = tcfg.get("max_steps")
        self.log_every = max(1, int(tcfg.get("log_every", 50)))
        self.precision = resolve_precision(tcfg.get("precision", "auto"), env.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")

        self.epoch = self.step = self.micro = 0
        self.history: list[dict[str, Any]] = []
        # The epoch's running loss is checkpointed: a resumed epoch reports the mean an uninterrupted one would.
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_n = 0
        self.stopped = False  # train.max_steps reached before the last epoch's end
        self.hooks: list[HookBase] = []
        self.step_outputs: list[StepOutput] = []  # this step's micro-batches (loss detached), for the hooks
        self._batches: Iterator[Any] | None = None
        # The first non-finite loss (its step and value), kept on the device: read at log steps and before saving.
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=env.device)
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=env.device)

    # ---- hooks
    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def _call(self, point: str) -> None:
        for h in self.hooks:
            getattr(h, point)()

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "version": CKPT_VERSION,
                "epoch": self.epoch, "step": self.step, "micro": self.micro, "history": self.history,
                "loss_sum": self.loss_sum, "loss_n": self.loss_n}

    def load_state_dict(self, ck: Mapping[str, Any]) -> None:
        self.task.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step, self.micro, self.history = ck["epoch"], ck["step"], ck["micro"], ck["history"]
        self.loss_sum, self.loss_n = ck.get("loss_sum", 0.0), ck.get("loss_n", 0)
        self.scheduler.step_update(self.step)

    def check_finite(self) -> None:
        """Fail the stage, naming the step, if any loss since the start of this process segment was not finite."""
        bad = int(self._bad_step)
        if bad >= 0:
            raise FloatingPointError(f"[{self.desc}] loss is {float(self._bad_loss)} at step {bad} (seen at step "
                                     f"{self.step}); stopping")

    # ---- the loop
    def train(self) -> dict[str, Any]:
        """Train to the end (or to ``train.max_steps``); returns the accounting and the per-epoch history. Raises
        ``Preempted`` after checkpointing when signalled."""
        try:
            self._call("before_train")
            self.task.train()
            while self.epoch < self.epochs and not self.stopped:
                self._run_epoch()
            self._call("after_train")
        except RuntimeError as e:
            if self._graphs and "CUDAGraphs" in str(e):
                raise RuntimeError(f"[{self.desc}] CUDA graphs (train.compile_mode={self.train_cfg['compile_mode']}) "
                                   f"failed: {str(e).splitlines()[0][:300]}; rerun with train.compile_mode=default "
                                   "to train without them") from e
            raise
        finally:
            self._batches = None
            for h in self.hooks:
                h.close()
        return self.summary()

    def _run_epoch(self) -> None:
        self.data.epoch = self.epoch
        self.sampler.set_epoch(self.epoch, start=self.micro * self.per)
        nw = self.train_cfg["num_workers"]
        # The loader draws its base seed from `generator` when an iterator starts; with the default (the global torch
        # RNG) a mid-epoch resume would shift the global stream that drop path etc. use.
        loader = DataLoader(self.data, batch_size=self.per, sampler=self.sampler, num_workers=nw,
                            pin_memory=self.env.device.type == "cuda", drop_last=True, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch),
                            worker_init_fn=_ignore_sigint if nw else None)
        self.loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float32).to(self.env.device).clone()
        self._batches = iter(loader)
        self._call("before_epoch")
        while self.micro < self.micro_per_epoch:
            self._call("before_step")
            self.run_step()
            # a mid-epoch stop; at an epoch end the epoch is closed first
            self.stopped = self.max_steps is not None and self.step >= self.max_steps
            self.stopped = self.stopped and self.micro < self.micro_per_epoch
            if self.step % self.log_every == 0:
                self.check_finite()
            self._call("after_step")
            if self.stopped:
                break
        self._batches = None
        if not self.stopped:
            self._end_epoch()

    def run_step(self) -> None:
        """One optimizer step: ``accum`` micro-batches (forward under autocast, scaled backward; DDP syncs the
        gradients on the last only), then clipping, the optimizer and scaler update, the scheduler and the task's
        ``after_step``."""
        assert self._batches is not None
        env, task, opt = self.env, self.task, self.optimizer
        self.step_outputs = []
        for i in range(self.accum):
            batch = self._to_device(next(self._batches), env.device)
            sync = (self.micro + 1) % self.accum == 0
            ctx = self.model.no_sync() if env.distributed and not sync else contextlib.nullcontext()
            new_iteration()
            with ctx:
                with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None), sdpa_backends(self.train_cfg.get("sdpa")):
                    out = self.model(batch, self.gen)
                self.scaler.scale(out.loss / self.accum).backward()
            loss, logs = out.loss.detach(), out.logs
            if self._graphs:
                loss = loss.clone()
                logs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}
                if i == 0 and self.accum > 1:  # the next micro-batches add into grads that no graph's replay owns
                    detach_grads(task)
            first_bad = ~torch.isfinite(loss) & (self._bad_step < 0)
            self._bad_step = torch.where(first_bad, self.step, self._bad_step)
            self._bad_loss = torch.where(first_bad, loss.float(), self._bad_loss)
            self.loss_sum += loss
            self.loss_n += 1
            self.micro += 1
            self.step_outputs.append(StepOutput(loss, logs))
        self._call("before_update")
        if self.optim_cfg.get("clip_grad"):
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(task.parameters(), self.optim_cfg["clip_grad"])
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(self.step)
        if hasattr(task, "after_step"):
            task.after_step(self.step, self.total_steps)

    def _end_epoch(self) -> None:
        mean_loss = all_reduce_mean(torch.as_tensor(self.loss_sum) / max(1, self.loss_n)).item()
        self.epoch += 1
        self.micro = 0
        self.loss_sum, self.loss_n = 0.0, 0
        record = {"epoch": self.epoch, "step": self.step, "loss": mean_loss,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        for h in self.hooks:
            record.update(h.epoch_metrics(self.epoch))
        self.history.append(record)
        self._call("after_epoch")
        if self.max_steps is not None and self.step >= self.max_steps and self.epoch < self.epochs:
            self.stopped = True

    def summary(self) -> dict[str, Any]:
        acct: dict[str, Any] = {}
        for h in self.hooks:
            acct.update(h.summary())
        return {
            "completed": self.epoch >= self.epochs,
            "epochs": self.epoch, "steps": self.step, "steps_per_epoch": self.steps_per_epoch,
            "accumulation": self.accum, "batch_per_device": self.per, "effective_batch": self.optim_cfg["batch_size"],
            "base_lr": base_lr(self.optim_cfg), **acct, "history": self.history,
            "device": self.env.device.type, "world_size": self.env.world_size,
            "precision": self.precision,  # as run by this process: fp32 | bf16 | fp16 (autocast + GradScaler)
        }
