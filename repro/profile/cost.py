"""Analytic cost model: tokens through the encoder, decoders and heads of each method -> FLOPs of one training step.

Printed beside the measured step time, it tells whether a gap between two methods is compute (FLOPs differ) or
overhead (FLOPs equal, time differs: memory traffic, kernel launches, Python). The conventions are those of
``repro.profile.flops`` (FlopCounterMode), so the model can be checked against the counter exactly:

- a multiply-add is 2 FLOPs; only matrix products and convolutions count (norms, softmax, GELU are left out);
- a trained linear layer costs 2·n·in·out forward and twice that backward (input and weight gradients); a layer
  whose input needs no gradient (the patch embedding) only the weight gradient; a frozen one (a teacher) nothing;
- attention costs 4·n²·d forward (QK^T and AV) and 2.5x that backward (the fused kernels recompute the scores:
  five products), the convention torch registers for flash attention.

Token counts follow the official codes: MAE keeps ``int(L (1 - r))`` patches (+ cls) in the encoder and runs the
decoder on all ``L + 1``; LoMaR runs ``num_windows`` windows of ``K² + 1`` tokens whatever the resolution; LocalMIM is
MAE's encoder with one small decoder per tap (+ its rescaling convolutions); ExtreMA runs ``num_masks`` students on
``int(L (1 - r))`` patches each (no cls in the sequence) and a forward-only teacher on all ``L`` patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.models.vit import arch_dims

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


def _conv_head_flops(scale: float, grid: int, dim: int, out: int) -> float:
    """LocalMIM's rescaling head (deconvolutions / pooling, then a 1x1 conv), forward + backward."""
    g2 = grid * grid
    if scale == 4.0:
        return (linear_flops(g2, dim, dim // 2 * 4) + linear_flops(4 * g2, dim // 2, dim // 4 * 4)
                + linear_flops(16 * g2, dim // 4, out))
    if scale == 2.0:
        return linear_flops(g2, dim, dim // 2 * 4) + linear_flops(4 * g2, dim // 2, out)
    if scale == 1.0:
        return linear_flops(g2, dim, out)
    return linear_flops(g2 / 4, dim, out)


def analytic_flops(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-image forward + backward FLOPs of one training step of the method of a resolved pretraining config,
    split into parts, with the token counts; None for a method the model does not cover."""
    method, model = cfg["method"], cfg["model"]
    if method["name"] not in ("mae", "localmim", "lomar", "extrema", "maskfeat"):
        return None
    try:
        dims = arch_dims(model)
    except ValueError:  # not a ViT (Swin): no analytic model yet
        return None
    d, depth, mlp = dims["embed_dim"], dims["depth"], dims["mlp_ratio"]
    p = model["patch_size"]
    img = cfg["data"]["img_size"]
    grid = img // p
    length = grid * grid
    pix = 3 * p * p
    name = method["name"]
    cls = 1 if model.get("class_token", True) else 0
    rel = 50 if model.get("rel_pos") == "irpe" else 0  # 7 x 7 product buckets + 1 for the cls row/column
    parts: dict[str, float] = {}
    tokens: dict[str, str] = {}
    if name in ("mae", "localmim"):
        keep = int(length * (1 - method["mask_ratio"]))
        n = keep + cls
        parts["patch_embed"] = linear_flops(length, pix, d, input_grad=False)
        parts["encoder"] = depth * block_flops(n, d, mlp, rel_buckets=rel)
        tokens["encoder"] = f"{n}"
        dd, ddepth = method["decoder_dim"], method["decoder_depth"]
        if name == "mae":
            parts["decoder"] = (linear_flops(n, d, dd) + ddepth * block_flops(length + 1, dd, 4.0)
                                + linear_flops(length + 1, dd, pix))
            tokens["decoder"] = f"{length + 1}"
        else:
            scales = list(method["scales"])
            out = 3 * method["hog_bins"] if method["target"] == "hog" else None
            dec = 0.0
            for s in scales:
                o = out if out is not None else pix // int(s * s) if s >= 1 else pix * 4
                dec += linear_flops(n, d, dd) + ddepth * block_flops(length + 1, dd, 4.0)
                dec += _conv_head_flops(float(s), grid, dd, o)
            parts["decoders"] = dec
            tokens["decoder"] = f"{len(scales)} x {length + 1}"
    elif name == "lomar":
        k, w = method["window_size"], method["num_windows"]
        t = k * k
        parts["patch_embed"] = linear_flops(w * t, pix, d, input_grad=False)
        if method.get("arch", "encoder") == "encoder":
            parts["encoder"] = depth * block_flops(t + 1, d, mlp, seqs=w, rel_buckets=rel)
            parts["head"] = linear_flops(w * t, d, pix)
            tokens["encoder"] = f"{w} x {t + 1}"
        else:
            keep = t - int(t * method["mask_ratio"])
            dd = method["decoder_dim"]
            parts["encoder"] = depth * block_flops(keep + 1, d, mlp, seqs=w, rel_buckets=rel)
            parts["decoder"] = w * (linear_flops(keep + 1, d, dd) + method["decoder_depth"] * block_flops(t + 1, dd)
                                    + linear_flops(t + 1, dd, pix))
            tokens["encoder"] = f"{w} x {keep + 1}"
            tokens["decoder"] = f"{w} x {t + 1}"
    elif name == "extrema":
        keep = int(length * (1 - method["mask_ratio"]))
        m = method["num_masks"]
        n = keep + cls
        parts["patch_embed"] = linear_flops(length, pix, d, input_grad=False)
        parts["student"] = depth * block_flops(n, d, mlp, seqs=m)
        head = 0.0
        teacher_head = 0.0
        if method["cls_design"] == "cait":
            head = method["ca_blocks"] * class_attention_flops(n, d, mlp)
            teacher_head = method["ca_blocks"] * class_attention_flops(length + cls, d, mlp, trained=False)
        ph, pd, qh = method["proj_hidden"], method["proj_dim"], method["pred_hidden"]
        proj = linear_flops(1, d, ph) + linear_flops(1, ph, ph) + linear_flops(1, ph, pd)
        pred = linear_flops(1, pd, qh) + linear_flops(1, qh, pd)
        parts["student_heads"] = m * (head + proj + pred)
        parts["teacher"] = (linear_flops(length, pix, d, trained=False)
                            + depth * block_flops(length + cls, d, mlp, trained=False) + teacher_head
                            + linear_flops(1, d, ph, False) + linear_flops(1, ph, ph, False)
                            + linear_flops(1, ph, pd, False))
        tokens["encoder"] = f"{m} x {n} (student) + {length + cls} (teacher, forward only)"
    elif name == "maskfeat":
        parts["patch_embed"] = linear_flops(length, pix, d, input_grad=False)
        parts["encoder"] = depth * block_flops(length + cls, d, mlp, rel_buckets=rel)
        tokens["encoder"] = f"{length + cls}"
    else:
        return None
    return {"total": sum(parts.values()), "parts": parts, "tokens": tokens}


def describe(a: Mapping[str, Any] | None) -> str:
    """One line: total GFLOPs and the tokens per sequence, for tables."""
    if not a:
        return "n/a"
    toks = "; ".join(f"{k} {v}" for k, v in a["tokens"].items())
    return f"{a['total'] / 1e9:.1f} G ({toks})"
