#!/usr/bin/env python
"""Ours vs the OFFICIAL code on the same images, masks and weights: the loss, named intermediate tensors, and every
gradient after one backward; and, where the two draw masks differently, the masks' statistics.

Cases (each in its own process: the official repos share module names):
  mae         facebookresearch/mae mae_vit_base_patch16 (224, norm_pix_loss) vs pretrain/mae; the official masking
              draws from torch's global generator, ours from its own, seeded alike: the same masks
  extrema     microsoft/ExtreMA ExtreMA(vit_base, 2 class-attention blocks, layer scale 0.1, proj 256 / 4096, 80% x 5
              disjoint masks, BYOL loss) vs pretrain/extrema, two views; masks drawn as MAE's; the official momentum
              argument is 1 in this step (its in-forward EMA update then leaves the copied teacher as it is)
  localmim-vit  huawei-noah LocalMIM MIM_vit_base_patch16 (HOG, 9 bins, 4 scales) vs pretrain/localmim, masks as MAE
  localmim-swin huawei-noah LocalMIM mim_swin_base_patch4_win7 (visible-only Swin-B, HOG 18 bins with the filters'
              bias, 4 stage taps) vs pretrain/localmim_swin_base; the official batch mask (torch.randperm) and HOG
              biases are handed to ours; its PatchMerging concatenates the 2 x 2 neighbours row-major, timm's
              column-major, so those weights are copied with their four blocks reordered. The official encoder
              keeps its visible tokens unit-major (each 32-px unit's tokens together) but labels the tokens of every
              merged stage with the raster coordinates of their storage slot; ours reproduces that by default
              (method.merge_coords=official). The case also checks merge_coords=own against the official loss with
              those labels corrected in memory
  lomar       junchen14/LoMaR mae_vit_base_patch16 (224, 4 windows of 7 x 7, 80% masked, iRPE) vs pretrain/lomar with
              method.official_per_gpu_batch = the batch here; ours is handed the official draws (window offsets from
              torch.randperm, per-window mask noise from torch.rand, replayed from the same global seed): its own
              window pairing (sequence r holds image r % N, window r % 4) and its iRPE run on them
  maskfeat    facebookresearch/SlowFast MaskMViT, configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml, vs pretrain/maskfeat
              (export: benchmarks/official/export_maskfeat.sh, CPU only)
  simmim-vit  microsoft/SimMIM build_simmim (ViT-B/16, 224, shared relative position bias, LayerScale 0.1) vs
              pretrain/simmim (export: benchmarks/official/export_extra.sh)
  simmim-swin microsoft/SimMIM build_simmim (Swin-B, 192, window 6) vs pretrain/simmim_swin_base (our Swin is timm's:
              the official stage i's PatchMerging is timm's stage i+1 downsample, the same channel order)
  greenmim    LayneH/GreenMIM green_mim_swin_base_patch4_dec512b1 (visible-only Swin-B, grouped windows, 75% of the
              32-px units, one mask per batch) vs pretrain/greenmim_swin_base; masks drawn as MAE's
  beit        microsoft/unilm BEiT beit_base_patch16_224_8k_vocab (shared relative position bias, LayerScale 0.1) vs
              pretrain/beit, on given visual-token ids (the tokenizers differ by design: the DALL-E dVAE is not
              obtainable here)

The official code is imported from the export folders, never copied. Our model is `repro`'s method at the paper
recipe with the official weights copied in by name; every parameter of ours is assigned or listed with the reason it
has no official counterpart (e.g. the key bias of a fused qkv projection, which the official attention does not have:
set to zero, and with no effect on any output, since a key bias shifts every logit of a query alike). CPU, fp32, both
models in eval mode (drop path off; nothing else differs between the modes). Differences are float rounding.
Gradients: the largest difference in each tensor relative to the largest entry of that tensor (or to 1e-3 of the
model's largest gradient, for a tensor whose gradients all lie below that, such as a key bias before a softmax).

Usage: python benchmarks/official/parity.py [CASE ...] [--exports .bench/export,.bench-cpu/export] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# case -> the export subfolder its official code lives in
CASES = {"mae": "mae", "lomar": "lomar", "extrema": "extrema", "localmim-vit": "localmim_vit",
         "localmim-swin": "localmim_swin",
         "maskfeat": "maskfeat", "simmim-vit": "simmim", "simmim-swin": "simmim", "greenmim": "greenmim",
         "beit": "beit"}


@dataclass
class Case:
    """One comparison: both models, how ours' parameters map onto the official ones, and the two forwards."""
    official: Any
    ours: Any
    # (official parameter name, ours parameter name, view of ours' tensor in the official layout or None)
    pairs: list[tuple[str, str, Callable[[Any], Any] | None]]
    ours_only: dict[str, str]  # ours parameter name -> why it has no official counterpart (zeroed)
    official_forward: Callable[[], tuple[Any, dict[str, Any]]]  # -> (loss, named tensors)
    ours_forward: Callable[[], tuple[Any, dict[str, Any]]]
    info: dict[str, Any] = field(default_factory=dict)
    masks: Callable[[int], tuple[Any, Any]] | None = None  # n -> (official masks, ours) as (n, side, side) arrays
    official_only: dict[str, str] = field(default_factory=dict)  # frozen official constants ours holds otherwise


def _export_root(exports: list[str], sub: str) -> str:
    for e in exports:
        if os.path.isdir(os.path.join(e, sub)):
            return os.path.join(e, sub)
    raise SystemExit(f"no official export '{sub}' in {', '.join(exports)}: run benchmarks/official/export_extra.sh "
                     "(or export_maskfeat.sh for maskfeat) MIRRORS DEST")


def _commit(root: str) -> str:
    """The exported mirror's HEAD (export_extra.sh / export_maskfeat.sh write COMMIT), else a note."""
    try:
        with open(os.path.join(root, "COMMIT")) as f:
            return f.read().strip()[:12]
    except OSError:
        return "(commit not recorded)"


def _bench_configs() -> dict[str, dict[str, Any]]:
    """bench_extra.py's official settings per configuration (the same models the timing benchmark builds)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_extra import CONFIGS

    return CONFIGS


def _resolve(recipe: str) -> dict[str, Any]:
    from repro.resolve import resolve

    return resolve(recipe, "paper")


def _qkv_pairs(prefix_off: str, prefix_ours: str, dim: int) -> list[tuple[str, str, Callable[[Any], Any] | None]]:
    """BEiT-style attention (bias-free qkv + q_bias + v_bias) onto a fused qkv Linear with one bias."""
    return [(f"{prefix_off}.qkv.weight", f"{prefix_ours}.qkv.weight", None),
            (f"{prefix_off}.q_bias", f"{prefix_ours}.qkv.bias", lambda t: t[:dim]),
            (f"{prefix_off}.v_bias", f"{prefix_ours}.qkv.bias", lambda t: t[2 * dim:])]


def _beit_style_blocks(depth: int, dim: int, off: str) -> list[tuple[str, str, Callable[[Any], Any] | None]]:
    """The blocks of a BEiT / SimMIM ViT (gamma_1 / gamma_2 LayerScale) onto timm's (ls1 / ls2)."""
    pairs: list[tuple[str, str, Callable[[Any], Any] | None]] = []
    for i in range(depth):
        o, u = f"{off}blocks.{i}", f"encoder.blocks.{i}"
        pairs += _qkv_pairs(f"{o}.attn", f"{u}.attn", dim)
        pairs += [(f"{o}.gamma_1", f"{u}.ls1.gamma", None), (f"{o}.gamma_2", f"{u}.ls2.gamma", None)]
        for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            pairs += [(f"{o}.{name}.{p}", f"{u}.{name}.{p}", None) for p in ("weight", "bias")]
    return pairs


def _k_bias_only(ours: Any) -> dict[str, str]:
    return {f"encoder.blocks.{i}.attn.qkv.bias[k]": "the official attention has no key bias (zero here; a key bias "
            "shifts every logit of a query alike, so it changes no output)" for i in range(len(ours.encoder.blocks))}


# -- the cases ---------------------------------------------------------------------------------------------------------

def case_mae(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    import models_mae as mod
    import torch

    from repro.methods.mae import MAE
    from repro.models.mim import encode_visible

    official = mod.mae_vit_base_patch16(img_size=224, norm_pix_loss=True)
    ours = MAE(_resolve("mae"))
    names = {"cls_token": "encoder.cls_token", "pos_embed": "encoder.pos_embed",
             "patch_embed.proj.weight": "encoder.patch_embed.proj.weight",
             "patch_embed.proj.bias": "encoder.patch_embed.proj.bias",
             "norm.weight": "encoder.norm.weight", "norm.bias": "encoder.norm.bias",
             "decoder_embed.weight": "decoder.embed.weight", "decoder_embed.bias": "decoder.embed.bias",
             "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.pos",
             "decoder_norm.weight": "decoder.norm.weight", "decoder_norm.bias": "decoder.norm.bias",
             "decoder_pred.weight": "decoder.pred.weight", "decoder_pred.bias": "decoder.pred.bias"}
    for k, _ in official.named_parameters():
        if k.startswith("blocks."):
            names[k] = "encoder." + k
        elif k.startswith("decoder_blocks."):
            names[k] = "decoder.blocks." + k[len("decoder_blocks."):]
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = 3

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)  # its random_masking: torch.rand(N, L) from the global generator
        loss, pred, mask = official(imgs, mask_ratio=0.75)
        return loss, {"mask": mask, "predictions": pred}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        out = ours((imgs,), torch.Generator().manual_seed(seed))  # the training step's forward
        with torch.no_grad():
            latent, mask, ids_restore, _ = encode_visible(ours.encoder, imgs, 0.75, torch.Generator().manual_seed(seed),
                                                          ours.speed_switch("embed_visible", imgs.device))
            pred = ours.decoder(latent, ids_restore)
        return out.loss, {"mask": mask, "predictions": pred}
    commit = _commit(root)
    info = {"official": f"facebookresearch/mae {commit} models_mae.mae_vit_base_patch16 (norm_pix_loss)",
            "ours": "pretrain/mae (its training forward; mask and predictions from the same encoder / decoder calls)",
            "mask_settings": "75% per-image random masking, the same noise on both sides"}
    return Case(official, ours, [(k, v, None) for k, v in names.items()], {}, official_forward, ours_forward, info)


def case_lomar(root: str, batch: int) -> Case:
    import torch

    import repro.methods.lomar as ours_mod
    from repro.resolve import resolve

    # ours first: the official vision_transformer_irpe.py registers its own vit_base_patch16_224 in timm's registry
    ours = ours_mod.LoMaR(resolve("lomar", "paper", {"method": {"official_per_gpu_batch": batch}}))
    sys.path[:0] = [root, os.path.join(os.path.dirname(root), "_deps")]
    import models_lomar as mod

    official = mod.mae_vit_base_patch16(norm_pix_loss=True)
    p = ours.params
    k, nw, ratio, grid = p["window_size"], p["num_windows"], p["mask_ratio"], ours.grid
    names: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
        "cls_token": ("encoder.cls_token", None), "mask_token": ("mask_token", None),
        "patch_embed.proj.weight": ("encoder.patch_embed.proj.weight", None),
        "patch_embed.proj.bias": ("encoder.patch_embed.proj.bias", None),
        "norm.weight": ("encoder.norm.weight", None), "norm.bias": ("encoder.norm.bias", None),
        "encoder_pred.weight": ("pred.weight", None), "encoder_pred.bias": ("pred.bias", None)}
    for name, _ in official.named_parameters():
        if name.endswith("attn.rpe_k.lookup_table_weight"):  # (1, head dim, buckets) vs ours (buckets, head dim)
            names[name] = (name.replace("rpe_k.lookup_table_weight", "rpe_k").replace("blocks.", "encoder.blocks.", 1),
                           lambda t: t.t().unsqueeze(0))
        elif name.startswith("blocks."):
            names[name] = ("encoder." + name, None)
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = 3
    torch.manual_seed(seed)  # the official forward's draws, in its order
    positions = grid - k + 1
    tops, lefts = torch.randperm(positions)[:nw], torch.randperm(positions)[:nw]
    noise = torch.rand(batch, nw, k * k)
    num_mask = int(k * k * ratio)

    def windows(n: int, *_: Any, **__: Any) -> Any:
        ar = torch.arange(k)
        rows = (tops[:, None, None] + ar[:, None]).expand(nw, k, k)
        cols = (lefts[:, None, None] + ar[None, :]).expand(nw, k, k)
        return torch.stack([rows, cols], dim=-1).reshape(1, nw, k * k, 2).expand(n, -1, -1, -1)

    def masking(m: int, *_: Any) -> tuple[Any, Any, Any]:
        # ours' row q = image i's j-th sequence = official sequence r = i + j * N, masked by noise[r // nw, r % nw]
        # (the num_mask lowest); ours keeps the lowest of its noise, so it gets the negated official noise
        q = torch.arange(m)
        r = q // nw + (q % nw) * batch
        ids_shuffle = (-noise[r // nw, r % nw]).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(m, k * k)
        mask[:, :k * k - num_mask] = 0
        return ids_shuffle[:, :k * k - num_mask], ids_restore, torch.gather(mask, 1, ids_restore)
    ours_mod.sample_windows = windows
    ours.window_masking = masking

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)
        loss, _, mask = official(imgs, window_size=k, num_window=nw, mask_ratio=ratio)
        return loss, {"masked patches per sequence": mask.sum(1).float().sort().values}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        out = ours((imgs,), torch.Generator().manual_seed(seed))
        _, _, mask = masking(batch * nw)
        return out.loss, {"masked patches per sequence": mask.sum(1).sort().values}
    info = {"official": "junchen14/LoMaR models_lomar.mae_vit_base_patch16(norm_pix_loss=True), window 7, 4 windows, "
            "mask 0.8", "ours": "pretrain/lomar (method.official_per_gpu_batch = this batch)",
            "mask_settings": f"{num_mask} of {k * k} patches per window; windows and noise replayed from the official "
                             "draws"}
    return Case(official, ours, [(o, u, v) for o, (u, v) in names.items()], {}, official_forward, ours_forward,
                info, official_only={"pos_embed": "a zero position table the official forward never adds"})


def case_extrema(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    from functools import partial

    import lib.builder as builder
    import torch
    import vits

    from repro.methods.extrema import ExtreMA

    ours = ExtreMA(_resolve("extrema"))
    p = ours.params
    # main.py with the README's pretraining flags (as ../shared/bench/bench_official.py builds it)
    base = partial(vits.vit_base, drop_path_rate=0.1, attn_drop_rate=0.0, init_values=0.1, class_attention_layers=2)
    ema = partial(vits.vit_base, init_values=0.1, class_attention_layers=2)
    official = builder.ExtreMA(base, ema, p["proj_dim"], p["proj_hidden"], 1.0, p["mask_ratio"], p["num_masks"],
                               p["disjoint"])
    names: dict[str, str] = {}
    for name, _ in official.named_parameters():
        branch, _, rest = name.partition(".")
        if branch == "predictor":
            names[name] = name
            continue
        t = "" if branch == "base_encoder" else "t_"
        first, _, tail = rest.partition(".")
        if first == "cls_token":
            names[name] = f"{t}head.cls_token"
        elif first in ("pos_embed", "patch_embed", "blocks"):
            names[name] = f"{t}encoder.{rest}"
        elif first == "blocks_token":
            names[name] = f"{t}head.blocks.{tail}"
        elif first == "norm":
            names[name] = f"{t}head.norm.{tail}"
        elif first == "head":
            names[name] = f"{t}projector.{tail}"
    views = [torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    seed = 3

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)  # generate_mask: torch.rand(B, 196) from the global generator
        return official(views, 1.0, "byol"), {}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        return ours((views,), torch.Generator().manual_seed(seed)).loss, {}
    info = {"official": f"microsoft/ExtreMA {_commit(root)} lib/builder.ExtreMA + vits.vit_base (README flags)",
            "ours": "pretrain/extrema", "mask_settings": f"{p['mask_ratio']:.0%} x {p['num_masks']} disjoint masks, "
            "the same noise on both sides", "notes": "official momentum argument 1.0 in this step"}
    return Case(official, ours, [(k, v, None) for k, v in names.items()], {}, official_forward, ours_forward, info)


def case_localmim_vit(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    import models_mim as mod
    import torch

    from repro.methods.localmim import LocalMIM

    cfg = _bench_configs()["localmim-vit-224"]
    official = getattr(mod, cfg["model"])(hog_nbins=cfg["hog_nbins"], hog_bias=cfg["hog_bias"])
    ours = LocalMIM(_resolve("localmim"))
    taps = list(official.ID)
    names = {"cls_token": "encoder.cls_token", "pos_embed": "encoder.pos_embed",
             "patch_embed.proj.weight": "encoder.patch_embed.proj.weight",
             "patch_embed.proj.bias": "encoder.patch_embed.proj.bias"}
    official_only = {}
    for k, _ in official.named_parameters():
        parts = k.split(".")
        if parts[0] == "blocks":
            names[k] = "encoder." + k
        elif parts[0] == "norm":  # one norm per tap; ours keys them by block, the last tap's is the encoder's own
            tap = taps[int(parts[1])]
            names[k] = (f"encoder.norm.{parts[2]}" if tap == len(official.blocks) - 1
                        else f"norms.{tap}.{parts[2]}")
        elif parts[0] == "decoder":
            i, rest = parts[1], ".".join(parts[2:])
            if rest == "pos_embed":
                names[k] = f"decoders.{i}.pos"
            elif rest.startswith("pred."):
                names[k] = f"heads.{i}.{rest[len('pred.'):]}"
            else:
                names[k] = f"decoders.{i}.{rest}"
        elif parts[0] == "hog_enc":
            official_only[k] = "the fixed Sobel filters of the HOG target (frozen; ours keeps them as buffers)"
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = 3

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)  # its random_masking: torch.rand(N, L) from the global generator
        return official(imgs, mask_ratio=cfg["mask_ratio"]), {}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        out = ours((imgs,), torch.Generator().manual_seed(seed))  # the training step's forward
        return out.loss, {}
    info = {"official": f"huawei-noah/Efficient-Computing {_commit(root)} LocalMIM/ViT models_mim."
            f"{cfg['model']}(hog_nbins={cfg['hog_nbins']}, hog_bias={cfg['hog_bias']})", "ours": "pretrain/localmim",
            "mask_settings": f"{cfg['mask_ratio']:.0%} per-image random masking, the same noise on both sides"}
    return Case(official, ours, [(k, v, None) for k, v in names.items()], {}, official_forward, ours_forward, info,
                official_only=official_only)


def case_localmim_swin(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    import models_mim as mod
    import torch

    import repro.methods.localmim as ours_mod

    cfg = _bench_configs()["localmim-swin-224"]
    official = getattr(mod, cfg["model"])(target="HOG", hog_nbins=cfg["hog_nbins"], hog_bias=cfg["hog_bias"],
                                          norm_pix_loss=False)
    ours = ours_mod.LocalMIM(_resolve("localmim_swin_base"))
    last = sum(len(stage.blocks) for stage in ours.encoder.layers) - 1
    stage_ends = []
    n = 0
    for stage in ours.encoder.layers:
        n += len(stage.blocks)
        stage_ends.append(n - 1)

    def merge_order(t: Any) -> Any:
        # ours' 4C blocks are (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1); the official's
        # (0, 0), (0, 1), (1, 0), (1, 1): a view of ours in the official order, (..., 2 rows, 2 cols, C)
        lead, c4 = t.shape[:-1], t.shape[-1]
        return t.view(*lead, 2, 2, c4 // 4).transpose(-3, -2)

    names: dict[str, tuple[str, Callable[[Any], Any] | None]] = {}
    official_only: dict[str, str] = {}
    for name, _ in official.named_parameters():
        parts = name.split(".")
        if name.startswith("encoder.layers.") and parts[3] == "downsample":
            names[name] = ("encoder." + _official_swin_name(name[len("encoder."):]), merge_order)
        elif name.startswith("encoder.norm."):
            tap = stage_ends[int(parts[2])]
            names[name] = ((f"encoder.norm.{parts[3]}" if tap == last else f"norms.{tap}.{parts[3]}"), None)
        elif name.startswith("encoder."):
            names[name] = (name, None)
        elif parts[0] == "decoder":
            i, rest = parts[1], ".".join(parts[2:])
            if rest == "pos_embed":
                names[name] = (f"decoders.{i}.pos", None)
            elif rest.startswith("pred."):  # a Linear there, a 1 x 1 Conv2d here
                names[name] = (f"heads.{i}.0.{parts[-1]}", (lambda t: t.flatten(1)) if parts[-1] == "weight" else None)
            else:
                names[name] = (f"decoders.{i}.{rest}", None)
        elif parts[0] == "hog_enc" and parts[-1] == "bias":  # the filters' fixed random bias: ours gets the same
            names[name] = (f"hog.layers.{parts[1]}.offset", lambda t: t.view(3, 2))
        elif parts[0] == "hog_enc":
            official_only[name] = "the fixed Sobel filters of the HOG target (frozen; ours keeps them as buffers)"
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = 3
    units = official.num_patches
    torch.manual_seed(seed)  # forward_encoder's draw, replayed
    official_mask = (torch.randperm(units) <= int(cfg["mask_ratio"] * units)).float()
    ours_mod.swin_batch_mask = lambda *_a, **_k: official_mask.clone()

    merge = mod.PatchMerging.forward

    def own_coordinates(self: Any, x: Any, mask_prev: Any) -> tuple[Any, Any, Any]:
        """The official merge, returning the merged tokens' own coordinates (they are unit-major: unit, row, col)."""
        out, _, mask_new = merge(self, x, mask_prev)
        h = self.input_resolution[0]
        side = (h // 7 if h % 7 == 0 else h // 6) // 2  # tokens per unit side after the merge
        units = (h // 2) // side
        ur, uc = torch.meshgrid(torch.arange(units), torch.arange(units), indexing="ij")
        rr, cc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([(ur.reshape(-1, 1, 1) * side + rr).reshape(-1),
                              (uc.reshape(-1, 1, 1) * side + cc).reshape(-1)], -1)
        return out, coords.to(x.device)[mask_new[0]].reshape(1, -1, 2), mask_new

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)
        loss, _, _ = official(imgs, mask_ratio=cfg["mask_ratio"])
        mod.PatchMerging.forward = own_coordinates
        try:
            with torch.no_grad():
                torch.manual_seed(seed)
                corrected, _, _ = official(imgs, mask_ratio=cfg["mask_ratio"])
        finally:
            mod.PatchMerging.forward = merge
        return loss, {"loss vs the official with its merged tokens' coordinates corrected": corrected.reshape(1)}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        loss = ours((imgs,), torch.Generator().manual_seed(seed)).loss
        ours.official_coords = False  # method.merge_coords=own
        try:
            with torch.no_grad():
                own = ours((imgs,), torch.Generator().manual_seed(seed)).loss
        finally:
            ours.official_coords = True
        return loss, {"loss vs the official with its merged tokens' coordinates corrected": own.reshape(1)}
    info = {"official": f"huawei-noah/Efficient-Computing {_commit(root)} LocalMIM/Swin models_mim.{cfg['model']}"
            f"(target=HOG, hog_nbins={cfg['hog_nbins']}, hog_bias={cfg['hog_bias']})",
            "ours": "pretrain/localmim_swin_base",
            "mask_settings": f"randperm({units}) <= int({units} x {cfg['mask_ratio']}): {int(official_mask.sum())} "
                             "masked units, one mask per batch, replayed into ours"}
    return Case(official, ours, [(o, u, v) for o, (u, v) in names.items()], {}, official_forward, ours_forward, info,
                official_only=official_only)


def case_maskfeat(root: str, batch: int) -> Case:
    sys.path[:0] = [root, os.path.join(root, "_deps")]
    import numpy as np
    import torch
    from slowfast.config.defaults import get_cfg
    from slowfast.datasets.transform import MaskingGenerator
    from slowfast.models import masked
    from slowfast.models.losses import get_loss_func

    from repro.methods.maskfeat import MaskFeat
    from repro.models.mim import masked_mse

    c = get_cfg()
    c.merge_from_file(os.path.join(root, "configs", "in1k_VIT_B_MaskFeat_PT.yaml"))
    c.NUM_GPUS = 1
    official = masked.MaskMViT(c)
    loss_fn = get_loss_func(c.MODEL.LOSS_FUNC)(reduction="mean")
    ours = MaskFeat(_resolve("maskfeat"))
    names = {"cls_token": "encoder.cls_token", "pos_embed": "encoder.pos_embed", "mask_token": "mask_token",
             "patch_embed.proj.weight": "encoder.patch_embed.proj.weight",
             "patch_embed.proj.bias": "encoder.patch_embed.proj.bias",
             "pred_head.transforms.0.0.weight": "encoder.norm.weight",
             "pred_head.transforms.0.0.bias": "encoder.norm.bias",
             "pred_head.projections.0.weight": "head.weight", "pred_head.projections.0.bias": "head.bias"}
    names.update({k: "encoder." + k for k, _ in official.named_parameters() if k.startswith("blocks.")})
    depth = c.MASK.PRETRAIN_DEPTH[-1]
    side = official.feat_size[depth][-1]
    num_mask = round(side * side * c.AUG.MASK_RATIO)

    def generator() -> Any:
        return MaskingGenerator(side, num_masking_patches=num_mask, max_num_patches=c.AUG.MAX_MASK_PATCHES_PER_BLOCK,
                                min_num_patches=num_mask // 5)
    random.seed(0)
    gen = generator()
    masks = torch.from_numpy(np.stack([gen() for _ in range(batch)]))
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    flat = masks.flatten(1).float()
    sel = flat.bool()

    def official_forward() -> tuple[Any, dict[str, Any]]:
        preds, labels = official([imgs, torch.empty(batch, 0), masks])
        return loss_fn(preds, labels)[0], {"HOG targets (masked)": labels[0][0], "predictions (masked)": preds[0]}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        pred = ours.predict(imgs, flat)
        with torch.no_grad():
            target = ours.target(imgs)
        return masked_mse(pred.float(), target, flat), {"HOG targets (masked)": target[sel],
                                                        "predictions (masked)": pred[sel]}

    def both_masks(n: int) -> tuple[Any, Any]:
        random.seed(1)
        g = generator()
        return (np.stack([g() for _ in range(n)]),
                ours.mask(n, torch.Generator().manual_seed(0)).view(-1, side, side).numpy())
    commit = _commit(root)
    info = {"official": f"facebookresearch/SlowFast {commit} MaskMViT, configs/masked_ssl/"
            "in1k_VIT_B_MaskFeat_PT.yaml", "ours": "pretrain/maskfeat",
            "mask_settings": f"{num_mask} of {side * side} patches, blocks >= {num_mask // 5}, aspect [0.3, 1/0.3]",
            "notes": "the official HOG sums each 8 x 8 cell, ours averages it (equal after the L2 normalisation)"}
    return Case(official, ours, [(k, v, None) for k, v in names.items()], {}, official_forward, ours_forward, info,
                both_masks)


def _official_swin_name(name: str) -> str:
    """A parameter name of the official Swin (microsoft/Swin-Transformer layout) as timm's: PatchMerging moves from
    the end of stage i to the start of stage i + 1."""
    import re

    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", name)
    return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else name


def _case_simmim(root: str, batch: int, config: str, recipe: str) -> Case:
    sys.path.insert(0, root)
    import importlib.util

    import numpy as np
    import torch
    from models import simmim as mod

    from repro.methods.simmim import SimMIM, masked_l1, upsample_mask

    cfg = _bench_configs()[config]
    from bench_extra import _simmim_config

    official = mod.build_simmim(_simmim_config(cfg))
    ours = SimMIM(_resolve(recipe))
    img, swin = cfg["img"], cfg["type"] == "swin"
    pairs: list[tuple[str, str, Callable[[Any], Any] | None]] = [
        ("encoder.mask_token", "mask_token", None), ("decoder.0.weight", "decoder.0.weight", None),
        ("decoder.0.bias", "decoder.0.bias", None)]
    ours_only: dict[str, str] = {}
    if swin:
        pairs += [(k, "encoder." + _official_swin_name(k[len("encoder."):]), None)
                  for k, _ in official.named_parameters() if k.startswith("encoder.") and k != "encoder.mask_token"]
        patch = 4
    else:
        enc = official.encoder
        pairs += [("encoder.cls_token", "encoder.cls_token", None),
                  ("encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.weight", None),
                  ("encoder.patch_embed.proj.bias", "encoder.patch_embed.proj.bias", None),
                  ("encoder.rel_pos_bias.relative_position_bias_table", "encoder.blocks.0.attn.rel_table", None),
                  ("encoder.norm.weight", "encoder.norm.weight", None),
                  ("encoder.norm.bias", "encoder.norm.bias", None)]
        pairs += _beit_style_blocks(len(enc.blocks), enc.embed_dim, "encoder.")
        ours_only = _k_bias_only(ours)
        patch = 16
    spec = importlib.util.spec_from_file_location("data_simmim", os.path.join(root, "data", "data_simmim.py"))
    data_simmim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_simmim)
    np.random.seed(0)
    gen = data_simmim.MaskGenerator(img, cfg["mask_patch"], patch, cfg["mask_ratio"])
    masks = torch.from_numpy(np.stack([gen() for _ in range(batch)]))
    imgs = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))

    def official_forward() -> tuple[Any, dict[str, Any]]:
        z = official.encoder(imgs, masks)
        rec = official.decoder(z)
        return official(imgs, masks), {"encoder output": z, "reconstruction": rec}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        z = ours.encode(imgs, masks.float())
        rec = ours.decoder(z)
        return masked_l1(rec, imgs, upsample_mask(masks.float(), ours.patch)), {"encoder output": z,
                                                                               "reconstruction": rec}
    commit = _commit(root)
    arch = f"Swin-B, {img} px, window {cfg['window']}" if swin else f"ViT-B/16, {img} px"
    info = {"official": f"microsoft/SimMIM {commit} build_simmim ({arch}, the 800-ep yaml's settings)",
            "ours": f"pretrain/{recipe}",
            "mask_settings": f"official MaskGenerator ({cfg['mask_patch']}-px units at {cfg['mask_ratio']}), fed to "
                             "both",
            "notes": "the official model's forward runs twice (once for its loss, once for the named tensors); "
                     "both in eval mode, so the two agree"}
    return Case(official, ours, pairs, ours_only, official_forward, ours_forward, info)


def case_simmim_vit(root: str, batch: int) -> Case:
    return _case_simmim(root, batch, "simmim-vit-224", "simmim")


def case_simmim_swin(root: str, batch: int) -> Case:
    return _case_simmim(root, batch, "simmim-swin-192", "simmim_swin_base")


def case_greenmim(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    import torch
    from modeling import model_factory as mod

    from repro.methods.greenmim import GreenMIM

    cfg = _bench_configs()["greenmim-swin-224"]
    official = mod.get_pretrain_model(cfg["model"], norm_pix_loss=cfg["norm_pix_loss"])
    ours = GreenMIM(_resolve("greenmim_swin_base"))
    names = {"mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.pos"}
    for name, _ in official.named_parameters():
        if name.startswith("encoder."):
            names[name] = "encoder." + _official_swin_name(name[len("encoder."):])
        elif name.startswith("decoder_blocks."):
            names[name] = "decoder.blocks." + name[len("decoder_blocks."):]
        elif name.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            head, _, tail = name.partition(".")
            names[name] = f"decoder.{head[len('decoder_'):]}.{tail}"
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = 3

    def official_forward() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(seed)  # random_masking: torch.rand(1, units) from the global generator
        loss, _, mask = official(imgs, mask_ratio=cfg["mask_ratio"])
        return loss, {"mask": mask[0]}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        from repro.methods.greenmim import batch_mask

        out = ours((imgs,), torch.Generator().manual_seed(seed))
        _, mask = batch_mask(ours.grid * ours.grid, cfg["mask_ratio"], torch.Generator().manual_seed(seed))
        return out.loss, {"mask": mask}
    info = {"official": f"LayneH/GreenMIM {_commit(root)} {cfg['model']}(norm_pix_loss=True)",
            "ours": "pretrain/greenmim_swin_base",
            "mask_settings": f"{cfg['mask_ratio']:.0%} of the 32-px units, one mask per batch, the same noise"}
    return Case(official, ours, [(k, v, None) for k, v in names.items()], {}, official_forward, ours_forward, info)


def case_beit(root: str, batch: int) -> Case:
    sys.path.insert(0, root)
    import modeling_pretrain as mod
    import numpy as np
    import torch
    import torch.nn.functional as F
    from masking_generator import MaskingGenerator

    from repro.methods.beit import BEiT
    from repro.models.relpos import grid_coords

    cfg = _bench_configs()["beit-224"]
    official = mod.beit_base_patch16_224_8k_vocab(
        pretrained=False, drop_path_rate=cfg["drop_path"], drop_block_rate=None, use_shared_rel_pos_bias=True,
        use_abs_pos_emb=False, init_values=cfg["init_values"])
    ours = BEiT(_resolve("beit"))
    dim, depth = official.embed_dim, len(official.blocks)
    pairs = [("cls_token", "encoder.cls_token", None), ("mask_token", "mask_token", None),
             ("patch_embed.proj.weight", "encoder.patch_embed.proj.weight", None),
             ("patch_embed.proj.bias", "encoder.patch_embed.proj.bias", None),
             ("rel_pos_bias.relative_position_bias_table", "encoder.blocks.0.attn.rel_table", None),
             ("norm.weight", "encoder.norm.weight", None), ("norm.bias", "encoder.norm.bias", None),
             ("lm_head.weight", "lm_head.weight", None), ("lm_head.bias", "lm_head.bias", None)]
    pairs += _beit_style_blocks(depth, dim, "")
    grid = official.patch_embed.patch_shape

    def generator() -> Any:
        return MaskingGenerator(grid, num_masking_patches=cfg["num_mask"], max_num_patches=None,
                                min_num_patches=cfg["min_block"])
    random.seed(0)
    gen = generator()
    masks = torch.from_numpy(np.stack([gen() for _ in range(batch)])).flatten(1).bool()
    imgs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    vocab = official.lm_head.out_features
    ids = torch.randint(0, vocab, (batch, grid[0] * grid[1]), generator=torch.Generator().manual_seed(2))
    labels = ids[masks]

    def official_forward() -> tuple[Any, dict[str, Any]]:
        logits = official(imgs, bool_masked_pos=masks, return_all_tokens=False)
        return F.cross_entropy(logits, labels), {"logits (masked)": logits}

    def ours_forward() -> tuple[Any, dict[str, Any]]:
        x = ours.encoder.patch_embed(imgs)
        out = ours.encode(x, masks.float(), grid_coords(ours.grid, ours.grid, imgs.device)[None])
        logits = ours.lm_head(out[masks])
        static, _ = ours.masked_loss_static(out, ids, masks.float())
        loss = F.cross_entropy(logits, labels)
        return loss, {"logits (masked)": logits, "loss without a host sync (train.sync_free)": static.reshape(1),
                      "_loss": loss.detach().reshape(1)}

    def both_masks(n: int) -> tuple[Any, Any]:
        random.seed(1)
        g = generator()
        return (np.stack([g() for _ in range(n)]),
                ours.mask(n, torch.Generator().manual_seed(0)).view(-1, ours.mask_side, ours.mask_side).numpy())
    commit = _commit(root)
    info = {"official": f"microsoft/unilm {commit} beit/modeling_pretrain.py beit_base_patch16_224_8k_vocab",
            "ours": "pretrain/beit (its encoder and LM head; the tokenizer is not compared)",
            "mask_settings": f"{cfg['num_mask']} of {grid[0] * grid[1]} patches, blocks >= {cfg['min_block']}",
            "notes": "the same random visual-token ids as targets on both sides"}
    return Case(official, ours, pairs, _k_bias_only(ours), official_forward, ours_forward, info, both_masks)


BUILDERS: dict[str, Callable[[str, int], Case]] = {
    "mae": case_mae, "lomar": case_lomar, "extrema": case_extrema, "localmim-vit": case_localmim_vit,
    "localmim-swin": case_localmim_swin,
    "maskfeat": case_maskfeat, "simmim-vit": case_simmim_vit, "simmim-swin": case_simmim_swin,
    "greenmim": case_greenmim, "beit": case_beit}


# -- the comparison ----------------------------------------------------------------------------------------------------

def _copy(case: Case) -> int:
    """Copy every official tensor into ours; refuse if a parameter of ours is neither assigned nor listed."""
    import torch

    src = dict(case.official.named_parameters())
    ours = dict(case.ours.named_parameters())  # shared tensors once, under their first name
    buffers = dict(case.ours.named_buffers())  # a fixed table ours keeps as a buffer (MAE's decoder positions)
    covered: set[str] = set()
    frozen = [f"{off} / {name}" for off, name, _ in case.pairs
              if name in ours and src[off].requires_grad != ours[name].requires_grad]
    if frozen:
        raise SystemExit(f"trained on one side only: {frozen}")
    with torch.no_grad():
        for off, name, view in case.pairs:
            dst = ours[name] if name in ours else buffers[name]
            target = view(dst) if view else dst
            value = src[off]
            # a view may regroup the tensor (same count: reshaped) or hold several copies of it (broadcast)
            target.copy_(value.reshape(target.shape) if value.numel() == target.numel() else value)
            covered.add(name)
        for name in case.ours_only:
            base, _, part = name.partition("[")
            if part == "k]":  # the key third of a fused qkv bias
                t = ours[base]
                d = t.shape[0] // 3
                t[d:2 * d].zero_()
            else:
                ours[base].zero_()
    left = sorted(set(ours) - covered - {n.partition("[")[0] for n in case.ours_only})
    thawed = [k for k in case.official_only if src[k].requires_grad]
    if thawed:
        raise SystemExit(f"official tensors listed as fixed constants are trained: {thawed}")
    unused = sorted(set(src) - {off for off, _, _ in case.pairs} - set(case.official_only))
    if left or unused:
        raise SystemExit(f"unmapped parameters: ours {left}, official {unused}")
    return len(case.pairs)


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


def run_case(name: str, exports: list[str], batch: int, n_masks: int) -> dict[str, Any]:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    case = BUILDERS[name](_export_root(exports, CASES[name]), batch)
    copied = _copy(case)
    case.official.eval()
    case.ours.eval()
    loss_off, t_off = case.official_forward()
    loss_off.backward()
    loss_ours, t_ours = case.ours_forward()
    loss_ours.backward()
    tensors = {}
    for key, a in t_off.items():
        tensors[key] = float((a.detach() - t_ours[key].detach()).abs().max())
    for key, b in t_ours.items():  # ours-only checks: a second way of computing ours' loss
        if key not in t_off and not key.startswith("_"):
            tensors[key] = float((b.detach() - t_ours["_loss"]).abs().max())
    grads_off = dict(case.official.named_parameters())
    grads_ours = dict(case.ours.named_parameters())
    worst, worst_name = 0.0, ""
    trained = [(off, u, v) for off, u, v in case.pairs if grads_off[off].requires_grad]  # fixed tables: checked above
    # a tensor whose gradient is zero up to rounding (a key bias before a softmax) is measured against 1e-3 of the
    # largest gradient of the model, not against its own noise
    floor = 1e-3 * max(float(grads_off[off].grad.abs().max()) for off, _, _ in trained)
    for off, ours_name, view in trained:
        a, g = grads_off[off].grad, grads_ours[ours_name].grad
        b = view(g) if view else g
        a = a.reshape(b.shape)
        rel = float((a - b).abs().max()) / max(float(a.abs().max()), floor, 1e-30)
        if rel > worst:
            worst, worst_name = rel, off
    # negative control: the same comparison must see a change of one number of ours (the first entry of the last
    # encoder block's MLP output bias, + 1)
    with torch.no_grad():
        probe = next(n for _, n, _ in reversed(case.pairs) if ".mlp.fc2.bias" in n)
        dict(case.ours.named_parameters())[probe][0] += 1.0
        control = float(case.ours_forward()[0])
    control_rel = abs(float(loss_off) - control) / abs(float(loss_off))
    if control_rel < 1e-6:
        raise SystemExit(f"{name}: moving {probe}[0] by 1 did not change our loss: the comparison sees nothing")
    out: dict[str, Any] = {
        "case": name, **case.info, "batch": batch, "device": "cpu fp32", "torch": torch.__version__,
        "tensors_copied": copied, "ours_only": sorted(set(case.ours_only.values())),
        "official_only": sorted(set(case.official_only.values())),
        "loss_official": float(loss_off), "loss_ours": float(loss_ours),
        "loss_rel_diff": float(abs(loss_off - loss_ours) / abs(loss_off)),
        "max_abs_diff": tensors, "grad_max_rel_diff": worst, "grad_worst_tensor": worst_name,
        "control": {"moved": f"{probe}[0] + 1", "loss_rel_diff": control_rel},
    }
    if case.masks is not None and n_masks:
        off_m, ours_m = case.masks(n_masks)
        out["mask_stats"] = {"n": n_masks, "official": _mask_stats(off_m), "ours": _mask_stats(ours_m)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"default: every case ({', '.join(CASES)})")
    ap.add_argument("--exports", default=".bench/export,.bench-cpu/export",
                    help="comma-separated export folders, searched in order")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--masks", type=int, default=5000, help="masks drawn by each side for the statistics")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    exports = args.exports.split(",")
    if args.child:
        print("RESULT_JSON: " + json.dumps(run_case(args.child, exports, args.batch, args.masks)), flush=True)
        return
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    results, failed = [], []
    for n in names:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", n, "--exports", args.exports,
                            "--batch", str(args.batch), "--masks", str(args.masks)], capture_output=True, text=True)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT_JSON: ")]
        if p.returncode or not lines:
            failed.append(n)
            sys.stderr.write(p.stderr[-3000:])
            print(f"{n:11s} FAILED (rc {p.returncode})", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT_JSON: "):])
        results.append(r)
        diffs = "".join(f"{k} {v:.1e}; " for k, v in r["max_abs_diff"].items())
        print(f"{n:11s} loss {r['loss_official']:.7f} (official) vs {r['loss_ours']:.7f} (ours), relative "
              f"{r['loss_rel_diff']:.1e}; gradients within {r['grad_max_rel_diff']:.1e}; {diffs}control "
              f"(one weight of ours moved) {r['control']['loss_rel_diff']:.1e}", flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"cases": results, "failed": failed, "argv": sys.argv}, f, indent=1)
        os.replace(tmp, args.json)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
