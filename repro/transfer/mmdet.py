"""``detect`` on mmdetection: Mask R-CNN + FPN with our pretrained Swin or ViT as backbone, trained by mmengine's
``Runner`` (the real framework: its data pipeline, hooks, optimiser wrapper and ``CocoMetric`` evaluation).

The config starts from the file mmdet itself ships for Swin Mask R-CNN (``swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-
3x_coco.py``: its model, dataset, runtime and the DETR-style multi-scale + crop training pipeline of the Swin 3x
recipe), and the recipe replaces what it sets: the backbone (``repro.transfer.convert_mm``: mmdet's
``SwinTransformer`` loading the converted encoder, or ``ReproViT`` for a ViT, which trains on fixed square LSJ
crops as the ViT detection protocols do), the data root and classes, the schedule (epochs, linear warm-up, x0.1 at
``optim.steps`` fractions), AdamW (no decay on norms and position tables, as the Swin recipe), batch and widths.
Sizes of the shipped pipeline (800 px short side) are scaled by ``data.img_size / 800``.

Evaluation: mmdet's ``CocoMetric`` runs and dumps the detections; box and mask AP, AP50, AP75 are read from them
with pycocotools' ``COCOeval`` at full precision (``CocoMetric`` rounds to 3 digits of 0-1).

Several processes (torchrun, Slurm tasks: ``WORLD_SIZE`` > 1): mmengine's ``pytorch`` launcher on a process group
initialised here first (``repro.engine.dist.setup``: NCCL on GPU, gloo on the CPU, where mmengine's own set-up would
pick a CUDA device), ``MMDistributedDataParallel`` (without device ids on the CPU), ``optim.batch_size`` / world
images per process and step, and on GPUs the ViT adapter's BatchNorm as SyncBN (the BEiT / MAE detection protocol;
torch's SyncBN has no CPU kernel, so CPU processes keep per-process statistics). ``CocoMetric`` gathers the
detections on rank 0, which alone scores them and writes the checkpoints.

Checkpoints: the converted backbone file is a plain tensor dict (mmengine loads it weights_only). mmengine's own
checkpoints hold non-tensor state; resuming from them (a stage started again after a stop) is the one load done with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, set only around that call and only for files this stage wrote.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from repro.config import ConfigError
from repro.io import atomic_torch_save, own_framework_checkpoints
from repro.transfer.coco import ap_metrics, coco_stats, encoder_state, trivial_ap

SWIN_CONFIG = "swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py"
BACKBONE_FILE = "backbone_mmdet.pth"
WORK_DIR = "mmdet"


def shipped_config(name: str = SWIN_CONFIG) -> Any:
    """An mmengine ``Config`` of a config file shipped inside the mmdet package."""
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / name
    if not path.is_file():
        raise ConfigError(f"mmdet's config {name} is not in the installed package ({path}); reinstall mmdet==3.3.0")
    return Config.fromfile(str(path))


def _scaled(value: Any, k: float) -> Any:
    """Pipeline sizes (ints, tuples, lists of tuples) times ``k``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(1, round(value * k))
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, k) for v in value)
    return value


def _scale_pipeline(steps: list[Any], k: float) -> list[Any]:
    out = []
    for step in steps:
        if isinstance(step, list):
            out.append(_scale_pipeline(step, k))
            continue
        step = dict(step)
        for key in ("scale", "scales", "crop_size"):
            if key in step:
                step[key] = _scaled(step[key], k)
        if "transforms" in step:
            step["transforms"] = _scale_pipeline(step["transforms"], k)
        out.append(step)
    return out


def lsj_pipelines(img: int, scale: tuple[float, float]) -> tuple[list[dict], list[dict]]:
    """(train, test) pipelines of square ``img`` inputs: large-scale jitter + crop + pad (mmdet's LSJ recipe)."""
    train = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
             dict(type="RandomResize", scale=(img, img), ratio_range=tuple(scale), keep_ratio=True),
             dict(type="RandomCrop", crop_type="absolute_range", crop_size=(img, img), recompute_bbox=True,
                  allow_negative_crop=True),
             dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)), dict(type="RandomFlip", prob=0.5),
             dict(type="Pad", size=(img, img), pad_val=dict(img=(114, 114, 114))), dict(type="PackDetInputs")]
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(img, img), keep_ratio=True),
            dict(type="Pad", size=(img, img), pad_val=dict(img=(114, 114, 114))),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    return train, test


NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm", "pos_embed", "cls_token", "rel_table",
            "rpe_k")  # parameter-name parts trained without weight decay


def vit_layer_decay_keys(state: Mapping[str, torch.Tensor], decay: float) -> dict[str, dict[str, float]]:
    """mmengine ``custom_keys`` giving the ``ReproViT`` encoder ViTDet's layer-wise lr decay: block i of D trains at
    lr x decay ** (D - i), the embeddings (patch, position, cls) at decay ** (D + 1). One key per encoder tensor
    (its full name, so it wins over the shorter keys), keeping ``NO_DECAY``'s zero weight decay."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    keys = {}
    for name in state:
        if name.startswith("blocks."):
            mult = decay ** (depth - int(name.split(".")[1]))
        elif name.split(".")[0] in ("patch_embed", "pos_embed", "cls_token"):
            mult = decay ** (depth + 1)
        else:
            continue
        keys[f"backbone.vit.{name}"] = dict(lr_mult=mult, decay_mult=0.0 if any(n in name for n in NO_DECAY) else 1.0)
    return keys


def is_swin_state(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".relative_position_bias_table" in k for k in state) and "layers.0.blocks.0.norm1.weight" in state


def build_config(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], out_dir: Path, root: Path,
                 classes: list[str] | None, n_train: int, world_size: int = 1) -> tuple[Any, dict[str, Any]]:
    """(mmengine Config of the whole run, facts for the report: backbone kind, iterations); ``world_size``
    processes share each step's ``optim.batch_size`` images."""
    from repro.transfer import convert_mm

    det, o, data = cfg["detect"], cfg["optim"], cfg["data"]
    img, ch, batch = int(data["img_size"]), int(det["fpn_channels"]), int(o["batch_size"])
    if batch % world_size:
        raise ConfigError(f"optim.batch_size={batch} is not divisible by the world size {world_size}")
    if o["name"] != "adamw":
        raise ConfigError(f"detect (mmdet) trains with AdamW; optim.name={o['name']!r} is not supported")
    if o.get("layer_decay") and is_swin_state(state):
        raise ConfigError("detect (mmdet): layer-wise lr decay is not wired for Swin; set optim.layer_decay=null")
    mm = shipped_config()
    model = mm.model
    drop_path = float(cfg["model"].get("drop_path") or 0.0)
    if is_swin_state(state):
        conv, _ = convert_mm.convert_swin_to_mm(state)
        atomic_torch_save(conv, out_dir / BACKBONE_FILE)
        window = int(cfg["model"].get("window_size") or convert_mm.swin_geometry(state)["pretrain_window"])
        model.backbone = convert_mm.mm_swin_backbone(state, window_size=window, drop_path=drop_path,
                                                     checkpoint=str(out_dir / BACKBONE_FILE))
        in_ch, strides = convert_mm.swin_channels(state), convert_mm.swin_strides(state)
        train_pipe = _scale_pipeline(mm.train_pipeline, img / 800)
        test_pipe = _scale_pipeline(mm.test_pipeline, img / 800)
        kind = "swin"
    else:
        convert_mm.register_repro_vit()
        init = cfg.get("init")
        if init in (None, "", "random"):  # the no-pretraining row: a fresh encoder, written like a pretrained one
            atomic_torch_save(dict(state), out_dir / BACKBONE_FILE)
            init = str(out_dir / BACKBONE_FILE)
        model_cfg = {k: v for k, v in cfg["model"].items() if k != "drop_path"}
        model.backbone = dict(type="ReproViT", model_cfg=model_cfg, img_size=img, out_indices=list(det["out_indices"]),
                              checkpoint=init, drop_path=drop_path)
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        d = int(state["patch_embed.proj.weight"].shape[0])
        in_ch, strides = [d] * 4, [patch // 4, patch // 2, patch, patch * 2]
        train_pipe, test_pipe = lsj_pipelines(img, tuple(det["lsj_scale"]))
        kind = "vit"
    if strides[0] < 1:
        raise ConfigError(f"patch {strides[2]} is too small for the 4x pyramid level")
    levels = [*strides, strides[-1] * 2]
    model.neck.in_channels = in_ch
    model.neck.out_channels = ch
    rpn = model.rpn_head
    rpn.in_channels = rpn.feat_channels = ch
    rpn.anchor_generator.strides = levels
    rh = model.roi_head
    for ext in (rh.bbox_roi_extractor, rh.mask_roi_extractor):
        ext.out_channels = ch
        ext.featmap_strides = strides
        ext.finest_scale = max(1, round(56 * strides[0] / 4))  # 56 at the paper's stride-4 finest level
    n_cls = len(classes) if classes else 80
    rh.bbox_head.in_channels = ch
    rh.bbox_head.fc_out_channels = 4 * ch
    rh.bbox_head.num_classes = n_cls
    rh.mask_head.in_channels = rh.mask_head.conv_out_channels = ch
    rh.mask_head.num_classes = n_cls
    tc = model.train_cfg
    tc.rcnn.sampler.num = int(det["roi_batch_per_image"])
    tc.rpn_proposal.nms_pre, model.test_cfg.rpn.nms_pre = (int(k) for k in det["rpn_pre_nms_topk"])
    tc.rpn_proposal.max_per_img, model.test_cfg.rpn.max_per_img = (int(k) for k in det["rpn_post_nms_topk"])
    model.test_cfg.rcnn.max_per_img = int(det["max_dets"])
    model.test_cfg.rcnn.score_thr = float(det["score_thresh"])

    metainfo = {"classes": tuple(classes)} if classes else None
    workers = int(cfg["train"]["num_workers"])

    def dataset(split: str, pipeline: list[Any], train: bool) -> dict[str, Any]:
        ds = dict(type="CocoDataset", data_root=str(root), ann_file=f"annotations/instances_{split}.json",
                  data_prefix=dict(img=f"{split}/"), pipeline=pipeline, backend_args=None, test_mode=not train)
        if train:
            ds["filter_cfg"] = dict(filter_empty_gt=True, min_size=max(1, round(32 * img / 800)))
        if metainfo:
            ds["metainfo"] = metainfo
        return ds

    mm.train_dataloader = dict(batch_size=batch // world_size, num_workers=workers, persistent_workers=workers > 0,
                               sampler=dict(type="DefaultSampler", shuffle=True),
                               batch_sampler=dict(type="AspectRatioBatchSampler"),
                               dataset=dataset("train2017", train_pipe, True))
    mm.test_dataloader = dict(batch_size=1, num_workers=workers, persistent_workers=workers > 0, drop_last=False,
                              sampler=dict(type="DefaultSampler", shuffle=False),
                              dataset=dataset("val2017", test_pipe, False))
    (out_dir / "eval").mkdir(exist_ok=True)
    mm.test_evaluator = dict(type="CocoMetric", ann_file=str(root / "annotations" / "instances_val2017.json"),
                             metric=["bbox", "segm"], format_only=False, backend_args=None,
                             outfile_prefix=str(out_dir / "eval" / "results"))
    mm.val_dataloader = mm.val_evaluator = mm.val_cfg = None
    epochs = int(math.ceil(float(o["epochs"])))
    iters_per_epoch = max(1, math.ceil(n_train / batch))
    max_iter = epochs * iters_per_epoch
    mm.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=epochs + 1)
    warm = max(1, min(max_iter, round(float(o["warmup_epochs"]) * iters_per_epoch)))
    steps = sorted({max(1, min(max_iter - 1, round(f * max_iter))) for f in o.get("steps") or []})
    mm.param_scheduler = [
        dict(type="LinearLR", start_factor=float(o["warmup_factor"]), by_epoch=False, begin=0, end=warm),
        dict(type="MultiStepLR", begin=0, end=max_iter, by_epoch=False, milestones=steps, gamma=0.1)]
    precision = _precision(cfg)
    wrapper: dict[str, Any] = dict(type="OptimWrapper")
    if precision != "fp32":
        wrapper = dict(type="AmpOptimWrapper", dtype="bfloat16" if precision == "bf16" else "float16")
    keys = {k: dict(decay_mult=0.0) for k in NO_DECAY}
    if o.get("layer_decay"):  # a ViT (Swin refused above)
        keys.update(vit_layer_decay_keys(state, float(o["layer_decay"])))
    mm.optim_wrapper = dict(**wrapper, optimizer=dict(type="AdamW", lr=float(o["lr"]), betas=tuple(o["betas"]),
                                                      weight_decay=float(o["weight_decay"])),
                            paramwise_cfg=dict(custom_keys=keys),
                            clip_grad=dict(max_norm=float(o["clip_grad"])) if o.get("clip_grad") else None)
    hooks = copy.deepcopy(mm.default_hooks)
    hooks.logger = dict(type="LoggerHook", interval=int(cfg["train"]["log_every"]))
    hooks.checkpoint = dict(type="CheckpointHook", interval=1, max_keep_ckpts=1, save_last=True)
    hooks.pop("visualization", None)
    mm.default_hooks = hooks
    mm.log_processor = dict(type="LogProcessor", window_size=int(cfg["train"]["log_every"]), by_epoch=True)
    mm.work_dir = str(out_dir / WORK_DIR)
    mm.randomness = dict(seed=int(cfg["seed"]), deterministic=False)
    cuda = torch.cuda.is_available()
    mm.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                      dist_cfg=dict(backend="nccl" if cuda else "gloo"))
    mm.launcher = "none"
    if world_size > 1:
        mm.launcher = "pytorch"
        # mmengine passes device_ids=[LOCAL_RANK] unless told: a CPU module takes none. The ViT's final norm feeds
        # no pyramid level (the adapter reads block outputs): DDP must be told that some parameters take no gradient
        mm.model_wrapper_cfg = dict(type="MMDistributedDataParallel", broadcast_buffers=False,
                                    find_unused_parameters=kind == "vit", **({} if cuda else {"device_ids": None}))
        if cuda:
            mm.sync_bn = "torch"  # BatchNorm (the ViT adapter's) -> SyncBN across the processes
    mm.load_from = None
    mm.resume = False
    mm.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")])  # run-named
    return mm, {"backbone": kind, "iterations": max_iter, "precision": precision}


def _precision(cfg: Mapping[str, Any]) -> str:
    if not torch.cuda.is_available():
        return "fp32"
    p = cfg["train"].get("precision", "auto")
    if p == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return str(p)


def _count_train(root: Path) -> int:
    ann = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    return len({a["image_id"] for a in ann["annotations"]})


def backbone_key_check(runner: Any, out_dir: Path) -> dict[str, list[str]]:
    """Refuse a converted Swin checkpoint with a missing or unexpected backbone key (mmdet's Swin loads it
    non-strictly): only the new output norms and the computed index buffers may be missing."""
    from mmengine.model import is_model_wrapper

    path = out_dir / BACKBONE_FILE
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model  # DDP with several processes
    backbone = model.backbone
    if not hasattr(backbone, "stages"):
        return {"missing": [], "unexpected": []}
    conv = {k[len("backbone."):] for k in torch.load(path, map_location="cpu", weights_only=True)}
    own = set(backbone.state_dict())
    new = {k for k in own - conv if k.endswith("relative_position_index") or k.split(".")[0].startswith("norm")}
    missing, unexpected = sorted(own - conv - new), sorted(conv - own)
    if missing or unexpected:
        raise ConfigError(f"encoder does not fit mmdet's SwinTransformer: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}")
    return {"missing": sorted(new), "unexpected": []}


def run_detect_mmdet(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train Mask R-CNN + FPN with mmengine's Runner from the pretrained encoder; box and mask AP on val2017."""
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    from repro.data.dense import dense_root
    from repro.engine.dist import setup

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    register_all_modules(init_default_scope=True)
    root, info = dense_root(cfg["data"], "coco")
    state = encoder_state(cfg, int(cfg["data"]["img_size"]))
    n_train = _count_train(root)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mm, facts = build_config(cfg, state, out_dir, root, info.get("classes"), n_train, world)
    stop = cfg["train"].get("max_steps")
    if stop:
        raise ConfigError("train.max_steps is not supported by the mmdet detect stage (epoch-based loop)")
    env = setup()  # several processes: the group exists before mmengine looks (it then skips its own set-up)
    runner = Runner.from_cfg(mm)
    work = out_dir / WORK_DIR
    if (work / "last_checkpoint").is_file():  # the stage's own earlier run: continue from its last epoch
        runner._resume = True
        resume = runner.resume

        def resume_own(*args: Any, **kw: Any) -> Any:  # the only load of a file that is not weights-only
            with own_framework_checkpoints():
                return resume(*args, **kw)

        runner.resume = resume_own
    runner.train()
    keys = backbone_key_check(runner, out_dir)
    runner.test()  # CocoMetric logs its (3-digit) summary and dumps the detections, scored here at full precision
    ann = root / "annotations"
    metrics = {}
    if env.is_main:  # CocoMetric gathered every rank's detections and dumped them here
        for prefix, key in (("box", "bbox"), ("mask", "segm")):
            dumped = out_dir / "eval" / f"results.{key}.json"
            dets = json.loads(dumped.read_text()) if dumped.is_file() else []
            metrics.update(ap_metrics(prefix, coco_stats(ann / "instances_val2017.json", dets, key)))
        metrics.update(trivial_ap(ann / "instances_train2017.json", ann / "instances_val2017.json"))
    wall = time.time() - t0
    batch = int(cfg["optim"]["batch_size"])
    return {"metrics": metrics,
            "accounting": {"wall_s": wall, "device_s": wall * env.world_size, "images": facts["iterations"] * batch,
                           "precision": facts["precision"], "completed": True, "iterations": facts["iterations"],
                           "world_size": env.world_size},
            "artifacts": {"work_dir": str(work), "backbone": facts["backbone"], "new_backbone_keys": keys["missing"]}}


def synthetic_loss(cfg: Mapping[str, Any], images: int = 2) -> Any:
    """A closure computing Mask R-CNN's training losses on ``images`` random images, each with 8 random boxes and
    box-filled masks, on the CPU with random weights (``repro profile --transfer-flops``). The image is the
    pipeline's largest training input: the square LSJ crop (ViT), or 800 x 1333 scaled by ``data.img_size`` / 800
    (the shipped Swin pipeline's largest scale)."""
    import tempfile

    import numpy as np
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmdet.utils import register_all_modules
    from mmengine.structures import InstanceData

    from repro.models.archs import is_swin
    from repro.profile.projection import DATASET_SIZES

    register_all_modules(init_default_scope=True)
    img = int(cfg["data"]["img_size"])
    # a random Swin built at 224 px: its weights do not depend on the input size, and mmdet's Swin pads any input
    state = encoder_state(cfg, 224 if is_swin(str(cfg["model"]["arch"])) else img)
    with tempfile.TemporaryDirectory() as tmp:
        mm, _ = build_config(cfg, state, Path(tmp), Path(tmp), None, DATASET_SIZES["coco"])
    model = MODELS.build(mm.model).train()
    h, w = (img, round(img * 1333 / 800)) if is_swin_state(state) else (img, img)
    g = torch.Generator().manual_seed(0)
    x = [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for _ in range(images)]
    samples = []
    for _ in range(images):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w, h]) * 0.6
        boxes = torch.cat([xy, xy + torch.rand(8, 2, generator=g) * torch.tensor([w, h]) * 0.3 + img / 32], 1)
        masks = np.zeros((8, h, w), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        s = DetDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)})
        s.gt_instances = InstanceData(bboxes=boxes, labels=torch.randint(0, 80, (8,), generator=g),
                                      masks=BitmapMasks(masks, h, w))
        samples.append(s)

    def loss() -> torch.Tensor:  # the data preprocessor normalises and pads the batch as in training
        data = model.data_preprocessor({"inputs": x, "data_samples": samples}, True)
        out = model.loss(data["inputs"], data["data_samples"])
        return sum(v if isinstance(v, torch.Tensor) else sum(v) for k, v in out.items() if "loss" in k)

    return loss
