"""Swin backbones through timm, and a visible-only forward with grouped window attention (GreenMIM).

Every Swin encoder is a ``timm.models.swin_transformer.SwinTransformer`` built by ``create_swin`` (so its state dict
loads into ``timm.create_model(timm_name(arch), ...)`` with the sizes of ``timm_kwargs``). ``forward_visible`` runs
the SAME modules (patch embedding, blocks' qkv / proj / relative_position_bias_table / norms / MLPs, PatchMerging) on
the visible tokens only, as GreenMIM (LayneH/GreenMIM, modeling/green_swin_models.py + group_window_attention.py)
does:

- one visibility pattern for the whole batch, aligned with the last stage's cells (2x2 merges never mix visible and
  masked tokens); tokens are kept in raster order of their grid at every level;
- window attention: a token's window id is ``(coord + (ws - shift) % ws) // ws``; for a shifted block this gives
  exactly the regions that Swin's cyclic shift + attention mask separates, so no roll is needed;
- when there are more than ``2 * ws**2`` visible tokens the windows are packed into groups of at most
  ``min(ws**2, largest window)`` tokens by repeated 0/1 knapsack (dynamic programming: each group is filled as full as
  possible), padded to equal size; pairs from different windows (and padding) get -100 added to the logits (the
  official value, as Swin's own shifted-window mask); otherwise all tokens form one group with the same mask;
- the relative position bias is the block's table read at the visible tokens' coordinate differences.

Timm's stage layout downsamples at the START of stages 1..3 (the original code at the end of stages 0..2): the
arithmetic is the same. timm clamps a window to the stage grid (and drops the shift) when the grid is not larger
than the window, as the official code does; ``forward_visible`` reads the window and shift from timm's blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn

from repro.models.archs import SWIN_ARCHS, check_geometry, is_swin, swin_dims  # noqa: F401  (re-exported)
from repro.models.relpos import attention
from repro.models.vit import compile_once

_TIMM_BASE = {"swin_nano": "swin_tiny", "swin_micro": "swin_tiny", "swin_mini": "swin_tiny"}
MASK_VALUE = -100.0  # added to the logits of pairs that must not attend (official GreenMIM / Swin value)


def timm_name(arch: str) -> str:
    """The timm model to pass to ``timm.create_model`` (with the explicit sizes of ``timm_kwargs``)."""
    return f"{_TIMM_BASE.get(arch, arch)}_patch4_window7_224"


def timm_kwargs(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
                ) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(timm_name(arch), **kw)`` build exactly our encoder."""
    d = swin_dims(model_cfg)
    check_geometry(img_size, model_cfg["patch_size"], d["depths"], d["window_size"])
    return {
        "img_size": img_size,
        "patch_size": model_cfg["patch_size"],
        "embed_dim": d["embed_dim"],
        "depths": d["depths"],
        "num_heads": d["num_heads"],
        "window_size": d["window_size"],
        "mlp_ratio": d["mlp_ratio"],
        "num_classes": num_classes,
        "global_pool": "avg" if global_pool in (None, "avg", "token") else global_pool,  # Swin has no cls token
        "drop_path_rate": float(model_cfg.get("drop_path") or 0.0),
    }


def create_swin(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = "avg",
                ) -> SwinTransformer:
    """Build the timm Swin encoder. Features = average of the last stage's tokens after the final norm."""
    import timm

    return timm.create_model(timm_name(model_cfg["arch"]), pretrained=False,
                             **timm_kwargs(model_cfg, img_size, num_classes, global_pool))


def encoder_state_dict(model: SwinTransformer) -> dict[str, torch.Tensor]:
    """Plain tensor state dict of the encoder, without the classifier head."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


# ----------------------------------------------------------------------------------------------------------------
# Visible-only forward


@dataclass
class SwinTokens:
    """Tokens of one level of the hierarchy: ``tokens`` (B, N, C) in raster order of ``coords`` (N, 2) (row, col) on a
    ``grid`` = (h, w); ``ids`` (N,) = row * w + col, the positions in the full grid."""

    tokens: torch.Tensor
    coords: torch.Tensor
    grid: tuple[int, int]

    @property
    def ids(self) -> torch.Tensor:
        return self.coords[:, 0] * self.grid[1] + self.coords[:, 1]


@dataclass
class VisibleOutput:
    """``stages[i]``: output of stage i's blocks (timm layout: stage 0 at the patch grid, then / 2 each);
    ``merged[i]``: output of the patch merging that starts stage i+1 (GreenMIM/LocalMIM's "stage i output after
    downsampling"); ``out``: last stage after the final norm."""

    stages: list[SwinTokens]
    merged: list[SwinTokens]
    out: SwinTokens


def knapsack(capacity: int, sizes: Sequence[int]) -> tuple[int, list[int]]:
    """0/1 knapsack with value = weight: the largest total <= capacity of a subset of ``sizes``, and that subset's
    indices in increasing order (the latest item is preferred on ties, as the official backtracking)."""
    n = len(sizes)
    best = [[0] * (capacity + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        s = sizes[i - 1]
        prev, row = best[i - 1], best[i]
        for w in range(capacity + 1):
            row[w] = max(prev[w], prev[w - s] + s) if s <= w else prev[w]
    total, w, chosen = best[n][capacity], capacity, []
    for i in range(n, 0, -1):
        if best[i][w] != best[i - 1][w]:
            chosen.append(i - 1)
            w -= sizes[i - 1]
    return total, chosen[::-1]


def pack_windows(capacity: int, sizes: Sequence[int]) -> list[list[int]]:
    """Greedy packing of windows (token counts ``sizes``) into groups: each group is the best knapsack fill of the
    windows left. Returns the window indices of every group."""
    left = list(range(len(sizes)))
    groups = []
    while left:
        _, pick = knapsack(capacity, [sizes[i] for i in left])
        if not pick:  # a window larger than the capacity cannot happen (capacity >= largest window)
            raise RuntimeError("window larger than the group capacity")
        groups.append([left[i] for i in pick])
        left = [w for j, w in enumerate(left) if j not in set(pick)]
    return groups


class _RowGather(torch.autograd.Function):
    """``x[:, index]`` along dim 1 with a backward that is a gather too: ``inverse[j]`` is the output row holding
    input row j (``len(index)``: none, zero gradient); ``pad`` lists extra output rows that repeat input row 0 (the
    padding slots of a grouping), whose gradients are summed into row 0: their indices, or (bool) a mask over the
    output rows (the compiled path: no tensor whose size depends on the mask). Index backward would instead scatter
    with index_put's sort-and-accumulate kernel (slow on a GPU); both give the same sums up to float rounding."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                pad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse, pad)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        inverse, pad = ctx.saved_tensors
        zero = grad.new_zeros(grad.shape[0], 1, *grad.shape[2:])
        gx = torch.cat([grad, zero], dim=1).index_select(1, inverse)
        if pad.dtype == torch.bool:
            gx[:, 0] += torch.where(pad[None, :, None], grad, 0).sum(dim=1)
        elif pad.numel():
            gx[:, 0] += grad.index_select(1, pad).sum(dim=1)
        return gx, None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                pad: torch.Tensor | None = None) -> torch.Tensor:
    """``x[:, index]`` (see ``_RowGather``; ``inverse`` from ``inverse_index``)."""
    return _RowGather.apply(x, index, inverse, index.new_zeros(0) if pad is None else pad)


def inverse_index(index: torch.Tensor, rows: int) -> torch.Tensor:
    """For an ``index`` that takes each of ``rows`` input rows at most once: the output row of every input row,
    ``len(index)`` for rows it does not take."""
    inv = torch.full((rows,), index.numel(), dtype=torch.long, device=index.device)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


@dataclass
class WindowGrouping:
    """How the visible tokens of one level are arranged for one (window, shift): ``index`` (nG * G,) token index per
    slot (padding slots point at token 0), ``restore`` (N,) the slot of every token, ``bias_index`` (nG, G, G) into the
    relative position table (0 where masked), ``blocked`` (nG, G, G) True where the pair must not attend; ``pad`` the
    padding slots (or a bool mask of them, see ``_RowGather``) and ``slot_token`` (nG * G,) the token of every slot (N
    for padding): the inverse maps that let the backward of both rearrangements gather (``gather_rows``)."""

    index: torch.Tensor
    restore: torch.Tensor
    bias_index: torch.Tensor
    blocked: torch.Tensor
    group_size: int
    pad: torch.Tensor
    slot_token: torch.Tensor


def grouping_to(g: WindowGrouping, device: torch.device) -> WindowGrouping:
    """``g`` with its tensors on ``device`` (copied without waiting for the device when they are on the CPU)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in vars(g).items() if isinstance(v, torch.Tensor)}
    return WindowGrouping(**{**vars(g), **moved})


def window_ids(coords: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Window id of every token; for shift > 0 these are the regions Swin's cyclic shift + mask separates."""
    cell = (coords + (window - shift) % window) // window
    return cell[:, 0] * (coords[:, 1].max().item() // window + 2) + cell[:, 1]


def make_grouping(coords: torch.Tensor, window: int, shift: int, mode: str = "auto") -> WindowGrouping:
    """Pack the tokens at ``coords`` (N, 2) into equal groups of whole windows. ``mode``: 'group' (knapsack packing),
    'single' (one group of all tokens, windows separated by the mask only), 'auto' (official rule: single when
    N <= 2 * window**2)."""
    n = coords.shape[0]
    dev = coords.device
    wid = window_ids(coords, window, shift)
    if mode == "auto":
        mode = "single" if n <= 2 * window * window else "group"
    if mode == "single":
        index = torch.arange(n, device=dev)
        gid = wid[None]
        gsize = n
    else:
        order = torch.argsort(wid, stable=True)
        _, counts = torch.unique_consecutive(wid[order], return_counts=True)
        counts_l = counts.tolist()
        gsize = min(window * window, max(counts_l))
        members = order.split(counts_l)
        slots, gids = [], []
        for grp in pack_windows(gsize, counts_l):
            idx = torch.cat([members[w] for w in grp])
            pad = gsize - idx.numel()
            slots.append(F.pad(idx, (0, pad), value=-1))
            gids.append(F.pad(wid[idx], (0, pad), value=-1))
        index = torch.cat(slots)
        gid = torch.stack(gids)
    real = index >= 0
    restore = torch.empty(n, dtype=torch.long, device=dev)
    restore[index[real]] = torch.nonzero(real).squeeze(1)
    pad_slots = torch.nonzero(~real).squeeze(1)
    slot_token = torch.where(real, index, n)
    index = index.clamp_min(0)
    c = coords[index].reshape(-1, gsize, 2)
    rel = c[:, :, None, :] - c[:, None, :, :] + (window - 1)
    bias_index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    pad = gid < 0
    blocked = (gid[:, :, None] != gid[:, None, :]) | (pad[:, :, None] & pad[:, None, :])
    bias_index = bias_index.masked_fill(blocked, 0)
    return WindowGrouping(index, restore, bias_index, blocked, gsize, pad_slots, slot_token)


def grouped_attention(blk: SwinTransformerBlock, x: torch.Tensor, g: WindowGrouping) -> torch.Tensor:
    """The block's window attention (its qkv, proj and relative position table) on visible tokens ``x`` (B, N, C),
    arranged by ``g``. Returns (B, N, C) in the input order."""
    attn = blk.attn
    b, _, c = x.shape
    heads = attn.num_heads
    xg = gather_rows(x, g.index, g.restore, g.pad).reshape(-1, g.group_size, c)  # (B * nG, G, C)
    qkv = attn.qkv(xg).reshape(xg.shape[0], g.group_size, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    table = attn.relative_position_bias_table
    # table[bias_index]; embedding's backward sums the duplicates segment-wise (index backward: a slow scatter)
    bias = F.embedding(g.bias_index, table).permute(0, 3, 1, 2)  # (nG, H, G, G)
    bias = bias.masked_fill(g.blocked[:, None], MASK_VALUE)
    # (B * nG, H, G, d) -> (B, nG * H, G, d): the (nG * H) bias then broadcasts over the batch without a copy.
    q, k, v = (t.reshape(b, -1, g.group_size, t.shape[-1]) for t in (q, k, v))
    drop = attn.attn_drop.p if attn.training else 0.0
    # SDPA unless train.fused_attn=false asked for the explicit product (repro.models.vit.set_fused_attn)
    out = attention(q, k, v, bias.reshape(1, -1, g.group_size, g.group_size).to(q.dtype), drop,
                    fused=not getattr(attn, "explicit_attn", False))
    out = out.reshape(xg.shape[0], heads, g.group_size, -1)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(xg.shape[0], g.group_size, -1)))
    return gather_rows(out.reshape(b, -1, c), g.restore, g.slot_token)


def _block_visible(blk: SwinTransformerBlock, x: torch.Tensor, g: WindowGrouping) -> torch.Tensor:
    x = x + blk.drop_path1(grouped_attention(blk, blk.norm1(x), g))
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


def _block_visible_graph(blk: SwinTransformerBlock, x: torch.Tensor, index: torch.Tensor, restore: torch.Tensor,
                         slot_token: torch.Tensor, bias_index: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """``_block_visible`` on a grouping's tensors (the function ``compile_visible`` compiles): ``index`` and
    ``slot_token`` (nG, G); the padding slots are a mask (slot_token == N), so every size is nG, G or fixed."""
    slots = slot_token.reshape(-1)
    g = WindowGrouping(index.reshape(-1), restore, bias_index, blocked, bias_index.shape[-1], slots == x.shape[1],
                       slots)
    return _block_visible(blk, x, g)


def compile_visible(blk: SwinTransformerBlock, backend: str = "inductor", mode: str | None = None) -> None:
    """Run ``block_visible(blk, ...)`` through torch.compile (``train.compile_scope=all``; the engine's
    ``compile_blocks``).
    All blocks share one compiled function: one graph per stage shape, as the group count and size of a grouping
    (which change with the mask) are dynamic dimensions; no recompile across masks."""
    blk.visible_compile = (backend, mode)


def block_visible(blk: SwinTransformerBlock, x: torch.Tensor, g: WindowGrouping) -> torch.Tensor:
    """One Swin block on visible tokens (pre-norm attention + MLP, the block's own drop paths); compiled after
    ``compile_visible(blk)``."""
    key = getattr(blk, "visible_compile", None)
    if key is None or torch.compiler.is_compiling():
        return _block_visible(blk, x, g)
    fn = compile_once(_block_visible_graph, *key, dynamic=None)
    groups = g.bias_index.shape[0]
    index, slot_token = g.index.view(groups, -1), g.slot_token.view(groups, -1)
    if groups > 1 and g.group_size > 1:  # 'group' packing: nG and G change with the mask ('single' is fixed)
        for t in (index, slot_token, g.bias_index, g.blocked):
            torch._dynamo.mark_dynamic(t, list(range(t.dim())))
    return fn(blk, x, index, g.restore, slot_token, g.bias_index, g.blocked)


def merge_visible(merge: nn.Module, level: SwinTokens) -> SwinTokens:
    """timm PatchMerging on visible tokens: each visible 2x2 cell's tokens concatenated in timm's order
    [(0,0), (1,0), (0,1), (1,1)] (row, col offsets; the original Swin's x0, x1, x2, x3), then norm + reduction."""
    h, w = level.grid
    dev = level.coords.device
    slot = torch.full((h * w,), -1, dtype=torch.long, device=dev)
    slot[level.ids] = torch.arange(level.ids.numel(), device=dev)
    cells = torch.unique(level.coords // 2, dim=0)  # sorted rows: raster order of the coarse grid
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=dev)
    fine = cells[:, None, :] * 2 + offsets[None]  # (M, 4, 2)
    idx = slot[fine[..., 0] * w + fine[..., 1]]
    if (idx < 0).any():
        raise ValueError("visible tokens must cover whole 2x2 cells at every merge (mask on the last stage's grid)")
    flat = idx.reshape(-1)  # every visible token once
    tdev = level.tokens.device  # the coords may live on the CPU (index bookkeeping without host syncs)
    inv = inverse_index(flat, flat.numel())
    x = gather_rows(level.tokens, flat.to(tdev, non_blocking=True), inv.to(tdev, non_blocking=True))
    x = x.reshape(level.tokens.shape[0], cells.shape[0], -1)
    x = merge.reduction(merge.norm(x))
    return SwinTokens(x, cells, (h // 2, w // 2))


def storage_coords(coords: torch.Tensor, grid: tuple[int, int], unit: int) -> torch.Tensor:
    """The coordinates the official LocalMIM Swin (Swin/models_mim.py PatchMerging) attaches to merged tokens: it stores
    tokens unit-major (``unit`` x ``unit`` blocks in raster order, raster inside each block) but labels the token in
    storage slot p of the full ``grid`` with the raster coordinates of p. (N, 2) true (row, col) -> (N, 2) those
    labels; the identity where ``unit`` is 1 or covers the grid."""
    h, w = grid
    if h % unit or w % unit:
        raise ValueError(f"a {unit}x{unit} unit does not tile the {h}x{w} grid")
    r, c = coords[:, 0], coords[:, 1]
    slot = ((r // unit) * (w // unit) + c // unit) * unit * unit + (r % unit) * unit + c % unit
    return torch.stack([slot // w, slot % w], dim=1)


def stage_groupings(stage: nn.Module, coords: torch.Tensor, mode: str = "auto") -> list[WindowGrouping]:
    """One grouping per distinct (window, shift) of the stage's blocks, listed per block."""
    cache: dict[tuple[int, int], WindowGrouping] = {}
    out = []
    for blk in stage.blocks:
        key = (blk.window_size[0], blk.shift_size[0])
        if blk.window_size[0] != blk.window_size[1] or blk.shift_size[0] != blk.shift_size[1]:
            raise ValueError("the visible-only forward supports square windows only")
        if key not in cache:
            cache[key] = make_grouping(coords, key[0], key[1], mode)
        out.append(cache[key])
    return out


def visible_ids_from_units(unit_visible: torch.Tensor, unit: int) -> torch.Tensor:
    """Flat patch-grid ids of the patches inside visible mask units. ``unit_visible`` (Hu, Wu) bool, each unit
    ``unit`` x ``unit`` patches; returns the ids in raster order of the (Hu * unit, Wu * unit) grid."""
    hu, wu = unit_visible.shape
    full = unit_visible.repeat_interleave(unit, 0).repeat_interleave(unit, 1)
    return torch.nonzero(full.reshape(-1)).squeeze(1)


def forward_visible(model: SwinTransformer, imgs: torch.Tensor, visible_ids: torch.Tensor | None = None,
                    mode: str = "auto") -> VisibleOutput:
    """Swin forward on the visible patches only (one visibility pattern shared by the batch).

    ``visible_ids``: flat ids (row * W + col) of the visible patches on the patch grid, any order (None: all).
    Every 2x2 merge must see whole cells (use ``visible_ids_from_units`` with unit = 2 ** (stages - 1)).
    ``mode``: grouping of windows, see ``make_grouping``.
    """
    x = model.patch_embed(imgs)  # (B, H, W, C), normalised
    b, h, w, c = x.shape
    if visible_ids is None:
        visible_ids = torch.arange(h * w, device=x.device)
    ids = torch.sort(visible_ids.to(x.device)).values
    coords = torch.stack([ids // w, ids % w], dim=1)
    level = SwinTokens(gather_rows(x.reshape(b, h * w, c), ids, inverse_index(ids, h * w)), coords, (h, w))
    stages, merged = [], []
    for i, stage in enumerate(model.layers):
        if i > 0:
            level = merge_visible(stage.downsample, level)
            merged.append(level)
        t = level.tokens
        for blk, g in zip(stage.blocks, stage_groupings(stage, level.coords, mode)):
            t = block_visible(blk, t, g)
        level = SwinTokens(t, level.coords, level.grid)
        stages.append(level)
    out = SwinTokens(model.norm(level.tokens), level.coords, level.grid)
    return VisibleOutput(stages, merged, out)


def mask_unit(model: SwinTransformer) -> int:
    """Patches per side of the last stage's cell: the unit a visible-only mask must be drawn on."""
    return 2 ** (len(model.layers) - 1)
