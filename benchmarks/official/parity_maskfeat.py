#!/usr/bin/env python
"""Ours vs the OFFICIAL MaskFeat (facebookresearch/SlowFast MaskMViT, ImageNet ViT-B/16 pretraining yaml) on the
same images, masks and weights: HOG targets, predictions, loss, and gradients after one backward; and the masks'
statistics (our block-wise masking with SlowFast's ImageNet settings vs its MaskingGenerator).

The official code comes from EXPORT_DIR/maskfeat (benchmarks/official/export_maskfeat.sh); it is imported, never
copied. Our model is `repro`'s MaskFeat at the paper recipe, with the official model's weights copied in by name
(the two are the same ViT-B: MaskMViT without pooling is a plain ViT block stack; its head's LayerNorm is our final
norm). CPU, fp32. Differences are float rounding: the official HOG sums each 8 x 8 cell, ours averages it (equal after
the L2 normalisation up to rounding).

Usage: python benchmarks/official/parity_maskfeat.py [EXPORT_DIR] [--batch 4] [--masks 2000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any


def _official(export_dir: str) -> tuple[Any, Any, Any, Any]:
    root = os.path.join(export_dir, "maskfeat")
    if not os.path.isdir(os.path.join(root, "slowfast")):
        raise SystemExit(f"no official MaskFeat in {root}: "
                         f"run benchmarks/official/export_maskfeat.sh MIRRORS {export_dir}")
    sys.path[:0] = [root, os.path.join(root, "_deps")]
    import warnings
    warnings.filterwarnings("ignore")
    from slowfast.config.defaults import get_cfg
    from slowfast.datasets.transform import MaskingGenerator
    from slowfast.models import masked
    from slowfast.models.losses import get_loss_func

    c = get_cfg()
    c.merge_from_file(os.path.join(root, "configs", "in1k_VIT_B_MaskFeat_PT.yaml"))
    c.NUM_GPUS = 1
    return c, masked.MaskMViT(c), MaskingGenerator, get_loss_func(c.MODEL.LOSS_FUNC)(reduction="mean")


def _copy_weights(official: Any, ours: Any) -> list[str]:
    """Official state dict -> ours, by name; every parameter of ours is assigned exactly once (returns the mapping)."""
    import torch

    src = official.state_dict()
    names = {"cls_token": "encoder.cls_token", "pos_embed": "encoder.pos_embed", "mask_token": "mask_token",
             "patch_embed.proj.weight": "encoder.patch_embed.proj.weight",
             "patch_embed.proj.bias": "encoder.patch_embed.proj.bias",
             "pred_head.transforms.0.0.weight": "encoder.norm.weight",
             "pred_head.transforms.0.0.bias": "encoder.norm.bias",
             "pred_head.projections.0.weight": "head.weight", "pred_head.projections.0.bias": "head.bias"}
    for k in src:
        if k.startswith("blocks."):
            names[k] = "encoder." + k
    dst = dict(ours.named_parameters())
    done = []
    with torch.no_grad():
        for k, v in names.items():
            dst[v].copy_(src[k])
            done.append(f"{k} -> {v}")
        missing = sorted(set(dst) - set(names.values()))
    if missing:
        raise SystemExit(f"parameters of ours with no official counterpart: {missing}")
    return done


def _mask_stats(masks: Any) -> dict[str, float]:
    """Mean / min / max masked count per image, the mean number of 4-connected masked regions and its standard
    error, and the masked share of the centre patch."""
    import numpy as np
    from scipy import ndimage

    m = np.asarray(masks).astype(bool)
    counts = m.reshape(len(m), -1).sum(1)
    regions = [ndimage.label(x)[1] for x in m]
    side = m.shape[1]
    return {"mean_masked": float(counts.mean()), "min_masked": int(counts.min()), "max_masked": int(counts.max()),
            "mean_regions": float(np.mean(regions)), "regions_se": float(np.std(regions) / np.sqrt(len(m))),
            "centre_masked": float(m[:, side // 2, side // 2].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", nargs="?", default=".bench-cpu/export")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--masks", type=int, default=5000, help="masks drawn by each side for the statistics")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    cfg, official, generator_cls, loss_fn = _official(args.export_dir)
    from repro.methods.maskfeat import MaskFeat
    from repro.models.mim import masked_mse
    from repro.resolve import resolve

    ours = MaskFeat(resolve("maskfeat", "paper"))
    mapping = _copy_weights(official, ours)
    official.train()
    ours.train()

    depth = cfg.MASK.PRETRAIN_DEPTH[-1]
    side = official.feat_size[depth][-1]
    num_mask = round(side * side * cfg.AUG.MASK_RATIO)
    random.seed(0)
    gen = generator_cls(side, num_masking_patches=num_mask, max_num_patches=cfg.AUG.MAX_MASK_PATCHES_PER_BLOCK,
                        min_num_patches=num_mask // 5)
    masks = torch.from_numpy(np.stack([gen() for _ in range(args.batch)]))
    imgs = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    preds, labels = official([imgs, torch.empty(args.batch, 0), masks])
    loss_off = loss_fn(preds, labels)[0]
    loss_off.backward()
    flat = masks.flatten(1).float()
    pred = ours.predict(imgs, flat)
    with torch.no_grad():
        target = ours.target(imgs)
    loss_ours = masked_mse(pred.float(), target, flat)
    loss_ours.backward()

    sel = flat.bool()
    off_grads = dict(official.named_parameters())
    ours_grads = dict(ours.named_parameters())
    grad_rel = 0.0
    for line in mapping:
        k, v = line.split(" -> ")
        a, b = off_grads[k].grad, ours_grads[v].grad
        grad_rel = max(grad_rel, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))

    ours_masks = ours.mask(args.masks, torch.Generator().manual_seed(0)).view(-1, side, side).numpy()
    random.seed(1)
    off_masks = [gen() for _ in range(args.masks)]
    with open(os.path.join(args.export_dir, "maskfeat", "COMMIT")) as f:
        commit = f.read().strip()
    out = {
        "official_commit": commit,
        "config": "configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml", "batch": args.batch, "device": "cpu fp32",
        "torch": torch.__version__, "params_copied": len(mapping),
        "loss_official": float(loss_off), "loss_ours": float(loss_ours),
        "loss_rel_diff": float(abs(loss_off - loss_ours) / abs(loss_off)),
        "target_max_abs_diff": float((labels[0][0] - target[sel]).abs().max()),
        "pred_max_abs_diff": float((preds[0] - pred[sel]).abs().max()),
        "grad_max_rel_diff": grad_rel,
        "masks": {"settings": f"{num_mask} of {side * side} patches, blocks >= {num_mask // 5}, aspect [0.3, 1/0.3]",
                  "n": args.masks, "official": _mask_stats(off_masks), "ours": _mask_stats(ours_masks)},
    }
    print(json.dumps(out, indent=1))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
