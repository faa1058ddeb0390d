"""Timed training steps of a method at its PAPER configuration on the current device, and the projection of the
measured time to the paper's schedule.

What a step is: the method's forward with its own loss, backward, AdamW step and the method's ``after_step`` (EMA
teachers), on random images shaped as the method's training transform shapes them (so two-view methods get two
views). As the engine: bf16 autocast on a GPU, fp32 on the CPU, transformer blocks compiled and fused AdamW on a GPU
(``train.compile`` / ``train.fused_optim``; ``repro profile --compile/--fused-optim`` override); attention goes
through ``F.scaled_dot_product_attention`` (timm's fused attention and our relative-position attention both), which
picks the fused kernel of the device. Batch: on a CPU small batches (8 at <= 224 px, 4 above; say so in the
outputs); on a GPU the largest of {256, 128, 64, 48, 32} that fits (the LocalMIM appendix's rule). The data loader's
images/s is measured beside the model's, so a table shows when loading would be the bottleneck: the method's own
per-image transform on decoded images (``loader_images_per_s``, no JPEG decoding: an upper bound), and on real JPEG
files written for the benchmark (``jpeg_loader_bench``) both ways a recipe can load them: decoded by PIL in the
``train.num_workers`` workers (``data.decode: cpu``) and decoded and augmented on the device (``data.decode: device``).

Evaluation steps (``profile_config`` of a finetune / linear / knn config), built by the evaluations' own code
(``repro.evals``): fine-tuning, the ``Classifier``'s forward + backward + the recipe's optimizer step at the recipe's
resolution (Mixup/CutMix left out, like the loader: the step gets the soft targets they would give); linear probing,
the ``LinearProbe``'s step (frozen encoder forward, BatchNorm + linear head trained by the recipe's optimizer); kNN,
the feature extraction of ``run_knn``: the encoder's (+ instance head's) forward, in fp32 and eager as that runner
does it whatever the speed switches (no autocast, nothing compiled). No loader figures for these.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repro.config import ConfigError

# The pure arithmetic (dataset sizes, cost key, projection) is torch-free, for planning; re-exported here.
from repro.profile.flops import batch_size_of, flops_per_image, register_attention_formulas
from repro.profile.projection import DATASET_SIZES, cost_key, project, step_kind, train_images  # noqa: F401

GPU_BATCHES = (256, 128, 64, 48, 32)


def cpu_batch(img_size: int) -> int:
    """The CPU batch: 8 images at <= 224 px, 4 above (a CPU step of ViT-B takes seconds)."""
    return 8 if img_size <= 224 else 4


def build_method(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The method of a resolved config, ready to step on random images: a data-fitted codebook tokenizer (our
    BEiT's k-means stand-in for the dVAE) gets a random codebook (the step's cost does not depend on its values)."""
    from repro.methods import get_method

    method = get_method(cfg["method"]["name"])(cfg)
    tok = getattr(method, "tokenizer", None)
    if tok is not None and hasattr(tok, "codebook") and hasattr(tok, "fitted") and not tok.ready:
        with torch.no_grad():
            tok.codebook.normal_(generator=torch.Generator().manual_seed(0))
            tok.fitted.fill_(True)
    return method


def _transform(method: Any, cfg: Mapping[str, Any]) -> Any:
    from repro.data.datasets import crop_flip_transform

    return method.train_transform() or crop_flip_transform(cfg["data"])


def _random_image(seed: int, size: tuple[int, int] = (500, 375)) -> Any:
    """A decoded ImageNet-sized image (the median ImageNet image is about 500 x 375)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _like(x: Any, n: int, gen: torch.Generator, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.randn((n, *x.shape), generator=gen).to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_like(v, n, gen, device) for v in x)
    raise ConfigError(f"the method's training transform gives a {type(x).__name__}; the profiler handles tensors "
                      "and tuples of tensors")


def random_batch(method: Any, cfg: Mapping[str, Any], n: int, device: torch.device, seed: int = 0) -> Any:
    """``(images, labels)`` of random values shaped as the method's training transform's output."""
    sample = _transform(method, cfg)(_random_image(seed))
    gen = torch.Generator().manual_seed(seed)
    return (_like(sample, n, gen, device), torch.zeros(n, dtype=torch.long, device=device))


def method_flops_per_image(cfg: Mapping[str, Any], batch_size: int = 1, seed: int = 0) -> dict[str, float]:
    """Build the method of a resolved pretraining config on the CPU and count one step on random images."""
    method = build_method(cfg)
    method.train()
    batch = random_batch(method, cfg, batch_size, torch.device("cpu"), seed)
    gen = torch.Generator().manual_seed(seed)
    return flops_per_image(method, batch, gen)


def attention_impl(device: torch.device) -> str:
    """How attention runs in our models on ``device`` (named beside every ratio)."""
    from timm.layers import use_fused_attn

    fused = use_fused_attn()
    kernel = {"cpu": "CPU flash kernel",
              "cuda": "flash kernel; memory-efficient kernel where a relative-position bias is added"
              }.get(device.type, device.type)
    return f"fused SDPA ({kernel})" if fused else "explicit softmax(QK^T)V for timm blocks, SDPA for rel-pos blocks"


# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity) that MFU is stated against; first match of the name.
PEAK_BF16_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "NVIDIA H100 PCIe dense bf16 peak 756 TFLOP/s", 756e12),
    ("H100 NVL", "NVIDIA H100 NVL dense bf16 peak 835 TFLOP/s", 835e12),
    ("H100", "NVIDIA H100 SXM dense bf16 peak 989 TFLOP/s", 989e12),
    ("H200", "NVIDIA H200 dense bf16 peak 989 TFLOP/s", 989e12),
    ("A100", "NVIDIA A100 dense bf16 peak 312 TFLOP/s", 312e12),
)


def peak_flops(device: torch.device) -> tuple[float, str] | None:
    """(FLOP/s, its name) of the device's dense bf16 peak, or None where none is known (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((f, label) for key, label, f in PEAK_BF16_FLOPS if key in name), None)


def dynamo_graphs() -> int:
    """Graphs torch.compile has made in this process so far (a new one after warm-up is a recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _Steps:
    """Forward / backward / AdamW / after_step on one fixed random batch."""

    def __init__(self, method: Any, cfg: Mapping[str, Any], batch_size: int, device: torch.device, seed: int = 0,
                 compile: bool | None = None, fused_optim: bool | None = None, batch: Any = None) -> None:
        from repro.engine.train import (
            apply_fused_attn,
            auto_switch,
            build_optimizer,
            compile_blocks,
            default_param_groups,
        )

        self.method, self.device = method.to(device), device
        self.method.train()
        # As the engine: the recipe's switches (None: on for CUDA), unless the caller fixes them.
        tcfg = cfg.get("train", {})
        self.compile = auto_switch(tcfg.get("compile") if compile is None else compile, device)
        self.fused_optim = auto_switch(tcfg.get("fused_optim") if fused_optim is None else fused_optim, device)
        self.fused_attn = apply_fused_attn(self.method, tcfg.get("fused_attn"), device)  # before compiling
        self.sdpa = tcfg.get("sdpa") or None
        self.compile_mode = tcfg.get("compile_mode") if self.compile else None
        self.compile_scope = (tcfg.get("compile_scope") or "blocks") if self.compile else None
        self.compiled_blocks = (compile_blocks(self.method, mode=self.compile_mode, scope=self.compile_scope)
                                if self.compile else 0)
        optim = dict(cfg["optim"])
        if "method" in cfg and optim.get("name") != "adamw":  # pretraining; an evaluation keeps its recipe's
            optim["name"] = "adamw"
        groups = (method.param_groups(optim) if hasattr(method, "param_groups")
                  else default_param_groups(method, optim))
        # a tiny lr: random inputs must not blow the weights up
        self.opt = build_optimizer(groups, optim, 1e-6, fused=self.fused_optim)
        self.batch = random_batch(method, cfg, batch_size, device, seed) if batch is None else _to_device(batch,
                                                                                                          device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        self.step_no = 0

    def __call__(self) -> float:
        from repro.engine.train import new_iteration, sdpa_backends

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        new_iteration()  # as the engine's step
        with (torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None),
              sdpa_backends(self.sdpa)):
            out = self.method(self.batch, self.gen)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        if hasattr(self.method, "after_step"):
            self.method.after_step(self.step_no, 10**6)
        sync()
        return time.perf_counter() - t0


def timed_steps(make: Callable[[], Any], device: torch.device, warmup: int, steps: int,
                ) -> tuple[Any, list[float], list[float], int, int]:
    """Build a step runner with ``make()`` after a dynamo reset (each config compiles afresh: no recompile limit
    reached across a table's configs) and a reset of the device's peak memory (this config's, not the process's),
    run ``warmup`` untimed steps, then ``steps`` timed ones. Returns (runner, [the first step's time, compilation
    included] or [], the timed steps' times, dynamo graphs before the first step, after it)."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs0 = dynamo_graphs()
    run = make()
    first = [run() for _ in range(min(1, warmup))]
    graphs1 = dynamo_graphs()
    for _ in range(warmup - len(first)):
        run()
    return run, first, [run() for _ in range(steps)], graphs0, graphs1


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# -- evaluation steps -------------------------------------------------------------------------------------------------


class KnnFeatures(torch.nn.Module):
    """``run_knn``'s feature extractor: the evaluation encoder (+ the input's instance head) in eval mode."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        from repro.evals.features import eval_encoder, feature_kind, instance_head

        self.encoder = eval_encoder(cfg, cfg.get("init")).eval()
        self.kind = feature_kind(cfg)
        self.head = instance_head(cfg, cfg.get("init"))
        if self.head is not None:
            self.head.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from repro.evals.features import features

        return features(self.encoder, x, self.kind, self.head)


def build_eval_task(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The module an evaluation stage trains (or, kNN, runs), built by its own runner's code: ``Classifier``
    (fine-tuning: Mixup/CutMix off, ``eval_batch`` gives the soft targets they would), ``LinearProbe``, or
    ``KnnFeatures``. ``cfg["init"]``: the input encoder (random when absent)."""
    step = step_kind(cfg)
    if step == "finetune":
        from repro.evals.finetune import Classifier

        task: torch.nn.Module = Classifier(cfg, cfg["data"]["num_classes"])
        task.soft_targets = task.mixup is not None  # type: ignore[assignment]
        task.mixup = None  # type: ignore[assignment]
        return task
    if step == "linear":
        from repro.evals.linear import LinearProbe

        return LinearProbe(cfg, cfg["data"]["num_classes"])
    if step == "knn":
        return KnnFeatures(cfg)
    raise ConfigError(f"repro profile times pretraining, finetune, linear and knn steps, not {cfg.get('kind')}")


def eval_batch(task: torch.nn.Module, cfg: Mapping[str, Any], n: int, seed: int = 0) -> Any:
    """Random images at the recipe's resolution (CPU) and labels: class 0, as soft targets where the fine-tuning
    trains on Mixup's (one-hot, label-smoothed), none for kNN."""
    from timm.data.mixup import one_hot

    size = cfg["data"]["img_size"]
    x = torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    if isinstance(task, KnnFeatures):
        return x
    y = torch.zeros(n, dtype=torch.long)
    if getattr(task, "soft_targets", False):
        c = cfg["data"]["num_classes"]
        s = float(cfg["aug"]["smoothing"])
        y = one_hot(y, c, on_value=1.0 - s + s / c, off_value=s / c)
    return (x, y)


class _Forward:
    """kNN feature extraction on one fixed batch, as ``run_knn`` runs it (fp32, eager, no gradients)."""

    def __init__(self, task: KnnFeatures, batch: torch.Tensor, device: torch.device) -> None:
        self.task, self.device = task.to(device), device
        self.batch = batch.to(device)
        self.compile, self.fused_optim, self.fused_attn, self.compile_mode, self.compiled_blocks = (False, False, None,
                                                                                                    None, 0)
        self.sdpa = self.compile_scope = None

    def __call__(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.task(self.batch)
        sync()
        return time.perf_counter() - t0


def eval_flops_per_image(task: torch.nn.Module, batch: Any) -> dict[str, float]:
    """Counted FLOPs per image of an evaluation step on ``batch`` (CPU): forward + backward (``flops_per_image``) for
    a trained task, the forward only for kNN."""

    if not isinstance(task, KnnFeatures):
        task.train()
        return flops_per_image(task, batch, torch.Generator().manual_seed(0))
    from torch.utils import flop_counter as fc

    register_attention_formulas()
    with fc.FlopCounterMode(display=False) as mode:
        task(batch)
    f = mode.get_total_flops() / batch_size_of((batch,))
    return {"forward": f, "backward": 0.0, "total": f}


# Kernel-name parts -> category of device time in a trace (first match wins; the rest is "other").
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm80", "ampere", "triton_tem", "mm_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    # before copy / fill: Inductor names its fused kernels after their ops (triton_per_fused__to_copy_add_...)
    ("fused pointwise / norm (triton)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "catarray", "index", "gather", "scatter")),
    ("pointwise / norm (eager)", ("elementwise", "vectorized", "reduce", "norm", "softmax")),
)


def _category(name: str) -> str:
    low = name.lower()
    return next((c for c, parts in KERNEL_CATEGORIES if any(p in low for p in parts)), "other")


# Top-level host events (torch.profiler, no parent op) by what they are; the rest are ops called from Python.
HOST_CALL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compiled", ("Torch-Compiled Region", "CompiledFunction", "TorchDynamo Cache Lookup")),
    ("grad accumulation", ("AccumulateGrad",)),
    ("autograd", ("autograd::engine::evaluate_function",)),
    ("optimizer", ("Optimizer.",)),
)


def host_calls(events: Any, steps: int) -> dict[str, Any]:
    """What the host dispatches per step, from a torch.profiler event list: the top-level events (ops called from
    Python, autograd nodes run by the backward, compiled-graph calls and their guards, the optimizer's step) by kind,
    and on a GPU the kernels and copies launched. A count, not a time: it does not depend on the host's speed, so a
    change to the eager glue between compiled blocks can be checked on a CPU (a step whose host work takes longer than
    its kernels leaves the device idle)."""
    by_kind: dict[str, int] = {}
    kernels = 0
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels += 1
            continue
        if e.cpu_parent is not None:
            continue
        kind = next((k for k, parts in HOST_CALL_KINDS if any(p in e.name for p in parts)), "eager ops")
        by_kind[kind] = by_kind.get(kind, 0) + 1
    per = max(1, steps)
    return {"host_calls_per_step": sum(by_kind.values()) / per,
            "host_calls_by_kind": {k: v / per for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernels_per_step": kernels / per if kernels else None}


def trace_steps(run: Any, steps: int, out: Path, label: str, rows: int = 30) -> dict[str, Any]:
    """Run ``steps`` more steps of ``run`` under torch.profiler; write ``out/label.txt`` (the ops and kernels by
    self time on the device, or the CPU without one) and return a summary: wall time per step, device busy time per
    step (the kernels' summed time: idle = the device waiting on the host), busy time by kernel category, and the
    host's calls per step by kind (``host_calls``; kernels launched on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        wall = sum(run() for _ in range(steps))
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=rows)
    out.mkdir(parents=True, exist_ok=True)
    from repro.io import atomic_write_text

    calls = host_calls(prof.events(), steps)
    kinds = ", ".join(f"{k} {v:g}" for k, v in calls["host_calls_by_kind"].items())
    launched = f"; {calls['kernels_per_step']:g} kernels" if calls["kernels_per_step"] else ""
    atomic_write_text(out / f"{label}.txt", f"{label}: {steps} steps, {wall / steps * 1e3:.1f} ms per step (wall)\n"
                      f"host calls per step: {calls['host_calls_per_step']:g} ({kinds}){launched}\n" + table + "\n")
    by_cat: dict[str, float] = {}
    busy = 0.0
    if cuda:
        for e in events:
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                t = float(getattr(e, "self_device_time_total", 0.0)) / 1e6  # us -> s
                busy += t
                by_cat[_category(e.key)] = by_cat.get(_category(e.key), 0.0) + t
    per = wall / steps
    return {"label": label, "steps": steps, "wall_s_per_step": per, **calls,
            "device_busy_s_per_step": busy / steps if cuda else None,
            "device_idle_fraction": max(0.0, 1 - busy / wall) if cuda and wall > 0 else None,
            "device_s_per_step_by_category": {k: v / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "table": f"{out / label}.txt"}


def trace_label(cfg: Mapping[str, Any], batch: int, run: Any) -> str:
    """A pretraining trace's file stem: recipe, size, batch and mode (compile mode and ``compile_scope=all`` named, so
    that one job's runs of a recipe in several modes keep a trace each)."""
    mode = ("compiled" + (f"-{run.compile_mode}" if run.compile_mode else "")
            + ("-scope-all" if run.compile_scope == "all" else "")) if run.compile else "eager"
    return f"{cfg.get('recipe') or cfg['method']['name']}-{cfg['data']['img_size']}-b{batch}-{mode}"


def choose_batch(cfg: Mapping[str, Any], device: torch.device, build: Any = build_method,
                 steps_for: Any = None) -> tuple[int, str]:
    """(batch, why): the CPU rule, or on a GPU the largest of GPU_BATCHES for which two steps fit in memory
    (``steps_for(batch)``: the eager step to probe with; default: the pretraining method's)."""
    if device.type != "cuda":
        b = cpu_batch(cfg["data"]["img_size"])
        return b, f"CPU: small batch ({b} at {cfg['data']['img_size']} px), not the paper's"
    for b in GPU_BATCHES:
        try:
            steps = (steps_for(b) if steps_for is not None
                     else _Steps(build(cfg), cfg, b, device, compile=False))  # memory probe: eager
            steps()
            steps()
            del steps
            torch.cuda.empty_cache()
            return b, f"largest of {list(GPU_BATCHES)} that fits"
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    raise ConfigError(f"even a batch of {GPU_BATCHES[-1]} does not fit on {device_name(device)}")


def loader_images_per_s(method: Any, cfg: Mapping[str, Any], batch_size: int, num_batches: int = 3,
                        num_workers: int | None = None) -> float:
    """Images/s of a DataLoader running the method's per-image training transform on decoded random images."""
    tf = _transform(method, cfg)
    n = batch_size * num_batches
    workers = int(cfg["train"]["num_workers"] if num_workers is None else num_workers)

    class _Decoded(Dataset):
        def __init__(self) -> None:
            self.img = _random_image(1)

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> Any:
            return tf(self.img), 0

    loader = DataLoader(_Decoded(), batch_size=batch_size, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    t0 = time.perf_counter()
    count = 0
    for x, _ in it:
        count += x[0].shape[0] if isinstance(x, (list, tuple)) else x.shape[0]
    return count / max(time.perf_counter() - t0, 1e-9)


# -- the loader on real JPEG files: the CPU path (PIL in the workers) and the device path (data.decode=device) -------

JPEG_SIZE = (500, 375)  # (w, h): the median ImageNet training image
JPEG_QUALITY = 90
_JPEG_DIRS: dict[tuple[int, tuple[int, int], int, int], Any] = {}
_JPEG_RESULTS: dict[tuple[Any, ...], dict[str, Any]] = {}


def write_jpegs(n: int = 64, size: tuple[int, int] = JPEG_SIZE, quality: int = JPEG_QUALITY, seed: int = 0,
                folder: str | None = None) -> list[str]:
    """Paths of ``n`` ImageNet-like JPEG files (``size`` (w, h), every fourth one portrait; smooth colour fields with
    texture and sensor-like noise: ~100 KB each at 500x375, quality 90, as ImageNet's average file), written once per
    process into a temporary folder removed at exit (or into ``folder``)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from PIL import Image

    key = (n, tuple(size), quality, seed)
    if folder is None and key in _JPEG_DIRS:
        return sorted(str(p) for p in Path(_JPEG_DIRS[key]).glob("*.jpg"))
    if folder is None:
        folder = tempfile.mkdtemp(prefix="repro-jpegs-")
        atexit.register(shutil.rmtree, folder, True)
        _JPEG_DIRS[key] = folder
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        w, h = size if k % 4 else size[::-1]
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        mid = Image.fromarray(rng.integers(0, 256, (94, 125, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = 0.6 * np.asarray(low, np.float32) + 0.4 * np.asarray(mid, np.float32) + rng.normal(0, 16, (h, w, 3))
        path = Path(folder) / f"{k:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
        paths.append(str(path))
    return paths


class _JpegFiles(Dataset):
    """The CPU path: each file opened and decoded with PIL (as ImageFolder's loader), then ``tf``."""

    def __init__(self, paths: list[str], tf: Any, n: int) -> None:
        self.paths, self.tf, self.n = paths, tf, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i % len(self.paths)]) as im:
            return self.tf(im.convert("RGB")), 0


def _batch_images(x: Any) -> int:
    return x[0].shape[0] if isinstance(x, (list, tuple)) else x.shape[0]


def _transform_key(tf: Any) -> str:
    """What the loader's cost depends on in a transform (its class and settings, not its identity)."""
    from torchvision.transforms import Compose

    return repr(tf) if isinstance(tf, Compose) else f"{type(tf).__qualname__}{sorted(vars(tf).items())}"


def jpeg_loader_bench(method: Any, cfg: Mapping[str, Any], batch_size: int, *, num_workers: int | None = None,
                      device: torch.device | None = None, files: int = 64,
                      num_batches: int | None = None) -> dict[str, Any]:
    """Images/s of the training input on real JPEG files (``write_jpegs``; index i reads file i mod ``files``), at
    ``batch_size`` with ``num_workers`` loader workers (default ``train.num_workers``), seeded per batch as in
    training (``SeededDataset``):

    - ``loader_jpeg_cpu_images_per_s``: the CPU path (``data.decode: cpu``): workers decode with PIL and run the
      method's own transform; timed from the loader's start (worker start-up included) over ``num_batches``
      (default: 2 per worker, at least 3), so every worker delivers more than one batch;
    - ``loader_jpeg_device_images_per_s``: the device path (``data.decode: device``): workers read bytes and draw
      the crops, ``to_device`` decodes and augments on ``device`` (the profile's: nvJPEG on a GPU); one warm-up
      batch, then ``num_batches`` timed, synchronised. None where the method's transform has no device path
      (``loader_jpeg["device_path"]`` says why).

    Measured once per process for each transform, batch, worker count and device."""
    from repro.data.device_input import EncodedImages, device_plan
    from repro.data.loader import SeededDataset

    device = device or torch.device("cpu")
    tf = _transform(method, cfg)
    workers = int(cfg["train"]["num_workers"] if num_workers is None else num_workers)
    nb = num_batches or max(3, 2 * workers)
    key = (_transform_key(tf), batch_size, workers, str(device), files, nb)
    if key in _JPEG_RESULTS:
        return _JPEG_RESULTS[key]
    paths = write_jpegs(files)
    n = batch_size * nb
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loader(ds: Dataset) -> DataLoader:
        return DataLoader(SeededDataset(ds, 0), batch_size=batch_size, num_workers=workers, drop_last=True,
                          pin_memory=device.type == "cuda", persistent_workers=False)

    t0 = time.perf_counter()
    count = sum(_batch_images(x) for x, _ in loader(_JpegFiles(paths, tf, n)))
    cpu = count / max(time.perf_counter() - t0, 1e-9)

    dev: float | None = None
    note = f"workers read bytes; decode + crop + flip + normalise on {device.type}"
    try:
        plan = device_plan(tf, cfg["data"])
    except ConfigError as e:
        note = str(e)
    else:
        ds = EncodedImages([(paths[i % len(paths)], 0) for i in range(n + batch_size)], plan)
        it = iter(loader(ds))
        ds.to_device(next(it), device)  # warm-up: decoder and allocator set up
        sync()
        t0, count = time.perf_counter(), 0
        for batch in it:
            x, _ = ds.to_device(batch, device)
            count += _batch_images(x)
        sync()
        dev = count / max(time.perf_counter() - t0, 1e-9)
    from pathlib import Path

    sizes = [Path(p).stat().st_size for p in paths]
    out = {"loader_jpeg_cpu_images_per_s": cpu, "loader_jpeg_device_images_per_s": dev,
           "loader_jpeg": {"files": len(paths), "size": f"{JPEG_SIZE[0]}x{JPEG_SIZE[1]} (every 4th portrait)",
                           "quality": JPEG_QUALITY, "mean_kb": float(np.mean(sizes)) / 1024, "workers": workers,
                           "batch": batch_size, "batches": nb, "device": str(device), "device_path": note}}
    _JPEG_RESULTS[key] = out
    return out


def profile_config(cfg: Mapping[str, Any], *, device: torch.device | None = None, warmup: int = 1, steps: int = 3,
                   batch: int | None = None, count_flops: bool = True, loader: bool = True,
                   loader_workers: int | None = None, compile: bool | None = None,
                   fused_optim: bool | None = None, trace: Path | None = None,
                   input_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Measure one resolved pretraining config: batch, step times, images/s, FLOPs per image (counted and analytic),
    MFU, loader images/s, device, attention implementation, and the engine's speed switches (``compile`` /
    ``fused_optim``: None = the recipe's, i.e. on for CUDA) with the graphs compiled and recompiles after the first
    step. No projection (see ``project``). An evaluation config (finetune / linear / knn): ``profile_eval_config``
    (``input_cfg``: the pretraining it evaluates, if known)."""
    from repro.profile.cost import analytic_flops

    if step_kind(cfg) != "pretrain":
        return profile_eval_config(cfg, input_cfg, device=device, warmup=warmup, steps=steps, batch=batch,
                                   count_flops=count_flops, compile=compile, fused_optim=fused_optim, trace=trace)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if batch is None:
        batch, why = choose_batch(cfg, device)
    else:
        why = f"fixed by --batch ({batch})"
    torch.manual_seed(0)
    method = build_method(cfg)
    flops = None
    if count_flops:  # one image on the CPU in fp32: counts do not depend on the device
        flops = flops_per_image(method, random_batch(method, cfg, 1, torch.device("cpu")),
                                torch.Generator().manual_seed(0))
    run, first, times, graphs0, graphs1 = timed_steps(
        partial(_Steps, method, cfg, batch, device, compile=compile, fused_optim=fused_optim), device, warmup, steps)
    step = float(np.median(times))
    traced = None
    if trace is not None:  # after the timed steps: the profiler's overhead never enters the step time
        traced = trace_steps(run, min(steps, 3), Path(trace), trace_label(cfg, batch, run))
    from repro.engine.hooks import peak_memory_mb

    peak = peak_flops(device)
    mfu = flops["total"] * batch / step / peak[0] if (flops and peak) else None

    prof = {
        "recipe": cfg.get("recipe"), "method": cfg["method"]["name"], "img_size": cfg["data"]["img_size"],
        "arch": cfg["model"]["arch"], "patch_size": cfg["model"]["patch_size"],
        "batch": batch, "batch_rule": why, "warmup_steps": warmup, "timed_steps": steps,
        "step_times_s": times, "step_time_s": step, "s_per_image": step / batch, "images_per_s": batch / step,
        "flops_per_image": flops["total"] if flops else None,
        "flops_forward_per_image": flops["forward"] if flops else None,
        "analytic_flops_per_image": (analytic_flops(cfg) or {}).get("total"),
        "loader_images_per_s": (loader_images_per_s(method, cfg, batch, num_workers=loader_workers)
                                if loader else None),
        **(jpeg_loader_bench(method, cfg, batch, num_workers=loader_workers, device=device) if loader else
           {"loader_jpeg_cpu_images_per_s": None, "loader_jpeg_device_images_per_s": None, "loader_jpeg": None}),
        "device": device_name(device), "device_type": device.type, "device_count": 1,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "attention": attention_impl(device), "torch": torch.__version__,
        "compile": run.compile, "compile_mode": run.compile_mode, "compiled_blocks": run.compiled_blocks,
        "fused_optim": run.fused_optim, "trace": traced,
        "fused_attn": run.fused_attn, "sdpa": run.sdpa, "compile_scope": run.compile_scope,
        "embed_visible": auto_switch_of(None, cfg, device, "embed_visible"),
        "graphs_compiled": dynamo_graphs() - graphs0, "recompiles": dynamo_graphs() - graphs1 if first else None,
        "first_step_s": first[0] if first else None,
        "mfu": mfu, "mfu_peak": peak[1] if peak else None,
        "peak_memory_mb": peak_memory_mb(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cost_key": cost_key(cfg),
    }
    del run, method
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return prof


@contextlib.contextmanager
def _eval_input(cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None) -> Any:
    """``cfg`` with the input it needs to be built: an instance feature reads the input's head from its exported
    files, so the input method (random weights) is exported to a temporary folder as a pretraining stage exports it;
    any other feature starts from a random encoder (the weights do not change the cost)."""
    import tempfile

    from repro.profile.projection import eval_feature

    if step_kind(cfg) not in ("linear", "knn") or eval_feature(cfg) != "instance":
        yield {**cfg, "init": "random", "feature": eval_feature(cfg)}
        return
    if input_cfg is None:
        raise ConfigError(f"feature=instance reads the instance head of the pretraining it evaluates: name that "
                          f"pretraining, e.g. `repro profile {cfg.get('kind')}/{cfg.get('recipe')}@PRETRAIN`")
    from repro.engine.pretrain import ENCODER_FILE, export_encoder

    with tempfile.TemporaryDirectory(prefix="repro-profile-input-") as folder:
        export_encoder(build_method(input_cfg), input_cfg, Path(folder))
        yield {**cfg, "init": str(Path(folder) / ENCODER_FILE)}


def profile_eval_config(cfg: Mapping[str, Any], input_cfg: Mapping[str, Any] | None = None, *,
                        device: torch.device | None = None, warmup: int = 1, steps: int = 3, batch: int | None = None,
                        count_flops: bool = True, compile: bool | None = None, fused_optim: bool | None = None,
                        trace: Path | None = None) -> dict[str, Any]:
    """Measure one evaluation step (finetune / linear / knn; see the module's docstring) of a resolved config, as
    ``profile_config`` measures a pretraining step. Batch: the CPU rule; on a GPU, kNN's own ``batch_size``, else
    the largest of GPU_BATCHES that fits."""
    from repro.engine.hooks import peak_memory_mb
    from repro.profile.cost import eval_flops
    from repro.profile.projection import eval_feature, instance_head

    step = step_kind(cfg)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _eval_input(cfg, input_cfg) as run_cfg:
        knn = step == "knn"

        def make(b: int, compile_: bool | None = None) -> Any:
            task = build_eval_task(run_cfg)
            data = eval_batch(task, run_cfg, b)
            if knn:
                return _Forward(task, data, device)  # type: ignore[arg-type]
            return _Steps(task, run_cfg, b, device, compile=compile_, fused_optim=fused_optim, batch=data)

        if batch is not None:
            why = f"fixed by --batch ({batch})"
        elif knn and device.type == "cuda":
            batch, why = int(cfg["batch_size"]), "the kNN stage's own batch_size"
        else:
            batch, why = choose_batch(cfg, device, steps_for=lambda b: make(b, False))
        torch.manual_seed(0)
        flops = None
        if count_flops:  # two images on the CPU in fp32 (BatchNorm trains on more than one)
            task = build_eval_task(run_cfg)
            flops = eval_flops_per_image(task, eval_batch(task, run_cfg, 2))
            del task
        run, first, times, graphs0, graphs1 = timed_steps(lambda: make(batch, compile), device, warmup, steps)
    step_s = float(np.median(times))
    traced = None
    if trace is not None:
        mode = "compiled" if run.compile else "eager"
        label = f"{step}-{cfg.get('recipe')}-{cfg['data']['img_size']}-b{batch}-{mode}"
        traced = trace_steps(run, min(steps, 3), Path(trace), label)
    peak = peak_flops(device)
    mfu = flops["total"] * batch / step_s / peak[0] if (flops and peak) else None
    head = instance_head(cfg, input_cfg)
    prof = {
        "kind": step, "recipe": cfg.get("recipe"), "input": (input_cfg or {}).get("recipe"), "method": None,
        "img_size": cfg["data"]["img_size"], "arch": cfg["model"]["arch"], "patch_size": cfg["model"]["patch_size"],
        "feature": eval_feature(cfg) if step != "finetune" else None, "instance_head": head,
        "batch": batch, "batch_rule": why, "warmup_steps": warmup, "timed_steps": steps,
        "step_times_s": times, "step_time_s": step_s, "s_per_image": step_s / batch, "images_per_s": batch / step_s,
        "flops_per_image": flops["total"] if flops else None,
        "flops_forward_per_image": flops["forward"] if flops else None,
        "analytic_flops_per_image": eval_flops(cfg, head),
        "loader_images_per_s": None, "loader_jpeg_cpu_images_per_s": None, "loader_jpeg_device_images_per_s": None,
        "loader_jpeg": None,
        "device": device_name(device), "device_type": device.type, "device_count": 1,
        # the set's precision and switches (the set a projection reads); kNN runs fp32 eager under every one
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "step_runs": ("fp32, eager, no gradients (run_knn: no autocast, nothing compiled, under every mode)" if knn
                      else None),
        "attention": attention_impl(device), "torch": torch.__version__,
        "compile": auto_switch_of(compile, cfg, device) if knn else run.compile,
        "compile_mode": None if knn else run.compile_mode, "compiled_blocks": run.compiled_blocks,
        "fused_optim": auto_switch_of(fused_optim, cfg, device, "fused_optim") if knn else run.fused_optim,
        "fused_attn": run.fused_attn, "sdpa": run.sdpa, "trace": traced,
        "graphs_compiled": dynamo_graphs() - graphs0, "recompiles": dynamo_graphs() - graphs1 if first else None,
        "first_step_s": first[0] if first else None,
        "mfu": mfu, "mfu_peak": peak[1] if peak else None,
        "peak_memory_mb": peak_memory_mb(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cost_key": cost_key(cfg, input_cfg),
    }
    del run
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return prof


def auto_switch_of(value: bool | None, cfg: Mapping[str, Any], device: torch.device, key: str = "compile") -> bool:
    """A speed switch as the engine would set it for ``cfg`` (the caller's value, else the recipe's, else on for
    CUDA): the set a kNN profile is stored in, though kNN itself uses none."""
    from repro.engine.train import auto_switch

    return auto_switch(cfg.get("train", {}).get(key) if value is None else value, device)


# -- projection to the paper's schedule ---------------------------------------------------------------------------


def calibration_factor(paper_hours: float, measured_hours: float) -> float:
    """Paper-hardware hours per measured device-hour, from the declared reference row."""
    if not (paper_hours > 0 and measured_hours > 0):
        raise ValueError("calibration needs positive paper and measured hours for the reference row")
    return paper_hours / measured_hours


def calibrate(measured_hours: float, factor: float) -> float:
    """Measured device-hours of any row -> paper-hardware-equivalent hours."""
    return measured_hours * factor


def speedups(values: Mapping[str, float | None], ref: str) -> dict[str, float | None]:
    """Time of the reference row / time of each row (None where either is missing)."""
    r = values.get(ref)
    return {k: (r / v if (r and v) else None) for k, v in values.items()}
