"""Analytic cost model: tokens through the encoder, decoders and heads of each method -> FLOPs of one training step.

Printed beside the measured step time, it tells whether a gap between two methods is compute (FLOPs differ) or
overhead (FLOPs equal, time differs: memory traffic, kernel launches, Python). The conventions are those of
``repro.profile.flops`` (FlopCounterMode), so the model can be checked against the counter exactly. The shared
formulas are in ``repro.models.cost``; each method's parts come from ``flops()`` of its spec
(``repro/methods/specs/``).

Token counts follow the official codes: MAE keeps ``int(L (1 - r))`` patches (+ cls) in the encoder and runs the
decoder on all ``L + 1``; LoMaR runs ``num_windows`` windows of ``K² + 1`` tokens whatever the resolution; LocalMIM is
MAE's encoder with one small decoder per tap (+ its rescaling convolutions); ExtreMA runs ``num_masks`` students on
``int(L (1 - r))`` patches each (no cls in the sequence) and a forward-only teacher on all ``L`` patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.models.cost import block_flops, class_attention_flops, linear_flops, vit_geometry


def eval_flops(cfg: Mapping[str, Any], head: Mapping[str, Any] | None = None) -> float | None:
    """Per-image FLOPs of the step ``repro profile`` times for an evaluation config of a ViT (None for a Swin, or an
    instance head of unknown design): fine-tuning, forward + backward of the encoder (all L patches + cls) and its
    classifier; linear probing, the frozen encoder's forward, the instance head's forward (``head``: design and
    depth, ``repro.profile.projection.instance_head``) and the trained linear head (no input gradient); kNN, the
    forward only."""
    g = vit_geometry(cfg)
    kind = cfg.get("kind")
    if g is None or kind not in ("finetune", "semisup", "linear", "knn"):
        return None
    n = g.length + g.cls
    trained = kind in ("finetune", "semisup")
    f = (linear_flops(g.length, g.pix, g.dim, trained, input_grad=False)
         + g.depth * block_flops(n, g.dim, g.mlp, trained=trained, rel_buckets=g.rel))
    if head is not None:
        if head.get("design") is None:
            return None
        if head["design"] == "cait":
            f += int(head["depth"]) * class_attention_flops(n, g.dim, g.mlp, trained=False)
    classes = int(cfg["data"].get("num_classes") or 0)
    if trained:
        f += linear_flops(1, g.dim, classes)
    elif kind == "linear":
        f += linear_flops(1, g.dim, classes, input_grad=False)
    return f


def analytic_flops(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-image forward + backward FLOPs of one training step of the method of a resolved pretraining config,
    split into parts, with the token counts; None for a method the model does not cover. Each method's spec gives
    its parts (``MethodSpec.flops``)."""
    from repro.methods.registry import METHODS

    spec = METHODS.get(cfg["method"]["name"])
    out = spec.flops(cfg) if spec is not None else None
    if out is None:
        return None
    parts, tokens = out["parts"], out["tokens"]
    return {"total": sum(parts.values()), "parts": parts, "tokens": tokens}


def describe(a: Mapping[str, Any] | None) -> str:
    """One line: total GFLOPs and the tokens per sequence, for tables."""
    if not a:
        return "n/a"
    toks = "; ".join(f"{k} {v}" for k, v in a["tokens"].items())
    return f"{a['total'] / 1e9:.1f} G ({toks})"
