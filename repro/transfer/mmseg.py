"""The ``segment`` stage: UperNet semantic segmentation with mmsegmentation 1.2.2, driven from a recipe.

The model, data pipeline, optimiser and schedule are an mmengine config built here in code (``build_config``) and
trained by mmengine's own ``Runner``: mmseg's ``EncoderDecoder`` with a ViT backbone (``ReproMAE``, mmseg's ``MAE``
backbone extended below), its ``Feature2Pyramid`` neck, ``UPerHead`` and an auxiliary ``FCNHead``, AdamW with
mmseg's layer-wise lr decay constructor, a linear warm-up then ``PolyLR``, single-scale mIoU by mmseg's
``IoUMetric``. BatchNorm is plain ``BN`` in one process (``SyncBN`` with several GPU processes). Several processes
(torchrun, Slurm tasks: ``WORLD_SIZE`` > 1): mmengine's ``pytorch`` launcher on the process group that
``repro.engine.dist.setup`` makes first (NCCL on GPUs, gloo on the CPU), no DDP device ids on the CPU.

The pretrained encoder is converted by ``repro.transfer.convert.vit_to_mmseg`` and written to the stage folder;
the backbone loads it with ``weights_only=True`` and refuses a partial load. mmengine's own checkpoints hold Python
objects: they are loaded (to resume a stopped stage) only from this stage's folder, with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set only for that call.

The tiny rule of the kind is ``repro.transfer.tiny.tiny_segment`` (torch-free); its keys' value rules are in
``repro.config.RULES``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.io import own_framework_checkpoints

BACKBONE_INIT = "backbone_init.pth"  # the converted encoder, written by this stage
CONVERSION = "conversion.json"  # what the conversion did beyond renaming keys
WORK_DIR = "mmseg"  # mmengine's work_dir inside the stage folder (its logs and checkpoints)

# ---------------------------------------------------------------------------------------------- the backbone


def register_backbone() -> None:
    """Register ``ReproMAE`` in mmseg's model registry (idempotent)."""
    from mmseg.registry import MODELS

    if "ReproMAE" not in MODELS.module_dict:
        MODELS.register_module(name="ReproMAE", module=_backbone_class())


def _backbone_class() -> type:
    import torch
    from mmseg.models.backbones.mae import MAE, MAEAttention
    from torch import nn

    from repro.models.irpe import irpe_buckets_per_axis, irpe_product_bucket
    from repro.models.relpos import grid_coords

    class ReproAttention(MAEAttention):
        """mmseg's MAE attention that also runs without a cls token (the relative bias table's cls entries are
        skipped) and, with ``irpe``, adds LoMaR's contextual iRPE term ``q_i . rpe_k[bucket(i, j)]`` (q unscaled,
        one table shared by the heads, the cls token in a bucket of its own), as ``repro.methods.lomar``."""

        def __init__(self, *args: Any, irpe: bool = False, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.rpe_k = None
            if irpe:
                self.num_buckets = irpe_buckets_per_axis() ** 2
                self.rpe_k = nn.Parameter(torch.zeros(self.num_buckets + 1, self.embed_dims // self.num_heads))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            wh, ww = self.window_size
            prefix = n - wh * ww
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q * self.scale) @ k.transpose(-2, -1)
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            table = table.view(wh * ww + 1, wh * ww + 1, -1)[1 - prefix:, 1 - prefix:]
            attn = attn + table.permute(2, 0, 1)[None]
            if self.rpe_k is not None:
                coords = grid_coords(wh, ww, x.device)
                ids = torch.full((n, n), self.num_buckets, dtype=torch.long, device=x.device)
                ids[prefix:, prefix:] = irpe_product_bucket(coords[:, None, :] - coords[None, :, :])
                per_bucket = q @ self.rpe_k.t().to(q.dtype)  # (B, H, N, buckets)
                attn = attn + per_bucket.gather(-1, ids[None, None].expand(b, self.num_heads, n, n))
            attn = self.attn_drop(attn.softmax(dim=-1))
            return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))

    class ReproMAE(MAE):
        """mmseg's ``MAE`` backbone (the name keeps mmseg's layer-decay constructor working) plus: no cls token in the
        sequence (``with_cls_token=False``: ExtreMA), LoMaR's iRPE (``rel_pos='irpe'``), and a strict load of the
        converted encoder (``init_checkpoint``, read with ``weights_only=True``) at ``init_weights``."""

        def __init__(self, *, rel_pos: str = "bias", with_cls_token: bool = True,
                     init_checkpoint: str | None = None, **kw: Any) -> None:
            super().__init__(**kw)
            self.init_checkpoint = init_checkpoint
            self.with_cls_token = with_cls_token
            if not with_cls_token:
                self.cls_token.requires_grad_(False)  # kept (zeros) for mmseg's key layout, never used
            if rel_pos == "irpe" or not self.with_cls_token:
                for layer in self.layers:
                    old = layer.attn
                    new = ReproAttention(old.embed_dims, old.num_heads, old.window_size, bias=old.bias,
                                         attn_drop_rate=old.attn_drop.p, proj_drop_rate=old.proj_drop.p,
                                         irpe=rel_pos == "irpe")
                    new.load_state_dict(old.state_dict(), strict=False)
                    layer.attn = new

        def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if self.with_cls_token:
                return super().forward(inputs)
            x, (h, w) = self.patch_embed(inputs)
            x = x + self.pos_embed[:, 1:]  # the table's cls row belongs to no token
            outs = []
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i == len(self.layers) - 1 and self.final_norm:
                    x = self.norm1(x)
                if i in self.out_indices:
                    outs.append(x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())
            return tuple(outs)

        def init_weights(self) -> None:
            super().init_weights()
            if self.init_checkpoint:
                state = torch.load(self.init_checkpoint, map_location="cpu", weights_only=True)
                res = self.load_state_dict(state, strict=False)
                missing = [k for k in res.missing_keys if not k.endswith("relative_position_index")]
                if missing or res.unexpected_keys:
                    raise ConfigError(f"{self.init_checkpoint} does not fit the backbone: missing {missing[:4]}, "
                                      f"unexpected {res.unexpected_keys[:4]}")

    return ReproMAE


def backbone_kwargs(model: Mapping[str, Any], crop: int, init_checkpoint: str | None = None) -> dict[str, Any]:
    """``ReproMAE`` arguments for an encoder of geometry ``model`` (our model section) at ``crop`` pixels."""
    from repro.models.vit import arch_dims

    d = arch_dims(model)
    return {"type": "ReproMAE", "img_size": (crop, crop), "patch_size": model["patch_size"],
            "embed_dims": d["embed_dim"], "num_layers": d["depth"], "num_heads": d["num_heads"],
            "mlp_ratio": int(d["mlp_ratio"]), "out_indices": list(model["out_indices"]),
            "drop_path_rate": float(model.get("drop_path") or 0.0), "final_norm": bool(model.get("final_norm")),
            "with_cls_token": bool(model.get("class_token", True)), "init_values": model.get("layer_scale") or 1.0,
            "norm_cfg": {"type": "LN", "eps": 1e-6}, "rel_pos": model.get("rel_pos", "none"),
            "init_checkpoint": init_checkpoint}


# ------------------------------------------------------------------------------------------------ the config


def _pipelines(data: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    crop = (data["img_size"], data["img_size"])
    scale = tuple(data["resize"])
    train = [{"type": "LoadImageFromFile"}, {"type": "LoadAnnotations", "reduce_zero_label": True},
             {"type": "RandomResize", "scale": scale, "ratio_range": tuple(data["ratio_range"]), "keep_ratio": True},
             {"type": "RandomCrop", "crop_size": crop, "cat_max_ratio": data["cat_max_ratio"]},
             {"type": "RandomFlip", "prob": data["hflip"]}]
    if data["photometric"]:
        train.append({"type": "PhotoMetricDistortion"})
    train.append({"type": "PackSegInputs"})
    test = [{"type": "LoadImageFromFile"}, {"type": "Resize", "scale": scale, "keep_ratio": True},
            {"type": "LoadAnnotations", "reduce_zero_label": True}, {"type": "PackSegInputs"}]
    return train, test


def _dataset(root: Path, info: Mapping[str, Any], split: str, pipeline: list[dict]) -> dict[str, Any]:
    ade = {"train": "training", "val": "validation"}[split]
    ds = {"data_root": str(root), "data_prefix": {"img_path": f"images/{ade}", "seg_map_path": f"annotations/{ade}"},
          "img_suffix": info["img_suffix"], "seg_map_suffix": ".png", "reduce_zero_label": True,
          "pipeline": pipeline}
    if info.get("classes") is None:
        return {"type": "ADE20KDataset", **ds}
    return {"type": "BaseSegDataset", "metainfo": {"classes": tuple(info["classes"])}, **ds}


def build_config(cfg: Mapping[str, Any], out_dir: Path, root: Path, info: Mapping[str, Any],
                 init_checkpoint: str | None, world_size: int = 1, precision: str = "fp32") -> dict[str, Any]:
    """The mmengine config dict of a segment stage (``cfg``: the resolved recipe; ``root``/``info``: its data)."""
    import torch

    d, m, o, t, e = cfg["data"], cfg["model"], cfg["optim"], cfg["train"], cfg["eval"]
    crop = d["img_size"]
    cuda = torch.cuda.is_available()
    # SyncBN across several GPU processes; torch's SyncBN has no CPU kernel, so CPU processes keep per-process BN
    norm = {"type": "SyncBN" if world_size > 1 and cuda else "BN", "requires_grad": True}
    dims = backbone_kwargs(m, crop, init_checkpoint)
    dim = dims["embed_dims"]
    nc = len(info["classes"]) if info.get("classes") else d["num_classes"]  # the embedded data knows its classes
    model = {
        "type": "EncoderDecoder",
        "data_preprocessor": {"type": "SegDataPreProcessor", "mean": [123.675, 116.28, 103.53],
                              "std": [58.395, 57.12, 57.375], "bgr_to_rgb": True, "pad_val": 0, "seg_pad_val": 255,
                              "size": (crop, crop)},
        "backbone": dims,
        "neck": {"type": "Feature2Pyramid", "embed_dim": dim, "rescales": list(m["rescales"]), "norm_cfg": norm},
        "decode_head": {"type": "UPerHead", "in_channels": [dim] * 4, "in_index": [0, 1, 2, 3],
                        "pool_scales": (1, 2, 3, 6), "channels": m["decoder_channels"],
                        "dropout_ratio": m["dropout"], "num_classes": nc, "norm_cfg": norm, "align_corners": False,
                        "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0}},
        "auxiliary_head": {"type": "FCNHead", "in_channels": dim, "in_index": 2, "channels": m["aux_channels"],
                           "num_convs": 1, "concat_input": False, "dropout_ratio": m["dropout"], "num_classes": nc,
                           "norm_cfg": norm, "align_corners": False,
                           "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False,
                                           "loss_weight": m["aux_weight"]}},
        "train_cfg": {},
        "test_cfg": ({"mode": "slide", "crop_size": (crop, crop), "stride": (e["stride"], e["stride"])}
                     if e["mode"] == "slide" else {"mode": "whole"}),
    }
    train_pipe, test_pipe = _pipelines(d)
    workers = int(t["num_workers"])
    per_device = o["batch_size"] // world_size
    if per_device * world_size != o["batch_size"]:
        raise ConfigError(f"optim.batch_size={o['batch_size']} is not divisible by the world size {world_size}")
    loader = {"num_workers": workers, "persistent_workers": workers > 0}
    optimizer = {"type": "AdamW", "lr": o["lr"], "betas": tuple(o["betas"]), "weight_decay": o["weight_decay"]}
    wrapper: dict[str, Any] = {"type": "OptimWrapper", "optimizer": optimizer}
    if precision in ("fp16", "bf16"):
        wrapper = {"type": "AmpOptimWrapper", "optimizer": optimizer,
                   "dtype": "float16" if precision == "fp16" else "bfloat16"}
        if precision == "fp16":
            wrapper["loss_scale"] = "dynamic"
    wrapper["constructor"] = "LearningRateDecayOptimizerConstructor"
    wrapper["paramwise_cfg"] = {"num_layers": dims["num_layers"], "decay_rate": o["layer_decay"],
                                "decay_type": "layer_wise"}
    # mmengine's LinearLR reaches the peak at its last iteration: a warm-up needs at least 2 (1 would stay at the
    # start factor for the whole run under the chained PolyLR).
    warm = min(o["warmup_iters"], o["iters"])
    warm = warm if warm >= 2 else 0
    sched: list[dict[str, Any]] = []
    if warm:
        sched.append({"type": "LinearLR", "start_factor": o["warmup_ratio"], "by_epoch": False, "begin": 0,
                      "end": warm})
    sched.append({"type": "PolyLR", "power": o["poly_power"], "eta_min": o["min_lr"], "begin": warm,
                  "end": o["iters"], "by_epoch": False})
    return {
        "default_scope": "mmseg",
        "work_dir": str(out_dir / WORK_DIR),
        "model": model,
        "train_dataloader": {"batch_size": per_device, **loader,
                             "sampler": {"type": "InfiniteSampler", "shuffle": True},
                             "dataset": _dataset(root, info, "train", train_pipe)},
        "val_dataloader": {"batch_size": 1, **loader, "sampler": {"type": "DefaultSampler", "shuffle": False},
                           "dataset": _dataset(root, info, "val", test_pipe)},
        "val_evaluator": {"type": "IoUMetric", "iou_metrics": ["mIoU"]},
        # Evaluated once, after training (run_segment calls Runner.val): never inside the loop (mmengine's loop
        # also validates at its last iteration whatever val_interval says, unless val_begin is past the end).
        "train_cfg": {"type": "IterBasedTrainLoop", "max_iters": o["iters"], "val_interval": o["iters"] + 1,
                      "val_begin": o["iters"] + 1},
        "val_cfg": {"type": "ValLoop"},
        "optim_wrapper": wrapper,
        "param_scheduler": sched,
        "default_hooks": {
            "timer": {"type": "IterTimerHook"},
            "logger": {"type": "LoggerHook", "interval": t["log_every"], "log_metric_by_epoch": False},
            "param_scheduler": {"type": "ParamSchedulerHook"},
            "checkpoint": {"type": "CheckpointHook", "by_epoch": False, "interval": t["ckpt_every"],
                           "max_keep_ckpts": 1, "save_last": True},
            "sampler_seed": {"type": "DistSamplerSeedHook"},
        },
        "env_cfg": {"cudnn_benchmark": False, "dist_cfg": {"backend": "nccl" if cuda else "gloo"},
                    "mp_cfg": {"mp_start_method": "fork", "opencv_num_threads": 0}},
        "log_processor": {"by_epoch": False},
        "log_level": "INFO",
        "randomness": {"seed": int(cfg.get("seed", 0))},
        "launcher": "pytorch" if world_size > 1 else "none",
        # mmengine passes device_ids=[LOCAL_RANK] unless told: a CPU module takes none
        **({"model_wrapper_cfg": {"type": "MMDistributedDataParallel", "broadcast_buffers": False,
                                  **({} if cuda else {"device_ids": None})}} if world_size > 1 else {}),
        "resume": True,  # from the last checkpoint in work_dir, if this stage wrote one
        "load_from": None,
    }


# ------------------------------------------------------------------------------------------------ the runner


def _runner_class() -> type:
    from mmengine.runner import Runner

    class StageRunner(Runner):
        """mmengine's Runner that resumes only from checkpoints inside its own work_dir (files this stage wrote),
        with the full unpickle allowed for that one load."""

        def resume(self, filename: str, *args: Any, **kw: Any) -> None:
            path = Path(filename).resolve()
            if Path(self.work_dir).resolve() not in path.parents:
                raise ConfigError(f"refusing to resume from {filename}: not a checkpoint this stage wrote")
            with own_framework_checkpoints():
                super().resume(str(path), *args, **kw)

    return StageRunner


def encoder_geometry(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(model section with the pretrained encoder's geometry, its state dict or None for a random init)."""
    from repro.io import load_checkpoint
    from repro.transfer.convert import encoder_layout

    model = dict(cfg["model"])
    init = cfg.get("init")
    if init in (None, "", "random"):
        return model, None
    path = Path(init)
    if not path.is_file():
        raise ConfigError(f"init={init} does not exist (an encoder.pth written by a pretraining stage)")
    state = load_checkpoint(path)
    for key in ("encoder", "model", "state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    meta_path = path.parent / "encoder.json"
    if meta_path.is_file():  # the pretraining's own geometry wins over the recipe's
        meta = json.loads(meta_path.read_text())["model"]
        for k in ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "rel_pos", "layer_scale",
                  "class_token"):
            if k in meta:
                model[k] = meta[k]
    try:
        lay = encoder_layout(state)
    except ValueError as e:
        raise ConfigError(f"init={init}: {e}") from None
    model["class_token"] = bool(lay["class_token"])
    model["rel_pos"] = lay["rel_pos"]
    model["patch_size"] = int(lay["patch_size"])
    return model, state


def run_segment(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train and evaluate one UperNet segmentation (see the module docstring); metrics in percent, as mmseg's."""
    import torch
    from mmengine.config import Config

    from repro.data.dense import constant_miou, dense_root
    from repro.engine.dist import setup
    from repro.models.vit import arch_dims
    from repro.transfer.convert import vit_to_mmseg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root, info = dense_root(cfg["data"], "ade20k")
    model, state = encoder_geometry(cfg)
    depth = arch_dims(model)["depth"]
    bad = [i for i in cfg["model"]["out_indices"] if i >= depth]
    if bad:
        raise ConfigError(f"model.out_indices {bad} past the encoder's {depth} blocks")
    crop, patch = cfg["data"]["img_size"], model["patch_size"]
    if crop % patch:
        raise ConfigError(f"data.img_size={crop} (the crop) is not a multiple of the encoder's patch {patch}")
    init_path = None
    if state is not None:
        from repro.io import atomic_torch_save, atomic_write_json

        conv = vit_to_mmseg(state, (crop // patch, crop // patch), arch_dims(model)["num_heads"],
                            final_norm=bool(model.get("final_norm")))
        init_path = str(atomic_torch_save(conv.state, out_dir / BACKBONE_INIT))
        atomic_write_json(out_dir / CONVERSION, {"init": str(cfg["init"]), "backbone": "ReproMAE (mmseg MAE)",
                                                 "grid": [crop // patch] * 2, "notes": conv.notes})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    precision = _precision(cfg["train"].get("precision", "auto"))
    seg_cfg = dict(cfg, model=model)
    register_backbone()
    mm = Config(build_config(seg_cfg, out_dir, root, info, init_path, world, precision))
    env = setup()  # several processes: the group exists before mmengine looks (NCCL on GPUs, gloo on the CPU)
    runner = _runner_class().from_cfg(mm)
    t0 = time.time()
    runner.train()
    metrics = runner.val()
    wall = time.time() - t0
    o = cfg["optim"]
    return {
        "metrics": {"miou": float(metrics["mIoU"]), "aacc": float(metrics["aAcc"]), "macc": float(metrics["mAcc"]),
                    "trivial_miou": constant_miou(root)},  # the floor: the best constant prediction
        "accounting": {"wall_s": wall, "device_s": wall * env.world_size, "world_size": env.world_size,
                       "iters": o["iters"],
                       "images": o["iters"] * o["batch_size"], "precision": precision, "completed": True,
                       "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "artifacts": {"work_dir": str(out_dir / WORK_DIR),
                      **({"backbone_init": init_path, "conversion": str(out_dir / CONVERSION)} if init_path else {})},
    }


def _precision(want: str) -> str:
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    if want == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return want


def synthetic_loss(cfg: Mapping[str, Any], images: int = 2) -> Any:
    """A closure computing the stage's training loss (both heads) on ``images`` random crops with random labels,
    on the CPU with the recipe's model (random weights): what ``repro profile --transfer-flops`` counts. Two images
    at least: the pooling branch's BatchNorm needs more than one value per channel."""
    import tempfile

    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    model_sec, _ = encoder_geometry(cfg)
    register_backbone()
    init_default_scope("mmseg")
    with tempfile.TemporaryDirectory() as tmp:
        mm = Config(build_config(dict(cfg, model=model_sec), Path(tmp), Path(tmp), {"img_suffix": ".jpg"}, None))
    model = MODELS.build(mm.model).train()
    c, classes = int(cfg["data"]["img_size"]), int(cfg["data"]["num_classes"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, c, c, generator=g)
    samples = []
    for _ in range(images):
        s = SegDataSample(metainfo={"img_shape": (c, c), "pad_shape": (c, c), "ori_shape": (c, c)})
        s.gt_sem_seg = PixelData(data=torch.randint(0, classes, (1, c, c), generator=g))
        samples.append(s)

    def loss() -> torch.Tensor:
        out = model.loss(x, samples)
        return sum(v for k, v in out.items() if k.endswith("loss_ce"))

    return loss
