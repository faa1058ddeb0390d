"""ExtreMA's knobs, checks, tiny rule and cost model (the module is ``repro.methods.extrema``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repro.config import ConfigError
from repro.methods.registry import MethodSpec, check_ratio, register
from repro.models.cost import block_flops, class_attention_flops, linear_flops, vit_geometry

CLS_DESIGNS = ("cait", "vit_cls", "avgpool")
LOSSES = ("byol", "infonce")
AUGS = ("none", "color", "color_2views", "crop", "crop_2views", "crop_color_1view", "crop_color_2views",
        "shared_crop_2colors")
BRANCHES = ("student", "teacher")


@register
class ExtreMASpec(MethodSpec):
    name = "extrema"
    impl_path = "repro.methods.extrema:ExtreMA"
    results_version = 2  # 2: issue 10 fidelity fixes
    defaults = {
        "name": "extrema",
        "mask_ratio": 0.8,
        "num_masks": 5,
        "disjoint": True,            # masks of one image share no visible token
        "cls_design": "cait",        # cait | vit_cls (needs model.class_token: true) | avgpool
        "ca_blocks": 2,              # class-attention blocks (cait)
        "ca_layer_scale": 0.1,       # their LayerScale init
        "proj_hidden": 4096,
        "proj_dim": 256,
        "pred_hidden": 4096,
        "ema_base": 0.996,           # teacher momentum at t = 0, cosine to 1
        "loss": "byol",              # byol | infonce
        "temperature": 0.2,          # infonce only
        "aug": "shared_crop_2colors",
        "export_branch": "student",  # which encoder + instance head export()/extras() give the evaluations
    }
    linear_feature = "instance"
    finetune_pool = "avg"

    @classmethod
    def validate(cls, params: Mapping[str, Any]) -> None:
        check_ratio("mask_ratio", params["mask_ratio"])
        for key, valid in (("cls_design", CLS_DESIGNS), ("loss", LOSSES), ("aug", AUGS),
                           ("export_branch", BRANCHES)):
            if params[key] not in valid:
                raise ConfigError(f"method.{key}={params[key]!r} is unknown; valid: {', '.join(valid)}")
        if params["num_masks"] < 1 or params["ca_blocks"] < 1:
            raise ConfigError("method.num_masks and method.ca_blocks must be >= 1")
        if not 0.0 <= params["ema_base"] <= 1.0:
            raise ConfigError(f"method.ema_base={params['ema_base']} is outside [0, 1]")
        if params["temperature"] <= 0:
            raise ConfigError("method.temperature must be positive")

    @classmethod
    def tiny(cls, params: dict[str, Any], rule: Any) -> dict[str, Any]:
        out = dict(params)
        for k in ("proj_hidden", "proj_dim", "pred_hidden"):
            out[k] = rule.dim(params[k])
        return out

    @classmethod
    def flops(cls, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        """``num_masks`` students on ``int(L (1 - r))`` patches each (+ heads), a forward-only teacher on all L."""
        g = vit_geometry(cfg)
        if g is None:
            return None
        method = cfg["method"]
        d, mlp, length = g.dim, g.mlp, g.length
        m = method["num_masks"]
        n = int(length * (1 - method["mask_ratio"])) + g.cls
        parts = {"patch_embed": linear_flops(length, g.pix, d, input_grad=False),
                 "student": g.depth * block_flops(n, d, mlp, seqs=m)}
        head = 0.0
        teacher_head = 0.0
        if method["cls_design"] == "cait":
            head = method["ca_blocks"] * class_attention_flops(n, d, mlp)
            teacher_head = method["ca_blocks"] * class_attention_flops(length + g.cls, d, mlp, trained=False)
        ph, pd, qh = method["proj_hidden"], method["proj_dim"], method["pred_hidden"]
        proj = linear_flops(1, d, ph) + linear_flops(1, ph, ph) + linear_flops(1, ph, pd)
        pred = linear_flops(1, pd, qh) + linear_flops(1, qh, pd)
        parts["student_heads"] = m * (head + proj + pred)
        parts["teacher"] = (linear_flops(length, g.pix, d, trained=False)
                            + g.depth * block_flops(length + g.cls, d, mlp, trained=False) + teacher_head
                            + linear_flops(1, d, ph, False) + linear_flops(1, ph, ph, False)
                            + linear_flops(1, ph, pd, False))
        tokens = {"encoder": f"{m} x {n} (student) + {length + g.cls} (teacher, forward only)"}
        return {"parts": parts, "tokens": tokens}
