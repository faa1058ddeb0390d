#!/usr/bin/env python
"""Time full pretraining steps of the OFFICIAL LocalMIM (ViT-B, Swin-B), SimMIM (ViT-B, Swin-B), BEiT (ViT-B),
GreenMIM (Swin-B) and MaskFeat (ViT-B) code.

The official code is not in this repository: export_extra.sh writes it at run time into EXPORT_DIR (localmim_vit/,
localmim_swin/, simmim/, beit/, greenmim/), export_maskfeat.sh writes maskfeat/ (SlowFast, with the packages its
imports need in maskfeat/_deps; a CPU-only export: see that script), and each configuration imports it from there in
its own process (the repos share module names such as models_mim and util.pos_embed; a fresh process also gives
per-config peak memory).

One step = [the official loop's no-grad target step, timed as tok_s] + forward (the model's own loss) + backward +
AdamW step (torch's default implementation: foreach on CUDA, as the official scripts construct it) + zero_grad, on
fixed random images; the official loops' GradScaler / apex amp and grad clipping are left out, as in
../shared/bench/bench_official.py. Masks the official loaders make in their workers (SimMIM, BEiT) are made once,
outside the step. CPU: fp32; --device cuda: bf16 autocast with torch.cuda.synchronize around every timed phase.
Writes the runs[] / agg[] JSON of bench_official.py (`repro profile --side-by-side DIR` reads every official*.json in
DIR), each run with `notes` saying what its step includes; a configuration that fails or times out is recorded under
errors[] and the others still run.

Usage:
    python bench_extra.py EXPORT_DIR [--device cpu|cuda] [--batch N] [--warmup 2] [--steps 5]
                          [--configs all|NAME,...] [--timeout 600] [--json OUT.json]
    python bench_extra.py EXPORT_DIR --list
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

# name -> settings of the official pretraining command (README / run_pretrain.py / config yaml)
CONFIGS: dict[str, dict[str, Any]] = {
    # LocalMIM/ViT README: --model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 (hog_bias off), wd 0.05
    "localmim-vit-224": dict(repo="localmim_vit", img=224, model="MIM_vit_base_patch16", hog_nbins=9,
                             hog_bias=False, mask_ratio=0.75),
    # LocalMIM/Swin README: --model mim_swin_base_patch4_win7 --target HOG --hog_nbins 18 --hog_bias
    # --mask_ratio 0.75; run_pretrain.py --input_size 224 (the model fixes img_size=224, window 7)
    "localmim-swin-224": dict(repo="localmim_swin", img=224, model="mim_swin_base_patch4_win7", hog_nbins=18,
                              hog_bias=True, mask_ratio=0.75),
    # SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml + config.py defaults
    "simmim-vit-224": dict(repo="simmim", img=224, type="vit", drop_path=0.1, mask_patch=32, mask_ratio=0.6),
    # SimMIM configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml
    "simmim-swin-192": dict(repo="simmim", img=192, type="swin", drop_path=0.0, mask_patch=32, mask_ratio=0.6,
                            window=6),
    # BEiT README (ImageNet-1k pretraining) + run_beit_pretraining.py defaults: beit_base_patch16_224_8k_vocab,
    # --num_mask_patches 75, min 16 per block, --drop_path 0.1, --layer_scale_init_value 0.1, shared relative
    # position bias on, no absolute positions, AdamW (0.9, 0.999), eps 1e-8, wd 0.05, 128 per GPU. The targets are
    # given (random token ids): the DALL-E dVAE forward that makes them is not in this step
    "beit-224": dict(repo="beit", img=224, num_mask=75, min_block=16, drop_path=0.1, init_values=0.1,
                     tokenizer=False),
    # the same step with the official tokenizer forward: Dalle_VAE.get_codebook_indices on the 112-px second view
    # (OpenAI's dVAE encoder from beit/dall_e with random weights; fp16 convs on CUDA as its Conv2d does; outside
    # autocast and under no_grad as engine_for_pretraining.py runs it)
    "beit-224-dvae": dict(repo="beit", img=224, num_mask=75, min_block=16, drop_path=0.1, init_values=0.1,
                          tokenizer=True, second_size=112),
    # GreenMIM scripts/run_greenmim_swin_base.sh / srun_greenmim_swin_base.sh: green_mim_swin_base_patch4_dec512b1
    # (Swin-B 224, window 7, grouped window attention over the visible patches; decoder 512 x 1 block over the 7 x 7
    # grid of 32-px units), --mask_ratio 0.75, --norm_pix_loss; main_pretrain.py: AdamW (0.9, 0.95), wd 0.05
    "greenmim-swin-224": dict(repo="greenmim", img=224, model="green_mim_swin_base_patch4_dec512b1",
                              mask_ratio=0.75, norm_pix_loss=True),
    # SlowFast configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml: MaskMViT as a ViT-B/16 (no pooling, cls token,
    # learned absolute positions), HOG target from block 11, masks from datasets/imagenet.py's MaskingGenerator
    # (round(0.4 x 196) = 78 patches, blocks of >= 78 // 5), loss multi_mse; construct_optimizer: AdamW (0.9, 0.999),
    # wd 0.05, none on 1-D parameters and biases (ZERO_WD_1D_PARAM)
    "maskfeat-224": dict(repo="maskfeat", img=224, config="configs/in1k_VIT_B_MaskFeat_PT.yaml"),
}
DEFAULT_BATCH = 8  # CPU default, as bench_official.py at 224 px


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _param_groups(model: Any, weight_decay: float, skip: set[str] = frozenset(),
                  skip_keywords: set[str] = frozenset()) -> list[dict[str, Any]]:
    """The official scripts' split: no decay for 1-D tensors, biases, skipped names or keywords; frozen ones left
    out (timm 0.3.2 add_weight_decay in LocalMIM; SimMIM's get_pretrain_param_groups adds the keywords)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in skip_keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _simmim_config(cfg: dict[str, Any]) -> SimpleNamespace:
    """The attributes build_simmim reads, from SimMIM's config.py defaults and the pretraining yaml."""
    ns = SimpleNamespace
    swin = ns(PATCH_SIZE=4, IN_CHANS=3, EMBED_DIM=128, DEPTHS=[2, 2, 18, 2], NUM_HEADS=[4, 8, 16, 32],
              WINDOW_SIZE=cfg.get("window", 7), MLP_RATIO=4.0, QKV_BIAS=True, QK_SCALE=None, APE=False,
              PATCH_NORM=True)
    vit = ns(PATCH_SIZE=16, IN_CHANS=3, EMBED_DIM=768, DEPTH=12, NUM_HEADS=12, MLP_RATIO=4, QKV_BIAS=True,
             INIT_VALUES=0.1, USE_APE=False, USE_RPB=False, USE_SHARED_RPB=True, USE_MEAN_POOLING=False)
    return ns(MODEL=ns(TYPE=cfg["type"], DROP_RATE=0.0, DROP_PATH_RATE=cfg["drop_path"], SWIN=swin, VIT=vit),
              DATA=ns(IMG_SIZE=cfg["img"], MASK_PATCH_SIZE=cfg["mask_patch"], MASK_RATIO=cfg["mask_ratio"]),
              TRAIN=ns(USE_CHECKPOINT=False))


def _build(export_dir: str, name: str, batch: int, dev: Any) -> tuple[Any, list[dict[str, Any]], dict[str, Any],
                                                                        Callable[[], Any], dict[str, Any], Any,
                                                                        Callable[[], None] | None]:
    """The official model, its optimizer groups, optimizer kwargs, a forward giving the loss, provenance, module, and
    the official loop's no-grad target step that runs before the forward (None where there is none)."""
    import torch

    cfg = CONFIGS[name]
    S = cfg["img"]
    x = torch.randn(batch, 3, S, S, device=dev)
    info: dict[str, Any] = {}
    prepare: Callable[[], None] | None = None
    if cfg["repo"] == "localmim_vit":
        import models_mim as mod
        model = getattr(mod, cfg["model"])(hog_nbins=cfg["hog_nbins"], hog_bias=cfg["hog_bias"])
        groups = _param_groups(model, 0.05)  # run_pretrain.py: add_weight_decay(model, wd), no skip list
        opt_kw = dict(lr=2e-4, betas=(0.9, 0.95))

        def forward() -> Any:
            return model(x, mask_ratio=cfg["mask_ratio"])
        info["recipe"] = (f"{cfg['model']}(hog_nbins={cfg['hog_nbins']}, hog_bias={cfg['hog_bias']}), "
                          f"mask_ratio={cfg['mask_ratio']}; AdamW(0.9, 0.95), wd 0.05")
    elif cfg["repo"] == "localmim_swin":
        import models_mim as mod
        model = getattr(mod, cfg["model"])(target="HOG", hog_nbins=cfg["hog_nbins"], hog_bias=cfg["hog_bias"],
                                           norm_pix_loss=False)
        assert model.encoder.patch_embed.img_size == (S, S)
        # run_pretrain.py: no decay also for names with 'position_bias' or 'token'
        skip = {n for n, _ in model.named_parameters() if "position_bias" in n or "token" in n}
        groups = _param_groups(model, 0.05, skip)
        opt_kw = dict(lr=1e-4, betas=(0.9, 0.95))

        def forward() -> Any:
            loss, _, _ = model(x, mask_ratio=cfg["mask_ratio"])
            return loss
        info["recipe"] = (f"{cfg['model']}(target=HOG, hog_nbins={cfg['hog_nbins']}, hog_bias={cfg['hog_bias']}), "
                          f"mask_ratio={cfg['mask_ratio']} (one mask per batch, drawn on the host as official); "
                          "AdamW(0.9, 0.95), wd 0.05")
    elif cfg["repo"] == "simmim":
        import numpy as np
        from models import simmim as mod
        spec = importlib.util.spec_from_file_location(
            "data_simmim", os.path.join(export_dir, "simmim", "data", "data_simmim.py"))
        data_simmim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(data_simmim)
        config = _simmim_config(cfg)
        model = mod.build_simmim(config)
        patch = config.MODEL.SWIN.PATCH_SIZE if cfg["type"] == "swin" else config.MODEL.VIT.PATCH_SIZE
        np.random.seed(0)
        gen = data_simmim.MaskGenerator(S, cfg["mask_patch"], patch, cfg["mask_ratio"])
        # the loader's per-image masks (made by the workers, so outside the step)
        mask = torch.from_numpy(np.stack([gen() for _ in range(batch)])).to(dev)
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        kws = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
        groups = _param_groups(model, 0.05, set(skip), set(kws))
        opt_kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

        def forward() -> Any:
            return model(x, mask)
        info["recipe"] = (f"build_simmim({cfg['type']}, img {S}, mask {cfg['mask_patch']} px x {cfg['mask_ratio']}, "
                          f"drop_path {cfg['drop_path']}); AdamW(0.9, 0.999), wd 0.05; clip 5.0 and apex amp left out")
        info["notes"] = "masks from the official MaskGenerator, made once outside the step (the loader's work)"
    elif cfg["repo"] == "beit":
        model, groups, opt_kw, forward, prepare, mod = _build_beit(cfg, x, batch, dev, info)
    elif cfg["repo"] == "maskfeat":
        model, groups, opt_kw, forward, mod = _build_maskfeat(export_dir, cfg, x, batch, dev, info)
    elif cfg["repo"] == "greenmim":
        from modeling import model_factory as mod
        model = mod.get_pretrain_model(cfg["model"], norm_pix_loss=cfg["norm_pix_loss"])
        # main_pretrain.py: no decay for names with 'position_bias' or 'token' (+ timm's 1-D / bias rule)
        skip = {n for n, _ in model.named_parameters() if "position_bias" in n or "token" in n}
        groups = _param_groups(model, 0.05, skip)
        opt_kw = dict(lr=1e-4 * batch / 256, betas=(0.9, 0.95))

        def forward() -> Any:
            loss, _, _ = model(x, mask_ratio=cfg["mask_ratio"])
            return loss
        info["recipe"] = (f"{cfg['model']}(norm_pix_loss={cfg['norm_pix_loss']}), mask_ratio={cfg['mask_ratio']}; "
                          "AdamW(0.9, 0.95), wd 0.05")
        info["notes"] = ("the step includes the official per-batch mask (drawn on the device) and its host-side "
                         "grouping of windows (knapsack DP) inside the forward, as the official loop runs them")
    else:
        raise ValueError(cfg["repo"])
    return model, groups, opt_kw, forward, info, mod, prepare


def _build_beit(cfg: dict[str, Any], x: Any, batch: int, dev: Any, info: dict[str, Any]) -> tuple[
        Any, list[dict[str, Any]], dict[str, Any], Callable[[], Any], Callable[[], None], Any]:
    """BEiT: run_beit_pretraining.py's model and optimizer groups, the loader's block-wise masks (official
    MaskingGenerator, made once), and engine_for_pretraining.py's step: token ids (given, or from the dVAE on the
    second view) -> labels at the masked positions (no grad) -> LM-head logits of the masked positions under
    autocast -> cross-entropy."""
    import random

    import modeling_pretrain as mod
    import numpy as np
    import torch
    from masking_generator import MaskingGenerator
    from torch import nn

    model = mod.beit_base_patch16_224_8k_vocab(
        pretrained=False, drop_path_rate=cfg["drop_path"], drop_block_rate=None, use_shared_rel_pos_bias=True,
        use_abs_pos_emb=False, init_values=cfg["init_values"])
    grid = model.patch_embed.patch_shape
    random.seed(0)
    np.random.seed(0)
    gen = MaskingGenerator(grid, num_masking_patches=cfg["num_mask"], max_num_patches=None,
                           min_num_patches=cfg["min_block"])
    masks = torch.from_numpy(np.stack([gen() for _ in range(batch)])).to(dev).flatten(1).to(torch.bool)
    # optim_factory.get_parameter_groups: no decay for 1-D, biases and model.no_weight_decay()
    groups = _param_groups(model, 0.05, set(model.no_weight_decay()))
    opt_kw = dict(lr=1.5e-3, betas=(0.9, 0.999), eps=1e-8)
    vocab = model.lm_head.out_features
    state: dict[str, Any] = {}
    if cfg["tokenizer"]:
        from dall_e.encoder import Encoder
        from dall_e.utils import map_pixels
        from modeling_discrete_vae import Dalle_VAE

        d_vae = Dalle_VAE(cfg["second_size"])
        d_vae.encoder = Encoder(device=dev)  # random weights in place of encoder.pkl (load_model)
        # the loader's second view: ToTensor + map_pixels of the crop resized to second_size
        g = torch.Generator().manual_seed(1)
        images = map_pixels(torch.rand(batch, 3, cfg["second_size"], cfg["second_size"], generator=g)).to(dev)

        def token_ids() -> Any:
            return d_vae.get_codebook_indices(images).flatten(1)
        info["tokenizer"] = (f"Dalle_VAE({cfg['second_size']}).get_codebook_indices (dall_e Encoder, random "
                             f"weights, {'fp16 convs' if dev.type == 'cuda' else 'fp32'}) in the step")
    else:
        ids = torch.randint(0, vocab, (batch, grid[0] * grid[1]), generator=torch.Generator().manual_seed(1)).to(dev)

        def token_ids() -> Any:
            return ids
        info["tokenizer"] = "none in the step: token ids given (the dVAE forward excluded)"

    def prepare() -> None:
        with torch.no_grad():
            state["labels"] = token_ids()[masks]

    def forward() -> Any:
        outputs = model(x, bool_masked_pos=masks, return_all_tokens=False)
        return nn.CrossEntropyLoss()(input=outputs, target=state["labels"])
    info["recipe"] = (f"beit_base_patch16_224_8k_vocab(drop_path {cfg['drop_path']}, layer scale "
                      f"{cfg['init_values']}, shared rel-pos bias, no abs pos), {cfg['num_mask']} of "
                      f"{grid[0] * grid[1]} patches block-masked (min {cfg['min_block']}); AdamW(0.9, 0.999), "
                      "wd 0.05; clip 3.0 and the GradScaler left out")
    info["notes"] = ("official step: " + info["tokenizer"] + "; masks from the official MaskingGenerator, made once "
                     "outside the step (the loader's work). Ours (pretrain/beit) runs its tokenizer (the k-means "
                     "substitute for the dVAE: patch features + nearest of 8192 centroids) and draws its block "
                     "masks inside its step: beit-224 compares the model steps with ours doing that extra work; "
                     "beit-224-dvae is what the official pipeline pays with its real tokenizer")
    return model, groups, opt_kw, forward, prepare, mod


def _build_maskfeat(export_dir: str, cfg: dict[str, Any], x: Any, batch: int, dev: Any, info: dict[str, Any]
                    ) -> tuple[Any, list[dict[str, Any]], dict[str, Any], Callable[[], Any], Any]:
    """MaskFeat: SlowFast's MaskMViT built from the ImageNet ViT-B pretraining yaml, its construct_optimizer groups,
    the loader's masks (datasets/imagenet.py's MaskingGenerator settings, made once), and train_net.py's step:
    preds, labels = model([images, meta, masks]); loss = multi_mse(preds, labels)[0]."""
    import random

    import numpy as np
    import torch
    from slowfast.config.defaults import get_cfg
    from slowfast.datasets.transform import MaskingGenerator
    from slowfast.models import masked as mod
    from slowfast.models.losses import get_loss_func
    from slowfast.models.optimizer import construct_optimizer

    c = get_cfg()
    c.merge_from_file(os.path.join(export_dir, "maskfeat", cfg["config"]))
    c.NUM_GPUS = 1  # one process: construct_optimizer reads model.no_weight_decay() directly, not model.module's
    model = mod.MaskMViT(c)
    depth = c.MASK.PRETRAIN_DEPTH[-1]
    side = model.feat_size[depth][-1]
    num_mask = round(model.feat_size[depth][-1] * model.feat_size[depth][-2] * c.AUG.MASK_RATIO)
    random.seed(0)
    gen = MaskingGenerator(side, num_masking_patches=num_mask, max_num_patches=c.AUG.MAX_MASK_PATCHES_PER_BLOCK,
                           min_num_patches=num_mask // 5)
    masks = torch.from_numpy(np.stack([gen() for _ in range(batch)])).to(dev)
    meta = torch.empty(batch, 0, device=dev)
    optimizer = construct_optimizer(model, c)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    opt_kw = dict(lr=c.SOLVER.BASE_LR, betas=tuple(c.SOLVER.BETAS), eps=1e-8)
    loss_fn = get_loss_func(c.MODEL.LOSS_FUNC)(reduction="mean")
    info["official_optimizer"] = type(optimizer).__name__
    del optimizer

    def forward() -> Any:
        preds, labels = model([x, meta, masks])
        return loss_fn(preds, labels)[0]
    info["recipe"] = (f"MaskMViT({cfg['config']}: depth {c.MVIT.DEPTH}, dim {c.MVIT.EMBED_DIM}, HOG from block "
                      f"{depth}), {num_mask} of {side * side} patches block-masked (min {num_mask // 5}); AdamW "
                      f"{tuple(c.SOLVER.BETAS)}, wd {c.SOLVER.WEIGHT_DECAY}; clip {c.SOLVER.CLIP_GRAD_L2NORM} and "
                      "the GradScaler left out")
    info["notes"] = ("masks from SlowFast's MaskingGenerator with its ImageNet loader's settings, made once outside "
                     "the step (the loader's work); the HOG target is computed inside the model's forward, as ours")
    return model, groups, opt_kw, forward, mod


def run_child(export_dir: str, name: str, warmup: int, steps: int, threads: int, device: str, batch: int) -> None:
    """Build one configuration, time warmup + steps full steps, print one RESULT_JSON line."""
    import warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.join(export_dir, CONFIGS[name]["repo"]))
    deps = os.path.join(export_dir, CONFIGS[name]["repo"], "_deps")
    if os.path.isdir(deps):  # packages the official import chain needs beyond the environment (export_maskfeat.sh)
        sys.path.insert(1, deps)
    import timm
    import torch
    from timm.layers import use_fused_attn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model, groups, opt_kw, forward, info, mod, prepare = _build(export_dir, name, batch, dev)
    cfg = CONFIGS[name]
    info.update({"config": name, "repo": cfg["repo"], "img": cfg["img"], "batch": batch, "mode": "default",
                 "TIMM_FUSED_ATTN": os.environ.get("TIMM_FUSED_ATTN"), "timm_use_fused_attn": bool(use_fused_attn()),
                 "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads()})
    info["module_file"] = os.path.abspath(mod.__file__)
    assert info["module_file"].startswith(os.path.abspath(export_dir)), info["module_file"]
    commit = os.path.join(export_dir, cfg["repo"], "COMMIT")
    if os.path.exists(commit):
        with open(commit) as f:
            info["official_commit"] = f.read().strip()
    info["timm_attn_modules"] = sum(1 for m in model.modules() if hasattr(m, "fused_attn"))
    info["timm_attn_fused"] = sum(1 for m in model.modules() if getattr(m, "fused_attn", False))
    info["params_total_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    info["params_trainable_M"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6

    model.to(dev)
    model.train()
    # named as `repro profile` names devices, so that the side-by-side table pairs them
    cpu_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    info["device"] = torch.cuda.get_device_name(dev) if cuda else cpu_name
    info["amp"] = "bf16" if cuda else "fp32"
    optimizer = torch.optim.AdamW(groups, **opt_kw)  # default foreach (on CUDA), as the official scripts build it
    shown = ", ".join(f"{k}={v}" for k, v in opt_kw.items() if k != "lr")
    info["optimizer"] = f"torch.optim.AdamW({shown}), default implementation"
    info["rss_after_build_MiB"] = _rss_mib("VmRSS")

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_step: list[float] = []
    t_tok: list[float] = []
    t_fwd: list[float] = []
    t_bwd: list[float] = []
    t_opt: list[float] = []
    losses: list[float] = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        if prepare is not None:  # outside autocast, as the official loops run it
            prepare()
            sync()
        tp = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = forward()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        losses.append(float(loss.detach()))
        if i >= warmup:
            t_step.append(t3 - t0)
            t_tok.append(tp - t0)
            t_fwd.append(t1 - tp)
            t_bwd.append(t2 - t1)
            t_opt.append(t3 - t2)
    med = statistics.median(t_step)
    info.update({
        "warmup": warmup, "steps": steps, "step_times_s": t_step, "s_per_step": med, "s_per_img": med / batch,
        "tok_s": statistics.median(t_tok), "fwd_s": statistics.median(t_fwd), "bwd_s": statistics.median(t_bwd),
        "opt_s": statistics.median(t_opt),
        "losses": losses, "peak_rss_MiB": _rss_mib("VmHWM"),
        "peak_cuda_MiB": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
        "imgs_per_s": batch / med,
    })
    assert all(v == v and abs(v) != float("inf") for v in losses), losses
    print("RESULT_JSON: " + json.dumps(info), flush=True)


def _spawn(args: argparse.Namespace, name: str, batch: int) -> dict[str, Any]:
    """One configuration in a fresh process; an error dict when it fails or runs past --timeout."""
    cmd = [sys.executable, os.path.abspath(__file__), args.export_dir, "--child", name, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device, "--batch", str(batch)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "batch": batch, "error": f"timed out after {args.timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT_JSON: "):
            return json.loads(line[len("RESULT_JSON: "):])
    tail = (p.stdout[-2000:] + p.stderr[-4000:]).strip()
    last = tail.splitlines()[-1] if tail else ""
    sys.stderr.write(tail + "\n")
    return {"config": name, "batch": batch, "error": f"rc={p.returncode}: {last}"}


def run_parent(args: argparse.Namespace) -> int:
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s): {', '.join(unknown)} (--list shows them)")
    runs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for n in names:
        batch = args.batch or DEFAULT_BATCH
        t0 = time.time()
        res = _spawn(args, n, batch)
        res["wall_s"] = time.time() - t0
        if "error" in res:
            errors.append(res)
            print(f"{n:18s} FAILED ({res['wall_s']:.0f} s): {res['error']}", flush=True)
            continue
        res["repeat"] = 0
        runs.append(res)
        print(f"{n:18s} batch {batch:4d} {res['s_per_step']:8.4f} s/step {res['imgs_per_s']:8.1f} img/s  "
              f"(tok {res['tok_s']:.3f} fwd {res['fwd_s']:.3f} bwd {res['bwd_s']:.3f} opt {res['opt_s']:.3f})  loss[0] "
              f"{res['losses'][0]:.4f}  wall {res['wall_s']:.0f} s", flush=True)
    agg = [dict(config=r["config"], mode="default", s_per_step=r["s_per_step"], s_per_img=r["s_per_img"],
                peak_rss_MiB=r["peak_rss_MiB"], peak_cuda_MiB=r["peak_cuda_MiB"], batch=r["batch"], n_runs=1,
                min_s_per_step=r["s_per_step"], max_s_per_step=r["s_per_step"], all_step_medians=[r["s_per_step"]],
                fused=r["timm_use_fused_attn"], attn_modules=r["timm_attn_modules"], attn_fused=r["timm_attn_fused"])
           for r in runs]
    if args.json:
        out = {"runs": runs, "agg": agg, "errors": errors, "argv": sys.argv}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 1 if errors else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir")
    ap.add_argument("--configs", default="all")
    ap.add_argument("--device", default="cpu", help="cpu (fp32), or cuda (bf16 autocast, synchronised timing)")
    ap.add_argument("--batch", type=int, default=None, help=f"images per step (default {DEFAULT_BATCH})")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--json", default=None)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        for k, v in CONFIGS.items():
            print(k, v)
        return
    if args.child:
        run_child(args.export_dir, args.child, args.warmup, args.steps, args.threads, args.device,
                  args.batch or DEFAULT_BATCH)
        return
    sys.exit(run_parent(args))


if __name__ == "__main__":
    main()
