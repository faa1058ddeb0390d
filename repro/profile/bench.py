"""Timed training steps of a method at its PAPER configuration on the current device, and the projection of the
measured time to the paper's schedule.

What a step is: the method's forward with its own loss, backward, AdamW step and the method's ``after_step`` (EMA
teachers), on random images shaped as the method's training transform shapes them (so two-view methods get two
views). As the engine: bf16 autocast on a GPU, fp32 on the CPU, transformer blocks compiled and fused AdamW on a GPU
(``train.compile`` / ``train.fused_optim``; ``repro profile --compile/--fused-optim`` override); attention goes
through ``F.scaled_dot_product_attention`` (timm's fused attention and our relative-position attention both), which
picks the fused kernel of the device. Batch: on a CPU small batches (8 at <= 224 px, 4 above; say so in the
outputs); on a GPU the largest of {256, 128, 64, 48, 32} that fits (the LocalMIM appendix's rule). The data loader's
images/s (the method's own per-image transform on decoded images, ``train.num_workers`` workers) is measured beside
the model's, so a table shows when loading would be the bottleneck. JPEG decoding is not included (no image files at
paper scale here): the loader figure is an upper bound.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repro.config import ConfigError

# Training images per epoch of each dataset, as the papers use them.
DATASET_SIZES = {
    "imagenet1k": 1_281_167,   # ILSVRC-2012 train
    "imagenet22k": 14_197_122,  # full ImageNet-21K/22K (ExtreMA Table 3: "about 10 times larger")
    "inat2018": 437_513,       # iNaturalist 2018 train
    "inat2019": 265_213,       # iNaturalist 2019 train
}
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
                 compile: bool | None = None, fused_optim: bool | None = None):
        from repro.engine.train import auto_switch, build_optimizer, compile_blocks, default_param_groups

        self.method, self.device = method.to(device), device
        self.method.train()
        # As the engine: the recipe's switches (None: on for CUDA), unless the caller fixes them.
        tcfg = cfg.get("train", {})
        self.compile = auto_switch(tcfg.get("compile") if compile is None else compile, device)
        self.fused_optim = auto_switch(tcfg.get("fused_optim") if fused_optim is None else fused_optim, device)
        self.compiled_blocks = compile_blocks(self.method) if self.compile else 0
        optim = dict(cfg["optim"])
        if optim.get("name") != "adamw":
            optim["name"] = "adamw"
        groups = (method.param_groups(optim) if hasattr(method, "param_groups")
                  else default_param_groups(method, optim))
        # a tiny lr: random inputs must not blow the weights up
        self.opt = build_optimizer(groups, optim, 1e-6, fused=self.fused_optim)
        self.batch = random_batch(method, cfg, batch_size, device, seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        self.step_no = 0

    def __call__(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.method(self.batch, self.gen)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.method.after_step(self.step_no, 10**6)
        sync()
        return time.perf_counter() - t0


def choose_batch(cfg: Mapping[str, Any], device: torch.device, build: Any = build_method) -> tuple[int, str]:
    """(batch, why): the CPU rule, or on a GPU the largest of GPU_BATCHES for which two steps fit in memory."""
    if device.type != "cuda":
        b = cpu_batch(cfg["data"]["img_size"])
        return b, f"CPU: small batch ({b} at {cfg['data']['img_size']} px), not the paper's"
    for b in GPU_BATCHES:
        try:
            steps = _Steps(build(cfg), cfg, b, device, compile=False)  # memory probe: eager
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


def profile_config(cfg: Mapping[str, Any], *, device: torch.device | None = None, warmup: int = 1, steps: int = 3,
                   batch: int | None = None, count_flops: bool = True, loader: bool = True,
                   loader_workers: int | None = None, compile: bool | None = None,
                   fused_optim: bool | None = None) -> dict[str, Any]:
    """Measure one resolved pretraining config: batch, step times, images/s, FLOPs per image (counted and analytic),
    MFU, loader images/s, device, attention implementation, and the engine's speed switches (``compile`` /
    ``fused_optim``: None = the recipe's, i.e. on for CUDA) with the graphs compiled and recompiles after the first
    step. No projection (see ``project``)."""
    from repro.profile.cost import analytic_flops
    from repro.profile.flops import flops_per_image

    if cfg.get("kind", "pretrain") != "pretrain":
        raise ConfigError("repro profile measures pretraining recipes; pass a pretrain recipe")
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
    torch._dynamo.reset()  # each config compiles afresh: no recompile limit reached across a table's configs
    if device.type == "cuda":  # the peak of this config, not of the process so far
        torch.cuda.reset_peak_memory_stats(device)
    graphs0 = dynamo_graphs()
    run = _Steps(method, cfg, batch, device, compile=compile, fused_optim=fused_optim)
    first = [run() for _ in range(min(1, warmup))]
    graphs1 = dynamo_graphs()
    for _ in range(warmup - len(first)):
        run()
    times = [run() for _ in range(steps)]
    step = float(np.median(times))
    from repro.engine.train import peak_memory_mb

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
        "device": device_name(device), "device_type": device.type, "device_count": 1,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "attention": attention_impl(device), "torch": torch.__version__,
        "compile": run.compile, "compiled_blocks": run.compiled_blocks, "fused_optim": run.fused_optim,
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


def cost_key(cfg: Mapping[str, Any]) -> str:
    """What a step's cost depends on: the method section, the model and the resolution (not epochs, data, lr)."""
    import hashlib
    import json

    from repro.methods.registry import get_spec

    free = get_spec(cfg["method"]["name"]).cost_free
    method = {k: v for k, v in cfg["method"].items() if k not in free}
    key = {"method": method, "model": dict(cfg["model"]), "img_size": cfg["data"]["img_size"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- projection to the paper's schedule ---------------------------------------------------------------------------


def train_images(cfg: Mapping[str, Any]) -> int:
    """Training images per epoch of the config's dataset (the paper's, at paper scale)."""
    data = cfg["data"]
    name = data["dataset"]
    if name not in DATASET_SIZES:
        raise ConfigError(f"no known size for data.dataset={name}; profile a paper-scale recipe "
                          f"({', '.join(DATASET_SIZES)})")
    return int(round(DATASET_SIZES[name] * float(data.get("train_fraction", 1.0))))


def project(s_per_image: float, images_per_epoch: int, epochs: float, devices: int = 1) -> dict[str, float]:
    """Time per epoch (wall, on ``devices`` devices that each reach the measured per-image time) and the total
    device-hours (wall x devices, so independent of ``devices`` under perfect scaling)."""
    if s_per_image <= 0 or images_per_epoch <= 0 or epochs <= 0 or devices <= 0:
        raise ValueError("projection needs positive time per image, images, epochs and devices")
    epoch_s = s_per_image * images_per_epoch / devices
    return {"epoch_hours": epoch_s / 3600.0, "device_hours_per_epoch": epoch_s * devices / 3600.0,
            "total_wall_hours": epoch_s * epochs / 3600.0, "total_device_hours": epoch_s * epochs * devices / 3600.0}


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
