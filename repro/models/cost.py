"""FLOPs of transformer parts, by formula (pure arithmetic on the architecture's sizes; no torch, planning imports
it): linear layers, attention, pre-norm blocks, CaiT class-attention, and MAE's visible-only encoder. Each method's
spec (``repro/methods/specs/``) adds up its step from these (``MethodSpec.flops``); ``repro.profile.cost`` reports the
sum. The conventions are those of ``repro.profile.flops`` (FlopCounterMode), so the formulas can be checked against
the counter exactly:

- a multiply-add is 2 FLOPs; only matrix products and convolutions count (norms, softmax, GELU are left out);
- a trained linear layer costs 2·n·in·out forward and twice that backward (input and weight gradients); a layer
  whose input needs no gradient (the patch embedding) only the weight gradient; a frozen one (a teacher) nothing;
- attention costs 4·n²·d forward (QK^T and AV) and 2.5x that backward (the fused kernels recompute the scores:
  five products), the convention torch registers for flash attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from repro.models.archs import arch_dims

ATTN_BWD = 2.5  # backward / forward FLOPs of fused attention (scores recomputed)


def linear_flops(n: float, d_in: float, d_out: float, trained: bool = True, input_grad: bool = True) -> float:
    """Forward + backward FLOPs of a linear map on ``n`` tokens."""
    fwd = 2.0 * n * d_in * d_out
    if not trained:
        return fwd
    return fwd + fwd * (2.0 if input_grad else 1.0)


def attention_flops(n_q: float, n_k: float, dim: float, seqs: float = 1.0, trained: bool = True) -> float:
    """QK^T and AV for ``seqs`` sequences of ``n_q`` queries over ``n_k`` keys, total head width ``dim``."""
    fwd = 4.0 * seqs * n_q * n_k * dim
    return fwd * (1.0 + ATTN_BWD) if trained else fwd


def block_flops(n: float, dim: float, mlp_ratio: float = 4.0, seqs: float = 1.0, trained: bool = True,
                rel_buckets: int = 0) -> float:
    """One pre-norm transformer block (qkv, proj, fc1, fc2 + attention) on ``seqs`` sequences of ``n`` tokens.
    ``rel_buckets`` > 0 adds iRPE's contextual key term (q times a (buckets, head_dim) table, per head)."""
    toks = seqs * n
    hidden = mlp_ratio * dim
    f = (linear_flops(toks, dim, 3 * dim, trained) + linear_flops(toks, dim, dim, trained)
         + linear_flops(toks, dim, hidden, trained) + linear_flops(toks, hidden, dim, trained))
    f += attention_flops(n, n, dim, seqs, trained)
    if rel_buckets:
        f += linear_flops(toks, dim, rel_buckets, trained)
    return f


def class_attention_flops(n: float, dim: float, mlp_ratio: float = 4.0, trained: bool = True) -> float:
    """A CaiT class-attention block: one cls query over ``n`` patch tokens + the cls (k, v on n + 1 tokens)."""
    f = linear_flops(1, dim, dim, trained) + linear_flops(n + 1, dim, 2 * dim, trained) + linear_flops(1, dim, dim,
                                                                                                        trained)
    f += attention_flops(1, n + 1, dim, 1, trained)
    f += linear_flops(1, dim, mlp_ratio * dim, trained) + linear_flops(1, mlp_ratio * dim, dim, trained)
    return f


@dataclass(frozen=True)
class ViTGeometry:
    """The sizes of a resolved ViT pretraining config that the cost formulas read."""

    dim: int
    depth: int
    mlp: float
    patch: int
    grid: int  # patches per side
    length: int  # patches per image
    pix: int  # values per patch (3 p^2)
    cls: int  # 1 with a cls token in the sequence
    rel: int  # iRPE contextual buckets per head (0 without)


def vit_geometry(cfg: Mapping[str, Any]) -> ViTGeometry | None:
    """The ViT sizes of ``cfg``; None for an encoder that is not a ViT (Swin: no analytic model yet)."""
    model = cfg["model"]
    try:
        dims = arch_dims(model)
    except ValueError:
        return None
    p = model["patch_size"]
    grid = cfg["data"]["img_size"] // p
    return ViTGeometry(dim=dims["embed_dim"], depth=dims["depth"], mlp=dims["mlp_ratio"], patch=p, grid=grid,
                       length=grid * grid, pix=3 * p * p, cls=1 if model.get("class_token", True) else 0,
                       rel=50 if model.get("rel_pos") == "irpe" else 0)  # 7 x 7 product buckets + 1 for the cls


def visible_encoder_flops(g: ViTGeometry, mask_ratio: float) -> tuple[dict[str, float], dict[str, str], int]:
    """MAE's encoder: the patch embedding of every patch, then the blocks on ``int(L (1 - r))`` visible patches
    (+ cls). Returns the parts, the token counts and the encoder's sequence length."""
    n = int(g.length * (1 - mask_ratio)) + g.cls
    parts = {"patch_embed": linear_flops(g.length, g.pix, g.dim, input_grad=False),
             "encoder": g.depth * block_flops(n, g.dim, g.mlp, rel_buckets=g.rel)}
    return parts, {"encoder": f"{n}"}, n
