"""``detect`` on detectron2: ViTDet's Mask R-CNN with our pretrained ViT as the plain backbone.

The model is detectron2's own LazyConfig ``common/models/mask_rcnn_vitdet.py`` (ViT + simple feature pyramid, LN
in the pyramid and the 4conv1fc box head, 2-conv RPN head), with the ViT's sizes read from the checkpoint
(``repro.transfer.convert_d2``), window attention everywhere but ``detect.global_blocks``, and the pyramid's levels
named by their stride (``p<log2 stride>``: p2..p6 for patch 16, as in the paper; a tiny patch-4 ViT gives p0..p4,
and the anchors (8 x stride: 32..512 at patch 16) and the pooler's canonical level follow). Data: large-scale
jitter (``ResizeScale`` 0.1-2.0 + ``FixedSizeCrop`` + flip at ``data.img_size``), test at the same size. Optimiser
as ViTDet: AdamW, layer decay by ``get_vit_lr_decay_rate``, no weight decay on norms and ``pos_embed``, step
decay x0.1 at ``optim.steps`` (fractions of training) after a linear warm-up. Training is detectron2's
``SimpleTrainer`` (fp32) or ``AMPTrainer`` (CUDA) with its hooks (LR schedule, periodic checkpoint, metric
writers); evaluation is detectron2's ``COCOEvaluator`` with pycocotools (``use_fast_impl=False``: the
compiled evaluator is not shipped).

Several processes (torchrun, Slurm tasks: ``WORLD_SIZE`` > 1): the process group is initialised (NCCL on GPU, gloo
on the CPU) and detectron2's per-machine group created, as its ``launch()`` does; the model is wrapped in
``DistributedDataParallel`` (``create_ddp_model``, ViTDet's options), each process loads ``optim.batch_size`` /
world images per step from its shard of the sampler and reseeds its augmentation with ``seed + rank``; evaluation
runs on every process's share of val2017 and is gathered on rank 0, which alone writes checkpoints and metric files.

Resume: the stage checkpoints every ``detect.checkpoint_every`` iterations into ``out_dir/d2`` and, when started
again, continues from the last one (these files are the stage's own; they load with weights_only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from repro.config import ConfigError
from repro.transfer.coco import ap_metrics, encoder_state, iterations, trivial_ap
from repro.transfer.convert_d2 import add_irpe, d2_vit_args, load_into_d2, use_irpe

CKPT_DIR = "d2"


def register_coco(root: Path) -> tuple[str, str, int]:
    """Register ``root``'s train2017 / val2017 with detectron2 (once per process); (train, val, num_classes)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    names = []
    for split in ("train2017", "val2017"):
        name = f"repro_{split}_{tag}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(root / "annotations" / f"instances_{split}.json"),
                                    str(root / split))
        names.append(name)
    cats = json.loads((root / "annotations" / "instances_val2017.json").read_text())["categories"]
    return names[0], names[1], len(cats)


def pyramid_levels(patch: int, scales: Sequence[float]) -> list[int]:
    """Strides of the simple feature pyramid's outputs (without the max-pool level)."""
    strides = [patch / s for s in scales]
    if min(strides) < 1:
        raise ConfigError(f"patch {patch} is too small for pyramid scale {max(scales)} (stride below one pixel); "
                          "lower detect.scale_factors")
    return [int(s) for s in strides]


def build_model(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], num_classes: int) -> torch.nn.Module:
    """ViTDet Mask R-CNN from detectron2's LazyConfig, sized for ``state`` and ``cfg``; weights not loaded."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec

    from repro.models.vit import arch_dims

    det, img = cfg["detect"], int(cfg["data"]["img_size"])
    heads = arch_dims(cfg["model"])["num_heads"]
    args = d2_vit_args(state, num_heads=heads, img_size=img, window_size=det["window_size"],
                       global_blocks=det["global_blocks"], use_rel_pos=det["use_rel_pos"],
                       drop_path=float(cfg["model"].get("drop_path") or 0.0))
    dims = arch_dims(cfg["model"])
    if args["embed_dim"] != dims["embed_dim"] or args["depth"] != dims["depth"]:
        raise ConfigError(f"the encoder checkpoint is {args['embed_dim']} wide x {args['depth']} deep, "
                          f"model.arch={cfg['model']['arch']} is {dims['embed_dim']} x {dims['depth']}")
    m = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    m.backbone.net.update(args)
    ch = int(det["fpn_channels"])
    m.backbone.out_channels = ch
    m.backbone.square_pad = img
    m.backbone.scale_factors = tuple(float(f) for f in det["scale_factors"])
    strides = pyramid_levels(args["patch_size"], m.backbone.scale_factors)
    names = [f"p{int(math.log2(s))}" for s in strides]
    top = f"p{int(math.log2(strides[-1])) + 1}"
    m.proposal_generator.in_features = [*names, top]
    m.proposal_generator.head.in_channels = ch
    m.proposal_generator.pre_nms_topk = tuple(int(k) for k in det["rpn_pre_nms_topk"])
    m.proposal_generator.post_nms_topk = tuple(int(k) for k in det["rpn_post_nms_topk"])
    m.proposal_generator.anchor_generator.sizes = [[8 * s] for s in [*strides, strides[-1] * 2]]
    m.proposal_generator.anchor_generator.strides = [*strides, strides[-1] * 2]
    rh = m.roi_heads
    rh.num_classes = num_classes
    rh.batch_size_per_image = int(det["roi_batch_per_image"])
    rh.box_in_features = rh.mask_in_features = names
    for pooler in (rh.box_pooler, rh.mask_pooler):
        pooler.scales = tuple(1.0 / s for s in strides)
        # a box of 224 px on a 1024 image goes to the ViT's own stride (p4 at patch 16), at any image size
        pooler.canonical_box_size = max(1, round(224 * img / 1024))
        pooler.canonical_level = int(math.log2(args["patch_size"]))
    rh.box_head.input_shape = ShapeSpec(channels=ch, height=7, width=7)
    rh.box_head.conv_dims = [ch] * 4
    rh.box_head.fc_dims = [4 * ch]
    rh.box_predictor.input_shape = ShapeSpec(channels=4 * ch)
    rh.box_predictor.test_topk_per_image = int(det["max_dets"])
    rh.box_predictor.test_score_thresh = float(det["score_thresh"])
    rh.mask_head.input_shape = ShapeSpec(channels=ch, width=14, height=14)
    rh.mask_head.conv_dims = [ch] * 5
    model = instantiate(m)
    model.backbone.top_block.in_feature = names[-1]  # LastLevelMaxPool reads "p5" unless told
    if use_irpe(state):
        add_irpe(model.backbone.net)
    return model


def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module, depth: int) -> torch.optim.Optimizer:
    """ViTDet's AdamW: layer-wise lr decay (detectron2's ``get_vit_lr_decay_rate``), no decay on norms and
    ``pos_embed``."""
    from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
    from detectron2.solver.build import get_default_optimizer_params

    o = cfg["optim"]
    if o["name"] != "adamw":
        raise ConfigError(f"detect (detectron2) trains with AdamW; optim.name={o['name']!r} is not supported")
    params = get_default_optimizer_params(
        model, base_lr=float(o["lr"]), weight_decay=float(o["weight_decay"]), weight_decay_norm=0.0,
        overrides={"pos_embed": {"weight_decay": 0.0}},
        lr_factor_func=partial(get_vit_lr_decay_rate, lr_decay_rate=float(o["layer_decay"] or 1.0), num_layers=depth))
    return torch.optim.AdamW(params, lr=float(o["lr"]), betas=tuple(o["betas"]), weight_decay=float(o["weight_decay"]))


def lr_schedule(cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, max_iter: int, iters_per_epoch: float,
                ) -> Any:
    """Linear warm-up from ``warmup_factor`` over ``warmup_epochs``, then x0.1 at each of ``optim.steps``
    (fractions of training), as ViTDet's multi-step schedule."""
    from detectron2.solver import LRMultiplier, WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    o = cfg["optim"]
    steps = sorted({min(max_iter - 1, max(1, round(f * max_iter))) for f in o.get("steps") or []})
    sched = MultiStepParamScheduler(values=[0.1 ** i for i in range(len(steps) + 1)], milestones=steps or None,
                                    num_updates=max_iter)
    warm = min(1.0, float(o["warmup_epochs"]) * iters_per_epoch / max_iter)
    mult = WarmupParamScheduler(sched, warmup_factor=float(o["warmup_factor"]), warmup_length=warm)
    return LRMultiplier(optimizer, multiplier=mult, max_iter=max_iter)


def _loaders(cfg: Mapping[str, Any], train_name: str, val_name: str, batch: int) -> tuple[Any, Any, int]:
    import detectron2.data.transforms as T
    from detectron2.data import (
        DatasetMapper,
        build_detection_test_loader,
        build_detection_train_loader,
        get_detection_dataset_dicts,
    )
    from detectron2.data.samplers import TrainingSampler

    img = int(cfg["data"]["img_size"])
    lo, hi = cfg["detect"]["lsj_scale"]
    train_dicts = get_detection_dataset_dicts([train_name], filter_empty=True)
    mapper = DatasetMapper(is_train=True, image_format="RGB", use_instance_mask=True, instance_mask_format="bitmask",
                           recompute_boxes=True, augmentations=[
                               T.ResizeScale(min_scale=lo, max_scale=hi, target_height=img, target_width=img),
                               T.FixedSizeCrop(crop_size=(img, img), pad=False),
                               T.RandomFlip(horizontal=True)])
    workers = int(cfg["train"]["num_workers"])
    train = build_detection_train_loader(dataset=train_dicts, mapper=mapper, total_batch_size=batch,
                                         sampler=TrainingSampler(len(train_dicts), seed=int(cfg["seed"])),
                                         num_workers=workers)
    test_mapper = DatasetMapper(is_train=False, image_format="RGB",
                                augmentations=[T.ResizeShortestEdge(short_edge_length=img, max_size=img)])
    test = build_detection_test_loader(dataset=get_detection_dataset_dicts([val_name], filter_empty=False),
                                       mapper=test_mapper, num_workers=workers)
    return train, test, len(train_dicts)


def _precision(cfg: Mapping[str, Any], device: torch.device) -> str:
    p = cfg["train"].get("precision", "auto")
    if device.type != "cuda":
        return "fp32"
    if p == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return str(p)


def _distributed() -> Any:
    """This process's ``DistEnv``; with several processes the group is initialised (``repro.engine.dist.setup``:
    NCCL on GPU, gloo on the CPU) and detectron2's per-machine group created (``LOCAL_WORLD_SIZE``: set by torchrun
    and by submitit's task environment)."""
    from detectron2.utils import comm

    from repro.engine.dist import setup

    env = setup()
    if env.distributed:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
        comm.synchronize()
    return env


def run_detect_vitdet(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train ViTDet Mask R-CNN from the pretrained encoder, evaluate box / mask AP on val2017."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, hooks
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter
    from detectron2.utils.logger import setup_logger

    from repro.data.dense import dense_root

    t0 = time.time()
    out_dir = Path(out_dir)
    o = cfg["optim"]
    batch = int(o["batch_size"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise ConfigError(f"optim.batch_size={batch} is not divisible by the world size {world}")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _distributed()
    setup_logger(output=str(out_dir / "d2_log.txt"), distributed_rank=env.rank, name="detectron2", abbrev_name="d2")
    log = logging.getLogger("detectron2")
    root, _ = dense_root(cfg["data"], "coco")
    train_name, val_name, num_classes = register_coco(root)

    state = encoder_state(cfg, int(cfg["data"]["img_size"]))
    model = build_model(cfg, state, num_classes)
    load_info = load_into_d2(model, state)
    device = env.device
    model.to(device)
    if env.distributed:  # the same weights everywhere (seeded above); each rank its own augmentation draws
        seed_all_rng(int(cfg["seed"]) + env.rank)

    train_loader, test_loader, n_train = _loaders(cfg, train_name, val_name, batch)  # batch / world per process
    max_iter = iterations(float(o["epochs"]), n_train, batch)
    stop_at = min(max_iter, int(cfg["train"]["max_steps"])) if cfg["train"].get("max_steps") else max_iter
    depth = len(model.backbone.net.blocks)
    optimizer = build_optimizer(cfg, model, depth)
    precision = _precision(cfg, device)
    # ViTDet's DDP options (no buffer broadcast; every parameter takes part); one process: the model itself
    ddp = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=False,
                           fp16_compression=device.type == "cuda",
                           **({} if device.type == "cuda" else {"device_ids": None}))
    if precision == "fp32":
        trainer: Any = SimpleTrainer(ddp, train_loader, optimizer)
    else:
        trainer = AMPTrainer(ddp, train_loader, optimizer,
                             precision=torch.bfloat16 if precision == "bf16" else torch.float16)
    (out_dir / CKPT_DIR).mkdir(exist_ok=True)
    # writes on rank 0 only (detectron2's default), every rank loads when resuming
    ckpt = DetectionCheckpointer(model, str(out_dir / CKPT_DIR), optimizer=optimizer, trainer=trainer)
    every = max(1, min(int(cfg["detect"]["checkpoint_every"]), stop_at))
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=lr_schedule(cfg, optimizer, max_iter, n_train / batch)),
        hooks.PeriodicCheckpointer(ckpt, period=every, max_iter=stop_at, max_to_keep=1),
        hooks.PeriodicWriter([CommonMetricPrinter(stop_at), JSONWriter(str(out_dir / "d2_metrics.json"))],
                             period=int(cfg["train"]["log_every"])) if env.is_main else None,
    ])
    start = 0
    if ckpt.has_checkpoint():  # the stage's own earlier run: continue where it stopped
        ckpt.resume_or_load("", resume=True)
        start = trainer.iter + 1
        log.info("resumed from iteration %d", start)
    trainer.train(start, stop_at)
    completed = stop_at == max_iter
    metrics: dict[str, float] = {}
    if completed:
        # each rank runs its shard of val2017; the evaluator gathers the predictions and scores them on rank 0
        evaluator = COCOEvaluator(val_name, output_dir=str(out_dir / "eval"), use_fast_impl=False,
                                  max_dets_per_image=int(cfg["detect"]["max_dets"]))
        res = inference_on_dataset(model, test_loader, evaluator)
        if env.is_main:
            metrics = {**ap_metrics("box", res.get("bbox", {})), **ap_metrics("mask", res.get("segm", {}))}
            ann = root / "annotations"
            metrics.update(trivial_ap(ann / "instances_train2017.json", ann / "instances_val2017.json"))
    wall = time.time() - t0
    return {"metrics": metrics,
            "accounting": {"wall_s": wall, "device_s": wall * env.world_size, "images": (stop_at - start) * batch,
                           "precision": precision, "completed": completed, "iterations": stop_at,
                           "world_size": env.world_size},
            "artifacts": {"checkpoints": str(out_dir / CKPT_DIR), "dropped_keys": load_info["dropped"],
                          "new_backbone_keys": len(load_info["new"])}}


def synthetic_loss(cfg: Mapping[str, Any], images: int = 2) -> Any:
    """A closure computing ViTDet's training losses on ``images`` random square crops of ``data.img_size``, each
    with 8 random boxes and box-filled masks, on the CPU with random weights (``repro profile --transfer-flops``)."""
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    img = int(cfg["data"]["img_size"])
    model = build_model(cfg, encoder_state(cfg, img), 80).train()
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        inst = Instances((img, img))
        xy = torch.rand(8, 2, generator=g) * img * 0.6
        boxes = torch.cat([xy, xy + torch.rand(8, 2, generator=g) * img * 0.3 + img / 32], 1)
        masks = torch.zeros(8, img, img, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_boxes, inst.gt_masks = Boxes(boxes), BitMasks(masks)
        inst.gt_classes = torch.randint(0, 80, (8,), generator=g)
        batch.append({"image": torch.rand(3, img, img, generator=g) * 255, "instances": inst,
                      "height": img, "width": img})

    def loss() -> torch.Tensor:
        with EventStorage(0):  # the heads log their sampling statistics there
            return sum(model(batch).values())

    return loss
