"""Our exported ViT encoder (a timm ``VisionTransformer`` state dict, ``repro.models.vit``) -> mmsegmentation's ViT
backbone keys.

Target: mmseg 1.2.2's ``MAE`` backbone (BEiT-style layers with a full qkv bias, an absolute position table, one
relative position bias table per layer and LayerScale ``gamma_1/gamma_2``), which ``repro.transfer.mmseg`` extends
as ``ReproMAE`` (a sequence without a cls token, LoMaR's contextual iRPE tables). Key map::

    cls_token                       -> cls_token                       (zeros when the encoder has none: ExtreMA)
    pos_embed                       -> pos_embed                       (resampled to the new patch grid, bicubic;
                                                                        a zero cls row added when there is no cls)
    patch_embed.proj.*              -> patch_embed.projection.*
    blocks.i.norm1/norm2.*          -> layers.i.ln1/ln2.*
    blocks.i.attn.qkv/proj.*        -> layers.i.attn.qkv/proj.*
    blocks.i.attn.rel_table         -> layers.i.attn.relative_position_bias_table (resized; zeros when absent, the
                                                                        MAE segmentation protocol's initialisation)
    blocks.i.attn.rpe_k             -> layers.i.attn.rpe_k             (LoMaR iRPE: its buckets do not depend on
                                                                        the grid, so the table is carried as is)
    blocks.i.ls1/ls2.gamma          -> layers.i.gamma_1/gamma_2        (ones when the encoder has no LayerScale)
    blocks.i.mlp.fc1/fc2.*          -> layers.i.ffn.layers.0.0/ffn.layers.1.*
    norm.*                          -> ln1.*                           (only with ``final_norm``; else dropped, as
                                                                        the MAE/BEiT segmentation backbones do)

Our relative table and BEiT's share one layout (row offset major, then column offset, then the three cls entries
cls->token, token->cls, cls->cls), so a table is copied, not permuted. Any other key is refused, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Keys an exported encoder may carry that no backbone uses (classifier parts).
_HEAD = ("head.", "fc_norm.")


@dataclass
class Converted:
    """A converted state dict and what the conversion did beyond renaming (for the stage's log and result)."""

    state: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def encoder_layout(state: Mapping[str, torch.Tensor]) -> dict[str, int | bool]:
    """Sizes read off an encoder state dict: depth, embed_dim, num_heads (None: not in the state), class token,
    source patch grid side, relative position kind."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or "patch_embed.proj.weight" not in state:
        raise ValueError("not a ViT encoder state dict (no blocks.<i>.* or patch_embed.proj.weight)")
    dim = int(state["patch_embed.proj.weight"].shape[0])
    cls = "cls_token" in state
    grid = 0
    pos = state.get("pos_embed")
    if pos is not None:
        n = pos.shape[1] - (1 if cls else 0)
        grid = round(n**0.5)
        if grid * grid != n:
            raise ValueError(f"pos_embed {tuple(pos.shape)} is not a square grid (+ {int(cls)} prefix token)")
    rel = "irpe" if "blocks.0.attn.rpe_k" in state else "bias" if "blocks.0.attn.rel_table" in state else "none"
    return {"depth": max(blocks) + 1, "embed_dim": dim, "class_token": cls, "grid": grid, "rel_pos": rel,
            "layer_scale": "blocks.0.ls1.gamma" in state, "patch_size": int(state["patch_embed.proj.weight"].shape[-1])}


def resample_pos(pos: torch.Tensor, prefix: int, new_grid: tuple[int, int]) -> torch.Tensor:
    """(1, prefix + g*g, C) -> (1, prefix + H*W, C) with timm's bicubic resampling over the patch grid."""
    from timm.layers import resample_abs_pos_embed

    old = round((pos.shape[1] - prefix) ** 0.5)
    if tuple(new_grid) == (old, old):
        return pos.clone()
    return resample_abs_pos_embed(pos, list(new_grid), [old, old], num_prefix_tokens=prefix)


def resize_rel_table(table: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """A BEiT-layout relative bias table ((2g-1)^2 + 3, heads) fitted to ``new_grid`` (timm's resize, the three cls
    entries kept)."""
    from timm.layers import resize_rel_pos_bias_table

    shape = ((2 * new_grid[0] - 1) * (2 * new_grid[1] - 1) + 3, table.shape[1])
    if tuple(table.shape) == shape:
        return table.clone()
    return resize_rel_pos_bias_table(table, tuple(new_grid), shape)


def vit_to_mmseg(state: Mapping[str, torch.Tensor], grid: tuple[int, int], num_heads: int,
                 final_norm: bool = False) -> Converted:
    """Convert an encoder state dict to ``ReproMAE`` backbone keys for a ``grid`` (rows, cols) of patches.

    ``num_heads`` sizes the relative tables an encoder without them gets (zeros). Raises ``ValueError`` on a key it
    does not know (a silent drop would fake a transfer result)."""
    lay = encoder_layout(state)
    dim, depth = int(lay["embed_dim"]), int(lay["depth"])
    grid = (int(grid[0]), int(grid[1]))
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        out[dst] = state[src].detach().clone().float()
        used.add(src)

    if lay["class_token"]:
        take("cls_token", "cls_token")
    else:
        out["cls_token"] = torch.zeros(1, 1, dim)
        notes.append("no cls token in the encoder: the backbone runs without one (cls_token/pos row unused zeros)")
    pos = state.get("pos_embed")
    if pos is None:
        out["pos_embed"] = torch.zeros(1, 1 + grid[0] * grid[1], dim)
        notes.append("no absolute position table: zeros")
    else:
        used.add("pos_embed")
        pos = pos.detach().float()
        if not lay["class_token"]:
            pos = torch.cat([torch.zeros(1, 1, dim), pos], dim=1)
        out["pos_embed"] = resample_pos(pos, 1, grid)
        if (int(lay["grid"]),) * 2 != grid:
            notes.append(f"pos_embed resampled {lay['grid']}x{lay['grid']} -> {grid[0]}x{grid[1]} (bicubic)")
    take("patch_embed.proj.weight", "patch_embed.projection.weight")
    take("patch_embed.proj.bias", "patch_embed.projection.bias")
    rel_shape = ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads)
    for i in range(depth):
        s, d = f"blocks.{i}.", f"layers.{i}."
        for a, b in (("norm1", "ln1"), ("norm2", "ln2"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                     ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1")):
            for p in ("weight", "bias"):
                take(f"{s}{a}.{p}", f"{d}{b}.{p}")
        for j in (1, 2):
            key = f"{s}ls{j}.gamma"
            if key in state:
                take(key, f"{d}gamma_{j}")
            else:
                out[f"{d}gamma_{j}"] = torch.ones(dim)
        table = state.get(f"{s}attn.rel_table")
        if table is not None:
            used.add(f"{s}attn.rel_table")
            out[f"{d}attn.relative_position_bias_table"] = resize_rel_table(table.detach().float(), grid)
        else:
            out[f"{d}attn.relative_position_bias_table"] = torch.zeros(rel_shape)
        if f"{s}attn.rpe_k" in state:
            take(f"{s}attn.rpe_k", f"{d}attn.rpe_k")
    if lay["rel_pos"] == "none":
        notes.append("relative position bias tables start at zero (MAE's segmentation protocol)")
    elif lay["rel_pos"] == "bias" and lay["grid"] and int(lay["grid"]) != grid[0]:
        notes.append(f"relative position tables resized to the {grid[0]}x{grid[1]} grid")
    if not lay["layer_scale"]:
        notes.append("no LayerScale in the encoder: gamma_1/gamma_2 = 1")
    if final_norm and "norm.weight" not in state:
        raise ValueError("final_norm=true but the encoder has no final norm (norm.*; an avg-pool encoder keeps "
                         "its fc_norm with the head); use final_norm=false")
    if "norm.weight" in state:
        used.update(("norm.weight", "norm.bias"))
        if final_norm:
            take("norm.weight", "ln1.weight")
            take("norm.bias", "ln1.bias")
        else:
            notes.append("the encoder's final norm is not used (final_norm=false, the MAE/BEiT protocol)")
    left = sorted(k for k in state if k not in used and not k.startswith(_HEAD))
    if left:
        raise ValueError(f"encoder keys with no place in the mmseg backbone: {left[:6]}"
                         f"{' ...' if len(left) > 6 else ''}")
    return Converted(out, notes)
