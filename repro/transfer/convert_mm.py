"""Our exported encoders -> mmdetection backbones.

Swin (timm keys, ``repro.models.swin``) -> mmdet's ``SwinTransformer``: timm downsamples at the START of stages
1..3 (``layers.<i>.downsample``), the original Swin code at the END of stages 0..2, so the merges move back one
stage; then mmdet's own ``swin_converter`` (original -> mmdet names, and the 2x2-merge channel order of its unfold)
does the rest. The final ``norm`` becomes the last output's norm (``norm3``: the features of the last stage are then
exactly the encoder's); ``norm0..2`` are new, as in Swin's own detection code. ``head`` is dropped. The relative
position tables are resized by mmdet itself when the window differs.

ViT (timm keys, ``repro.models.vit``): mmdet 3.3 ships no plain-ViT backbone (``mmdet.models.backbones`` has Swin
and PVT; the ViTDet one lives in its ``projects/``, not in the package), so ``ReproViT`` (registered in mmdet's
``MODELS``) wraps our own timm encoder, built by ``repro.models.encoders`` and loaded by
``repro.evals.features.load_encoder`` (weights_only; every encoder key required; absolute and relative position
tables resized to the detection grid; LoMaR's iRPE and BEiT's relative bias kept as they are), and adds the
4-scale adapter of the BEiT / MAE detection protocol on the outputs of ``out_indices`` (4x: two 2x2 transposed convs
with BN + GELU between, 2x: one, 1x: identity, 0.5x: 2x2 max-pool).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from repro.config import ConfigError

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def timm_swin_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> the original Swin code's (``layers.<i>.downsample`` one stage earlier; no head)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("head."):
            continue
        m = _DOWNSAMPLE.match(k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample." + k[m.end():]
        out[k] = v
    return out


def swin_geometry(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """mmdet ``SwinTransformer`` sizes read from a timm Swin state dict (heads from the bias tables)."""
    if "patch_embed.proj.weight" not in state or not any(".relative_position_bias_table" in k for k in state):
        raise ConfigError("the checkpoint is not a Swin encoder (no patch_embed / relative_position_bias_table)")
    w = state["patch_embed.proj.weight"]
    stages = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    depths = [1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"layers.{i}.blocks."))
              for i in range(stages)]
    heads = [int(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in range(stages)]
    span = int(state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    window = (round(span ** 0.5) + 1) // 2
    return {"embed_dims": int(w.shape[0]), "patch_size": int(w.shape[-1]), "depths": depths, "num_heads": heads,
            "pretrain_window": window,
            "mlp_ratio": int(state["layers.0.blocks.0.mlp.fc1.weight"].shape[0]) // int(w.shape[0])}


def convert_swin_to_mm(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(mmdet detector keys ``backbone.*`` for its ``SwinTransformer``, keys of ``state`` deliberately dropped)."""
    from mmdet.models.backbones.swin import swin_converter

    official = timm_swin_to_official(state)
    last = len(swin_geometry(state)["depths"]) - 1
    out = {}
    for k, v in swin_converter(official).items():
        out[k.replace("backbone.norm.", f"backbone.norm{last}.", 1) if k.startswith("backbone.norm.") else k] = v
    return out, sorted(k for k in state if k.startswith("head."))


def mm_swin_backbone(state: Mapping[str, torch.Tensor], *, window_size: int, drop_path: float,
                     checkpoint: str | None) -> dict[str, Any]:
    """mmdet config of the ``SwinTransformer`` backbone for ``state``, loading ``checkpoint`` (converted keys)."""
    g = swin_geometry(state)
    p = g["patch_size"]
    return {"type": "SwinTransformer", "embed_dims": g["embed_dims"], "depths": g["depths"],
            "num_heads": g["num_heads"], "window_size": window_size, "mlp_ratio": g["mlp_ratio"], "qkv_bias": True,
            "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": drop_path,
            "patch_norm": True, "patch_size": p, "strides": (p, 2, 2, 2)[: len(g["depths"])],
            "out_indices": tuple(range(len(g["depths"]))), "with_cp": False, "convert_weights": False,
            "init_cfg": {"type": "Pretrained", "checkpoint": checkpoint} if checkpoint else None}


def swin_channels(state: Mapping[str, torch.Tensor]) -> list[int]:
    g = swin_geometry(state)
    return [g["embed_dims"] * 2 ** i for i in range(len(g["depths"]))]


def swin_strides(state: Mapping[str, torch.Tensor]) -> list[int]:
    g = swin_geometry(state)
    return [g["patch_size"] * 2 ** i for i in range(len(g["depths"]))]


def register_repro_vit() -> None:
    """Register ``ReproViT`` (``repro_vit_cls``) in mmdet's ``MODELS`` (once)."""
    from mmdet.registry import MODELS

    if "ReproViT" not in MODELS.module_dict:
        MODELS.register_module(name="ReproViT", module=repro_vit_cls())


@functools.lru_cache(maxsize=1)
def repro_vit_cls() -> type[nn.Module]:
    """The mmdet backbone class ``ReproViT`` wrapping our ViT (defined on first use: mmengine is optional)."""
    from mmengine.model import BaseModule

    from repro.evals.features import load_encoder
    from repro.models.encoders import create_encoder
    from repro.models.vit import run_blocks

    class _ReproViT(BaseModule):
        """Our ViT encoder + the BEiT/MAE 4-scale adapter; outputs (4x, 2x, 1x, 0.5x) of the patch grid."""

        def __init__(self, model_cfg: Mapping[str, Any], img_size: int, out_indices: Sequence[int] = (3, 5, 7, 11),
                     checkpoint: str | None = None, drop_path: float = 0.0, init_cfg: Any = None) -> None:
            super().__init__(init_cfg)
            self.vit = create_encoder({**model_cfg, "drop_path": drop_path}, img_size)
            self.checkpoint = checkpoint
            depth = len(self.vit.blocks)
            if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
                raise ConfigError(f"detect.out_indices {list(out_indices)}: four block indices below {depth}")
            self.out_indices = tuple(out_indices)
            d = self.vit.embed_dim
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                      nn.ConvTranspose2d(d, d, 2, 2))
            self.fpn2 = nn.ConvTranspose2d(d, d, 2, 2)
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(2, 2)

        def init_weights(self) -> None:
            """The encoder's pretrained weights (random init: its own initialisation is kept); the adapter keeps
            PyTorch's default initialisation."""
            self.load_info = load_encoder(self.vit, self.checkpoint)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            vit = self.vit
            t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
            hidden: list[torch.Tensor] = []
            run_blocks(vit, t, hidden=hidden)
            gh, gw = vit.patch_embed.grid_size
            prefix = int(getattr(vit, "num_prefix_tokens", 0))
            maps = [hidden[i][:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in self.out_indices]
            return tuple(op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps))

    return _ReproViT
