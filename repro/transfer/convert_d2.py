"""Our exported ViT encoder (timm keys) -> detectron2's ViTDet backbone (``detectron2.modeling.ViT``).

Key map (the two models share timm's block layout; only what detectron2 lacks is changed):

- ``patch_embed.proj.*``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``: same names;
- ``pos_embed``: kept with its pretraining grid (and cls row if any); detectron2 resamples it bicubically to the
  detection grid at every forward (``get_abs_pos``), as ViTDet does with MAE weights. No table (LoMaR, SimMIM):
  ``use_abs_pos=False``;
- LayerScale (``blocks.<i>.ls1/ls2.gamma``, BEiT) has no detectron2 module: it is folded exactly into the preceding
  linear layer (``attn.proj``, ``mlp.fc2``: rows scaled by gamma);
- LoMaR's contextual iRPE (``blocks.<i>.attn.rpe_k``) is carried into an ``IRPEAttentionD2`` (detectron2's
  attention plus the same key-side term on each window's, or the global block's, own grid: ``irpe_attention_cls``);
- dropped: ``cls_token`` (ViTDet runs without one), the final ``norm`` / ``fc_norm`` / ``head`` (ViTDet has no final
  norm; the pyramid has its own LayerNorms);
- new in the detector (not in any checkpoint): ViTDet's decomposed relative positions ``attn.rel_pos_h/w`` (zero
  init, as ViTDet starts them for MAE), the pyramid and the heads.

A BEiT-style shared relative bias (``rel_pos: bias``) has no detectron2 counterpart and is refused with one line.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from repro.config import ConfigError

DROPPED = ("cls_token", "norm.", "fc_norm.", "head.")
NEW_KEYS = (".attn.rel_pos_h", ".attn.rel_pos_w")  # ViTDet's own decomposed relative positions (zero init)
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def vit_geometry(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Sizes read from an encoder state dict: width, depth, heads are checked against ``model`` by the caller."""
    if "patch_embed.proj.weight" not in state:
        raise ConfigError("the checkpoint has no patch_embed.proj.weight: not a ViT encoder (a Swin goes to mmdet)")
    w = state["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    pos = state.get("pos_embed")
    geo: dict[str, Any] = {"embed_dim": int(w.shape[0]), "patch_size": int(w.shape[-1]), "depth": depth,
                           "use_abs_pos": pos is not None, "pretrain_img_size": 224, "pretrain_use_cls_token": True,
                           "mlp_hidden": int(state["blocks.0.mlp.fc1.weight"].shape[0])}
    if any(k.endswith("attn.rel_table") for k in state):
        raise ConfigError("this encoder uses a shared relative position bias (rel_pos=bias, BEiT) that detectron2's "
                          "ViT cannot hold; evaluate it with framework=mmdet")
    if pos is not None:
        n = int(pos.shape[1])
        side = math.isqrt(n)
        cls = side * side != n
        if cls:
            side = math.isqrt(n - 1)
            if side * side != n - 1:
                raise ConfigError(f"pos_embed of {n} rows is not a square grid (+ cls); cannot resample it")
        geo["pretrain_img_size"] = side * geo["patch_size"]
        geo["pretrain_use_cls_token"] = cls
    return geo


def convert_vit_to_d2(state: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor],
                                                                                    list[str]]:
    """(detectron2 ViT state dict with ``prefix`` before every key, keys of ``state`` deliberately dropped)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    gammas: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(DROPPED):
            dropped.append(k)
        elif k.endswith((".ls1.gamma", ".ls2.gamma")):
            gammas[k] = v
        else:
            out[k] = v.detach().clone()
    for k, g in gammas.items():  # y = gamma * (W x + b) == (gamma[:, None] * W) x + gamma * b
        lin = k[: -len(".ls1.gamma")] + (".attn.proj" if ".ls1." in k else ".mlp.fc2")
        out[f"{lin}.weight"] = out[f"{lin}.weight"] * g[:, None]
        out[f"{lin}.bias"] = out[f"{lin}.bias"] * g
    return {prefix + k: v for k, v in out.items()}, sorted(dropped)


def window_indexes(depth: int, global_blocks: Sequence[int]) -> list[int]:
    """Blocks with window attention: all but ``global_blocks`` (ViTDet-B: global at 2, 5, 8, 11)."""
    bad = [i for i in global_blocks if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"detect.global_blocks {bad} out of range for a {depth}-block ViT")
    return [i for i in range(depth) if i not in set(global_blocks)]


def d2_vit_args(state: Mapping[str, torch.Tensor], *, num_heads: int, img_size: int, window_size: int,
                global_blocks: Sequence[int], use_rel_pos: bool = True, drop_path: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of ``detectron2.modeling.ViT`` for the encoder ``state`` (norm layer left to the caller:
    ViTDet's LayerNorm(eps=1e-6), as timm's ViT)."""
    geo = vit_geometry(state)
    return {"img_size": img_size, "patch_size": geo["patch_size"], "embed_dim": geo["embed_dim"],
            "depth": geo["depth"], "num_heads": num_heads, "mlp_ratio": geo["mlp_hidden"] / geo["embed_dim"],
            "qkv_bias": "blocks.0.attn.qkv.bias" in state, "drop_path_rate": drop_path,
            "use_abs_pos": geo["use_abs_pos"], "use_rel_pos": use_rel_pos, "window_size": window_size,
            "window_block_indexes": window_indexes(geo["depth"], global_blocks),
            "pretrain_img_size": geo["pretrain_img_size"], "pretrain_use_cls_token": geo["pretrain_use_cls_token"],
            "out_feature": "last_feat"}


def use_irpe(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the encoder carries LoMaR's contextual iRPE tables."""
    return any(k.endswith("attn.rpe_k") for k in state)


def add_irpe(vit: nn.Module) -> None:
    """Give every attention layer of a detectron2 ViT the iRPE term (in place; the new tables start at zero)."""
    for blk in vit.blocks:
        blk.attn = _with_irpe(blk.attn)


def build_d2_vit(state: Mapping[str, torch.Tensor], **kw: Any) -> nn.Module:
    """A bare detectron2 ViT shaped for ``state`` (``d2_vit_args``' keywords); weights not loaded."""
    from functools import partial

    from detectron2.modeling import ViT

    vit = ViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **d2_vit_args(state, **kw))
    if use_irpe(state):
        add_irpe(vit)
    return vit


@functools.lru_cache(maxsize=1)
def irpe_attention_cls() -> type[nn.Module]:
    """``IRPEAttentionD2``: detectron2's ViT attention plus LoMaR's contextual iRPE on keys (``bias_ij = q_i .
    rpe_k[bucket(i - j)]``, q unscaled, one table shared by the heads; ``repro.models.irpe.IRPEAttention``).
    Buckets come from the token offsets inside the attended grid (a window, or the whole map in a global block);
    the table's last row (the cls token's bucket in pretraining) is carried but unused: ViTDet has no cls token.
    Built on first use so that this module imports without detectron2."""
    from detectron2.modeling.backbone.utils import add_decomposed_rel_pos
    from detectron2.modeling.backbone.vit import Attention

    from repro.models.irpe import irpe_buckets_per_axis, irpe_product_bucket
    from repro.models.relpos import grid_coords

    class IRPEAttentionD2(Attention):  # type: ignore[misc]
        def __init__(self, dim: int, num_heads: int, **kw: Any) -> None:
            super().__init__(dim, num_heads=num_heads, **kw)
            self.rpe_k = nn.Parameter(torch.zeros(irpe_buckets_per_axis() ** 2 + 1, dim // num_heads))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            coords = grid_coords(h, w, x.device)
            ids = irpe_product_bucket(coords[:, None, :] - coords[None, :, :])  # (N, N)
            per_bucket = q @ self.rpe_k[:-1].t().to(q.dtype)  # (B*heads, N, buckets)
            attn = attn + per_bucket.gather(-1, ids[None].expand(attn.shape[0], -1, -1))
            out = (attn.softmax(dim=-1) @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4)
            return self.proj(out.reshape(b, h, w, -1))

    return IRPEAttentionD2


def _with_irpe(attn: nn.Module) -> nn.Module:
    """The iRPE twin of a detectron2 ViT attention layer, with its weights."""
    dim = attn.qkv.in_features
    size = None if not attn.use_rel_pos else ((attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2)
    new = irpe_attention_cls()(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                               use_rel_pos=attn.use_rel_pos, input_size=size)
    new.load_state_dict(attn.state_dict(), strict=False)
    return new


def load_into_d2(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "backbone.net.",
                 ) -> dict[str, list[str]]:
    """Load the converted encoder into ``model`` (a detector whose ViT sits under ``prefix``). Refuses a missing
    or unexpected backbone key other than ViTDet's own new relative-position tables; returns the key lists."""
    conv, dropped = convert_vit_to_d2(state, prefix)
    res = model.load_state_dict(conv, strict=False)
    missing = [k for k in res.missing_keys if k.startswith(prefix) and not k.endswith(NEW_KEYS)]
    if missing or res.unexpected_keys:
        raise ConfigError(f"encoder does not fit the detectron2 ViT: missing {missing[:3]}, unexpected "
                          f"{list(res.unexpected_keys)[:3]}; check model.arch / patch_size")
    return {"loaded": sorted(conv), "dropped": dropped,
            "new": sorted(k for k in res.missing_keys if k.startswith(prefix))}
