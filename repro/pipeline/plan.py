"""Plans: recipes expanded into stages. ``chain`` = pretrain -> {fine-tune, linear, kNN} (+ a random-init baseline
with the same evaluation budget)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from repro.methods import get_method
from repro.pipeline.stage import Stage
from repro.resolve import resolve

# What an evaluation inherits from the pretraining it evaluates.
INHERITED = {
    "data": ("dataset", "path", "img_size", "num_classes", "synthetic_train", "synthetic_val", "synthetic_classes"),
    "model": ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "rel_pos", "layer_scale",
              "class_token"),
}


def eval_overrides(pre: Mapping[str, Any], kind: str) -> dict[str, Any]:
    ov: dict[str, Any] = {sec: {k: pre[sec][k] for k in keys} for sec, keys in INHERITED.items()}
    ov["seed"] = pre["seed"]
    method = get_method(pre["method"]["name"])
    if kind == "finetune":
        ov["model"]["global_pool"] = method.finetune_pool
    elif kind in ("linear", "knn"):
        ov["feature"] = method.linear_feature
    return ov


def eval_stages(pre: Stage, evals: Mapping[str, str], scale: str, baseline: bool = False) -> list[Stage]:
    out = []
    label = pre.label
    for kind, recipe in evals.items():
        cfg = resolve(recipe, scale, eval_overrides(pre.cfg, kind), kind=kind)
        out.append(Stage(kind, cfg, {"init": pre}, label=label))
        if baseline:
            out.append(Stage(kind, cfg, {}, label=f"{label} (random init)"))
    return out


def chain(recipe: str, scale: str = "tiny", overrides: Iterable[str] = (), baseline: bool = False,
          evals: Iterable[str] | None = None) -> list[Stage]:
    pre_cfg = resolve(recipe, scale, overrides, kind="pretrain")
    wanted = dict(pre_cfg.get("evals") or {})
    if evals is not None:
        wanted = {k: v for k, v in wanted.items() if k in set(evals)}
    label = f"{pre_cfg['method']['name']} {pre_cfg['model']['arch']}/{pre_cfg['model']['patch_size']}"
    pre = Stage("pretrain", pre_cfg, label=label)
    return [pre, *eval_stages(pre, wanted, scale, baseline)]
