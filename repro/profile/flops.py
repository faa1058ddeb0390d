"""FLOPs of one training step (forward + backward), counted with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts matrix products and convolutions (a multiply-add = 2 FLOPs) but, in torch 2.14, has no
formula for the CPU fused-attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (nor its backward):
on the CPU every SDPA call would count as zero and a ViT-B/16 forward comes out 4% low (ENVIRONMENT.md).
``register_attention_formulas`` (called by ``count_step_flops`` before it counts, not at import) registers the same
formulas torch uses for the CUDA flash kernel (forward: QK^T + AV; backward: the scores are recomputed, five
products), so attention is counted identically on the CPU and on a GPU. fvcore-style counts (one
multiply-add = 1 FLOP, attention skipped) are NOT what is reported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter as fc

_aten = torch.ops.aten


def register_attention_formulas() -> list[str]:
    """Register the fused-attention formulas FlopCounterMode lacks; returns the names registered (idempotent)."""
    done = []
    fwd_ops = [getattr(_aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                                  "_scaled_dot_product_fused_attention_overrideable")]
    bwd_ops = [getattr(_aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu_backward",
                                                  "_scaled_dot_product_fused_attention_overrideable_backward")]
    fwd = [op for op in fwd_ops if op is not None and op not in fc.flop_registry]
    bwd = [op for op in bwd_ops if op is not None and op not in fc.flop_registry]
    if fwd:
        @fc.register_flop_formula(fwd)
        def _sdpa_fwd(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                      **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        done += [str(op) for op in fwd]
    if bwd:
        @fc.register_flop_formula(bwd)
        def _sdpa_bwd(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                      out_shape: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
        done += [str(op) for op in bwd]
    return done


def count_loss_flops(loss_fn: Callable[[], torch.Tensor]) -> dict[str, int]:
    """FLOPs of ``loss_fn()`` (a training loss, e.g. a framework model's on a synthetic batch) forward and backward:
    ``{"forward", "backward", "total"}``. Gradients are left on the parameters."""
    register_attention_formulas()
    with fc.FlopCounterMode(display=False) as fwd_mode:
        loss = loss_fn()
    with fc.FlopCounterMode(display=False) as bwd_mode:
        loss.backward()
    f, b = fwd_mode.get_total_flops(), bwd_mode.get_total_flops()
    return {"forward": int(f), "backward": int(b), "total": int(f + b)}


def count_step_flops(task: torch.nn.Module, batch: Any, generator: torch.Generator) -> dict[str, int]:
    """FLOPs of ``task(batch, generator).loss`` forward and backward (no optimizer step: it is element-wise).

    Returns ``{"forward": ..., "backward": ..., "total": ...}`` for the whole batch. Gradients are left on the
    parameters; callers that go on training must zero them.
    """
    return count_loss_flops(lambda: task(batch, generator).loss)


def batch_size_of(batch: Any) -> int:
    """Images in a batch as the methods receive it: ``(images, labels)`` or ``((view1, view2), labels)``."""
    x = batch[0]
    while isinstance(x, (list, tuple)):
        x = x[0]
    return int(x.shape[0])


def flops_per_image(task: torch.nn.Module, batch: Any, generator: torch.Generator) -> dict[str, float]:
    """Per-image forward / backward / total FLOPs of one training step on ``batch``; restores the gradients."""
    n = batch_size_of(batch)
    saved = {p: p.grad for p in task.parameters()}
    for p in saved:
        p.grad = None
    try:
        counts = count_step_flops(task, batch, generator)
    finally:
        for p, g in saved.items():
            p.grad = g
    return {k: v / n for k, v in counts.items()}
