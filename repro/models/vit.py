"""ViT backbones through timm, fixed 2-D sin-cos position tables, and relative-position attention.

Every encoder the suite trains is a ``timm.models.vision_transformer.VisionTransformer`` built by ``create_vit``, so
its state dict loads into ``timm.create_model(timm_name(...), ...)``. With ``model.rel_pos`` the blocks are
``RelPosBlock``s: methods that feed a subset of tokens (MAE's visible patches, LoMaR's windows) call them with the
tokens' grid coordinates (``run_blocks``); timm's own forward passes none, which means the full grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from repro.models.archs import ARCHS, arch_dims  # noqa: F401  (ARCHS re-exported; the tables live there)

# timm's registered model each arch is built from (its defaults are overridden by the explicit sizes).
_TIMM_BASE = {
    "vit_nano": "vit_tiny", "vit_micro": "vit_tiny", "vit_mini": "vit_tiny",
    "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_huge": "vit_huge",
}


def timm_name(arch: str, patch_size: int) -> str:
    """The timm model name to pass to ``timm.create_model`` (with the explicit sizes as kwargs)."""
    base = _TIMM_BASE[arch]
    if base in ("vit_small", "vit_base") and patch_size == 8:
        return f"{base}_patch8_224"
    return f"{base}_patch{14 if base == 'vit_huge' else 16}_224"


def timm_kwargs(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
                ) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(timm_name(...), **kw)`` build exactly our encoder."""
    d = arch_dims(model_cfg)
    pool = global_pool or model_cfg.get("global_pool", "token")
    cls_token = bool(model_cfg.get("class_token", True))
    return {
        "img_size": img_size,
        "patch_size": model_cfg["patch_size"],
        "embed_dim": d["embed_dim"],
        "depth": d["depth"],
        "num_heads": d["num_heads"],
        "mlp_ratio": d["mlp_ratio"],
        "num_classes": num_classes,
        "class_token": cls_token,
        "global_pool": "avg" if pool == "avg" or not cls_token else "token",  # no cls token: mean + fc_norm
        "drop_path_rate": float(model_cfg.get("drop_path") or 0.0),
        "init_values": model_cfg.get("layer_scale"),
        "pos_embed": "none" if model_cfg.get("pos_embed") == "none" else "learn",
    }


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2)), the MAE/Transformer convention."""
    if dim % 2:
        raise ValueError("sin-cos embedding needs an even dimension")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D table of shape ``(grid_h*grid_w [+1], dim)``: first half encodes x (column), second half y (row);
    the cls row (first) is zeros. Row-major token order, as patch embedding flattens."""
    if dim % 4:
        raise ValueError("2-D sin-cos embedding needs a dimension divisible by 4")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float,
              fused: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, H, N, d) tensors; ``bias`` is an additive float mask broadcast to
    (B, H, N, N) (relative positions, -inf / large negative where a pair must not attend). ``fused``: one
    ``scaled_dot_product_attention`` call (flash / memory-efficient / CPU kernels, the bias as ``attn_mask``);
    otherwise the explicit product, softmax and dropout (``train.fused_attn=false``, for debugging)."""
    if fused:
        if bias is not None and bias.stride(-1) != 1:
            bias = bias.contiguous()  # CUDA's fused kernels refuse a mask without unit last-dim stride
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def set_fused_attn(module: nn.Module, on: bool) -> int:
    """Run every attention layer of ``module`` through SDPA (``on``) or the explicit softmax(QK^T)V: timm's ViT,
    decoder, CaiT class-attention and Swin window attention (their ``fused_attn``), the relative-position layers here,
    and the visible-only Swin attention of ``repro.models.swin`` (``explicit_attn``). Returns how many layers."""
    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = on
            m.explicit_attn = not on
            n += 1
    return n


class RelPosAttention(Attention):
    """timm Attention plus a relative-position term computed from the tokens' grid coordinates.

    ``kind='bias'``: one learnable bias per head and relative offset (BEiT/SimMIM "shared relative position bias"),
    indexed at the coordinates actually present, so any subset of the grid works. ``coords`` (an argument of the
    forward, passed on by ``RelPosBlock``) is ``(B or 1, N_patch, 2)`` (row, col); without it the patch tokens are
    the full grid in raster order. Tokens before the patches (cls) get their own learned bias rows. Other kinds
    (LoMaR's contextual iRPE, ``repro.models.irpe``) subclass this and override ``position_term``.
    """

    def __init__(self, dim: int, num_heads: int, grid: int, num_prefix: int = 1, qkv_bias: bool = True, **kw: Any):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kw)
        self.fused_attn = True  # SDPA whatever timm's default; ``set_fused_attn`` (train.fused_attn) switches it
        self.grid = grid
        self.num_prefix = num_prefix
        span = 2 * grid - 1
        self.rel_table = nn.Parameter(torch.zeros(span * span + 3, num_heads))  # +3: cls->tok, tok->cls, cls->cls
        nn.init.trunc_normal_(self.rel_table, std=0.02)

    def default_coords(self, n: int, device: torch.device) -> torch.Tensor:
        """Coordinates of ``n`` tokens (prefix included) passed without any: the full patch grid, else an error."""
        if n - self.num_prefix != self.grid * self.grid:
            raise RuntimeError(f"relative-position attention got {n - self.num_prefix} patch tokens of a "
                               f"{self.grid}x{self.grid} grid without their coords; pass coords= to the block")
        return grid_coords(self.grid, self.grid, device)[None]

    def position_term(self, q: torch.Tensor, n: int, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Additive attention bias of shape (B or 1, H, N, N)."""
        if coords is None:
            coords = self.default_coords(n, q.device)
        span = 2 * self.grid - 1
        rel = coords[:, :, None, :] - coords[:, None, :, :] + (self.grid - 1)  # (B, P, P, 2)
        idx = rel[..., 0] * span + rel[..., 1]
        b = idx.shape[0]
        full = torch.full((b, n, n), span * span + 2, dtype=torch.long, device=idx.device)
        k = self.num_prefix
        full[:, k:, k:] = idx
        full[:, :k, k:] = span * span
        full[:, k:, :k] = span * span + 1
        # Gathered from the (H, entries) view: (H, b, N, N) -> (b, H, N, N) keeps unit stride on the key axis, which
        # the GPU SDPA kernels need of a mask (else they fall back to the explicit, fp32 math path).
        return self.rel_table.t()[:, full].transpose(0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.position_term(q, n, coords).to(q.dtype)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = attention(q, k, v, bias, self.attn_drop.p if self.training else 0.0, self.fused_attn)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(x)))


class RelPosBlock(Block):
    """timm's Block whose forward also takes the tokens' grid coordinates and hands them to its attention, as it
    hands ``attn_mask``. Built by timm itself (``block_fn``), so parameters and their initialisation are Block's."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                coords: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, coords=coords)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def rel_pos_kinds() -> dict[str, type[RelPosAttention]]:
    """``model.rel_pos`` -> its attention class."""
    from repro.models.irpe import IRPEAttention

    return {"bias": RelPosAttention, "irpe": IRPEAttention}


# (function, backend, mode, dynamic) -> torch.compile(function): one compiled callable per function, shared by every
# module that runs it (a method's compiled units, the visible-only Swin block)
_COMPILED: dict[tuple[Callable[..., Any], str, str | None, bool | None], Callable[..., Any]] = {}


def compile_once(fn: Callable[..., Any], backend: str, mode: str | None, dynamic: bool | None) -> Callable[..., Any]:
    """``torch.compile(fn, ...)``, made once per (function, backend, mode, dynamic) in this process."""
    key = (fn, backend, mode, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=dynamic, **({"mode": mode} if mode else {}))
    return _COMPILED[key]


def run_blocks(vit: VisionTransformer, x: torch.Tensor, coords: torch.Tensor | None = None,
               hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``vit``'s blocks on tokens ``x`` (prefix first) whose patch tokens sit at grid ``coords`` (B or 1, N_patch, 2)
    (used by relative-position encoders; None: the full grid); each block's output is appended to ``hidden``."""
    kw = {"coords": coords} if coords is not None and isinstance(vit.blocks[0], RelPosBlock) else {}
    for blk in vit.blocks:
        x = blk(x, **kw)
        if hidden is not None:
            hidden.append(x)
    return x


def create_vit(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0, global_pool: str | None = None,
               ) -> VisionTransformer:
    """Build the encoder: a timm ViT with a fixed (or trainable) 2-D sin-cos table and optional relative positions."""
    import timm

    kw = timm_kwargs(model_cfg, img_size, num_classes, global_pool)
    rel = model_cfg.get("rel_pos", "none")
    kinds = rel_pos_kinds()
    if rel != "none":
        if rel not in kinds:
            raise ValueError(f"unknown model.rel_pos '{rel}'; valid: none, {', '.join(kinds)}")
        kw["block_fn"] = RelPosBlock
    vit: VisionTransformer = timm.create_model(timm_name(model_cfg["arch"], model_cfg["patch_size"]),
                                               pretrained=False, **kw)
    pos = model_cfg.get("pos_embed", "sincos")
    if pos != "none":
        gh, gw = vit.patch_embed.grid_size
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_2d(vit.embed_dim, gh, gw, cls_token=vit.cls_token is not None)[None])
        vit.pos_embed.requires_grad_(pos == "learned")
    if rel != "none":
        grid = vit.patch_embed.grid_size[0]
        for blk in vit.blocks:
            old = blk.attn
            new = kinds[rel](vit.embed_dim, vit.blocks[0].attn.num_heads, grid, num_prefix=vit.num_prefix_tokens,
                             qkv_bias=old.qkv.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            blk.attn = new
    return vit


def share_rel_pos_table(vit: nn.Module) -> nn.Parameter:
    """Make every relative-position-bias layer of ``vit`` use the first layer's table (BEiT pretraining's "shared
    relative position bias"); returns the shared parameter.

    The state dict still has one ``blocks.<i>.attn.rel_table`` key per layer (all the same tensor), so the exported
    encoder loads into a ``rel_pos: bias`` ViT, each layer getting its own copy of the shared table, as BEiT's
    fine-tuning initialises its per-layer tables."""
    layers = [m for m in vit.modules() if type(m) is RelPosAttention]
    if not layers:
        raise ValueError("share_rel_pos_table needs a ViT built with model.rel_pos=bias")
    table = layers[0].rel_table
    for m in layers[1:]:
        m.rel_table = table
    return table


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) long tensor of (row, col) in patch-flattening order."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)


def has_rel_pos(vit: nn.Module) -> bool:
    return any(isinstance(m, RelPosAttention) for m in vit.modules())


def encoder_state_dict(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Plain tensor state dict of the encoder, without any classifier head."""
    return {k: v.detach().cpu().clone() for k, v in vit.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def with_zero_pos_embed(state: dict[str, torch.Tensor], vit: VisionTransformer, grid: int) -> dict[str, torch.Tensor]:
    """``state`` plus an all-zero ``pos_embed`` when ``vit`` has no absolute table (BEiT, LoMaR): evaluation ViTs built
    with a fixed table then get exactly the position-free encoder; ViTs built with ``pos_embed=none`` ignore it."""
    if vit.pos_embed is None:
        state["pos_embed"] = torch.zeros(1, grid * grid + vit.num_prefix_tokens, vit.embed_dim)
    return state
