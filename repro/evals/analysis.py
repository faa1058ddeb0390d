"""The ``analysis`` stage: per-layer attention statistics of a pretrained ViT and per-layer gradient norms recorded
during its pretraining (LocalMIM, Figs. 3, 5 and 6).

The official LocalMIM code (huawei-noah/Efficient-Computing, Self-supervised/LocalMIM) ships no analysis script, so
the paper's definitions are followed (Sec. 3.2, App. A.2, A.3), with NMI as Strehl & Ghosh (the paper's ref. [49]):

- **NMI** between query and key patches (Fig. 3). One head's attention map ``A`` (rows: queries, each a distribution
  over keys) is read as the joint distribution ``p(q, k) = A[q, k] / N`` with a uniform query marginal ``p(q) = 1/N``
  and key marginal ``p(k) = mean_q A[q, k]``; ``NMI = I(Q; K) / sqrt(H(Q) H(K))``. It is 0 when every query attends
  the same way (the map does not depend on the query) and 1 when each query attends to a key of its own (e.g. the
  identity map). Averaged over heads and images, one value per encoder block.
- **KL** between the attention distributions of pairs of query patches (Fig. 6): ``KL(A[i] || A[j])`` averaged over
  all ordered pairs ``i != j`` of queries, then over heads and images. A zero attention weight in the second
  argument is clamped to ``kl_eps`` (softmax weights are never exactly zero; hand-made maps may be).
- **Gradient norm** of each encoder block (Fig. 5): the paper loads the checkpoint of the median epoch of a full
  schedule and computes the L2 norm of each layer's parameter gradient under that state. Here the engine records,
  when the pretraining runs with ``train.grad_norms: true``, the per-block L2 norm of the (unscaled, accumulated,
  pre-clipping) gradient of the last optimizer step of every epoch (``repro.engine.hooks.block_grad_norms``); this
  stage reports the record of the median epoch ``ceil(epochs / 2)`` from the pretraining stage's ``result.json``.

Attention is recomputed explicitly from each block's ``qkv`` projection (the model itself runs timm's fused SDPA,
which never materialises the map), including the relative-position term of ``rel_pos`` encoders. By default only
patch tokens count as queries and keys (``tokens: patches``; the cls column is dropped and rows renormalised), as
"query and key patches" in the paper; ``tokens: all`` keeps the prefix tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro.config import ConfigError

METRICS = ("nmi", "kl", "grad_norm")
TOKENS = ("patches", "all")


# ---- the statistics, on attention maps (..., N_query, N_key) whose rows sum to 1 ------------------------------------

def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """NMI between query and key position of attention maps ``(..., N, K)`` -> ``(...)``: ``I(Q;K) /
    sqrt(H(Q) H(K))`` with ``p(q, k) = attn[q, k] / N`` (uniform queries). 0 where ``H(K) = 0`` (all queries on
    one key: no information either way)."""
    a = attn.double()
    n = a.shape[-2]
    pk = a.mean(dim=-2)  # (..., K): key marginal
    # I = sum_{q,k} p(q,k) log(p(q,k) / (p(q) p(k))) = (1/N) sum_{q,k} A log(A / p(k))
    mi = (torch.xlogy(a, a) - torch.xlogy(a, pk.unsqueeze(-2))).sum(dim=(-2, -1)) / n
    hk = -torch.xlogy(pk, pk).sum(dim=-1)
    denom = torch.sqrt(math.log(n) * hk)
    return torch.where(denom > 0, mi / denom.clamp_min(1e-300), torch.zeros_like(mi))


def attention_pair_kl(attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean of ``KL(attn[i] || attn[j])`` over ordered query pairs ``i != j`` of maps ``(..., N, K)`` -> ``(...)``.

    Uses ``sum_{i,j} KL(A_i||A_j) = N sum_i sum_k A_ik log A_ik - sum_k (sum_i A_ik)(sum_j log A_jk)`` (the i = j terms
    are zero), so the cost is O(N K) instead of O(N^2 K)."""
    a = attn.double()
    n = a.shape[-2]
    if n < 2:
        raise ValueError("pairwise KL needs at least two queries")
    neg_entropy = torch.xlogy(a, a).sum(dim=(-2, -1))  # sum_i sum_k A_ik log A_ik
    cross = (a.sum(dim=-2) * a.clamp_min(eps).log().sum(dim=-2)).sum(dim=-1)
    return (n * neg_entropy - cross) / (n * (n - 1))


# ---- attention maps of a timm ViT ------------------------------------------------------------------------------------

def attention_map(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax attention ``(B, H, N, N)`` that ``attn_mod`` (a timm ``Attention`` or a ``RelPosAttention``)
    applies to its input ``x`` (B, N, C), recomputed from its ``qkv`` projection."""
    from repro.models.relpos import RelPosAttention

    b, n, _ = x.shape
    h, hd = attn_mod.num_heads, attn_mod.head_dim
    qkv = attn_mod.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    logits = (q * attn_mod.scale) @ k.transpose(-2, -1)
    if isinstance(attn_mod, RelPosAttention):
        logits = logits + attn_mod.position_term(q, n).to(logits.dtype)
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def layer_attention_stats(vit: nn.Module, images: torch.Tensor, tokens: str = "patches", kl_eps: float = 1e-12,
                          ) -> dict[str, torch.Tensor]:
    """Per-block sums over the images of the head-averaged NMI and pairwise KL: ``{"nmi": (depth,), "kl":
    (depth,)}`` (divide by the number of images for means)."""
    if tokens not in TOKENS:
        raise ConfigError(f"bad value for 'tokens': {tokens!r}; valid: {', '.join(TOKENS)}")
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise ConfigError("the analysis stage needs a ViT encoder (a Swin has windowed attention); use a vit_* arch")
    prefix = int(getattr(vit, "num_prefix_tokens", 0)) if tokens == "patches" else 0
    nmi = torch.zeros(len(blocks), dtype=torch.float64)
    kl = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i: int) -> Any:
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            a = attention_map(mod, args[0])
            if prefix:
                a = a[..., prefix:, prefix:]
                a = a / a.sum(dim=-1, keepdim=True)
            nmi[i] += attention_nmi(a).mean(dim=1).sum().cpu()  # mean over heads, sum over images
            kl[i] += attention_pair_kl(a, kl_eps).mean(dim=1).sum().cpu()
        return fn

    handles = [blk.attn.register_forward_hook(hook(i)) for i, blk in enumerate(blocks)]
    try:
        vit.forward_features(images)
    finally:
        for hd in handles:
            hd.remove()
    return {"nmi": nmi, "kl": kl}


# ---- gradient norms recorded by the engine ---------------------------------------------------------------------------

def median_epoch(epochs: int) -> int:
    """The median epoch of a schedule of ``epochs`` epochs (1-based): ``ceil(epochs / 2)``, e.g. 50 of 100."""
    return max(1, (int(epochs) + 1) // 2)


def grad_norms_at_median(result: Mapping[str, Any]) -> tuple[int, list[float]] | None:
    """``(epoch, per-block norms)`` at the median epoch of a pretraining stage's result, or None when it recorded
    none (``train.grad_norms`` off)."""
    history = result.get("accounting", {}).get("history") or []
    if not any("grad_norms" in r for r in history):
        return None
    epochs = result.get("config", {}).get("optim", {}).get("epochs") or len(history)
    want = median_epoch(epochs)
    for rec in history:
        if rec.get("epoch") == want and "grad_norms" in rec:
            return want, [float(v) for v in rec["grad_norms"]]
    raise ConfigError(f"the pretraining result has no grad_norms record for its median epoch {want}; rerun it "
                      "to completion with train.grad_norms=true")


# ---- the stage -------------------------------------------------------------------------------------------------------

def _even_subset(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (the val split is sorted by class)."""
    n = min(n, n_total)
    if n <= 0:
        return []
    return sorted({int(round(i * (n_total - 1) / max(1, n - 1))) for i in range(n)})


def _check(cfg: Mapping[str, Any]) -> list[str]:
    metrics = list(cfg["metrics"])
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"bad value for 'metrics': {metrics!r}; choose from {', '.join(METRICS)}")
    if cfg["tokens"] not in TOKENS:
        raise ConfigError(f"bad value for 'tokens': {cfg['tokens']!r}; valid: {', '.join(TOKENS)}")
    if int(cfg["num_images"]) <= 0 or int(cfg["batch_size"]) <= 0:
        raise ConfigError("num_images and batch_size must be positive")
    return metrics


def run_analysis(cfg: Mapping[str, Any], out_dir: object) -> dict[str, Any]:
    """Analysis stage: per-layer NMI and pairwise KL of the attention of ``cfg['init']`` on ``num_images`` val
    images, and the pretraining's per-block gradient norms at its median epoch (``cfg['init_result']``)."""
    from torch.utils.data import DataLoader, Subset

    from repro.data.datasets import build_split, eval_transform
    from repro.engine.dist import setup
    from repro.engine.hooks import peak_memory_mb
    from repro.evals.features import eval_encoder

    metrics_wanted = _check(cfg)
    env = setup()
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    acct: dict[str, Any] = {"device": env.device.type, "world_size": 1, "completed": True, "images": 0, "notes": []}
    if {"nmi", "kl"} & set(metrics_wanted):
        if str(cfg["model"]["arch"]).startswith("swin_"):
            raise ConfigError("the attention analysis needs a ViT encoder (a Swin has windowed attention); "
                              "drop nmi/kl from metrics or use a vit_* arch")
        vit = eval_encoder(cfg, cfg.get("init")).to(env.device).eval()
        val = build_split(cfg["data"], "val", eval_transform(cfg["data"], cfg["aug"].get("eval_crop_pct", 0.875)))
        subset = Subset(val, _even_subset(len(val), int(cfg["num_images"])))
        sums = {"nmi": torch.zeros(len(vit.blocks), dtype=torch.float64),
                "kl": torch.zeros(len(vit.blocks), dtype=torch.float64)}
        for x, _ in DataLoader(subset, batch_size=int(cfg["batch_size"]), shuffle=False):
            s = layer_attention_stats(vit, x.to(env.device), cfg["tokens"], float(cfg["kl_eps"]))
            for k in sums:
                sums[k] += s[k]
        n = len(subset)
        acct["images"] = n
        for k in ("nmi", "kl"):
            if k in metrics_wanted:
                metrics[k] = (sums[k] / n).tolist()
    if "grad_norm" in metrics_wanted:
        res_path = cfg.get("init_result")
        found = grad_norms_at_median(json.loads(Path(res_path).read_text())) if res_path else None
        if found is None:
            if metrics_wanted == ["grad_norm"]:
                raise ConfigError("grad_norm needs a pretraining stage run with train.grad_norms=true as input")
            acct["notes"].append("grad_norm: the input pretraining recorded no gradient norms (train.grad_norms "
                                 "was false or there is no pretraining input)")
        else:
            metrics["grad_norm_epoch"] = float(found[0])
            metrics["grad_norm"] = found[1]
    wall = time.perf_counter() - t0
    acct.update({"wall_s": wall, "images_per_s": acct["images"] / wall if wall > 0 else float("nan"),
                 "peak_memory_mb": peak_memory_mb(env.device)})
    return {"metrics": metrics, "accounting": acct, "artifacts": {}}

