"""ExtreMA's instance head: encoder tokens -> one instance vector, by CaiT class attention, mean pooling or the cls
token. The pretraining method trains it; linear probing and kNN rebuild it from the saved extras
(``load_instance_head``)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.models.cait import LayerScaleBlockClassAttn
from torch import nn

from repro.config import ConfigError
from repro.models.archs import arch_dims

_ln6 = partial(nn.LayerNorm, eps=1e-6)


class InstanceHead(nn.Module):
    """Encoder tokens (B, N, D) -> instance vector (B, D).

    ``cait``: ``depth`` class-attention blocks update a learned cls query from [cls, tokens], then LayerNorm.
    ``avgpool``: LayerNorm of every token, then the mean. ``vit_cls``: the (already normed) token 0."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, depth: int, design: str,
                 layer_scale: float = 0.1) -> None:
        super().__init__()
        self.design = design
        if design == "cait":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.blocks = nn.ModuleList([
                LayerScaleBlockClassAttn(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_ln6,
                                         init_values=layer_scale) for _ in range(depth)])
        if design in ("cait", "avgpool"):
            self.norm = _ln6(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.design == "vit_cls":
            return tokens[:, 0]
        if self.design == "avgpool":
            return self.norm(tokens).mean(dim=1)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        for blk in self.blocks:
            cls = blk(tokens, cls)
        return self.norm(cls)[:, 0]


def infer_design(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(design, class-attention depth) of a saved head's state dict."""
    if "cls_token" in state:
        return "cait", len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return ("avgpool", 0) if "norm.weight" in state else ("vit_cls", 0)


def load_instance_head(model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> InstanceHead:
    """The head of a saved state dict for the ViT of ``model_cfg`` (its design and depth read from the keys)."""
    design, depth = infer_design(state)
    dims = arch_dims(model_cfg)
    if (design == "vit_cls") != bool(model_cfg.get("class_token", True)):
        raise ConfigError(f"the ExtreMA instance head ({design}) does not match model.class_token="
                          f"{model_cfg.get('class_token', True)}")
    head = InstanceHead(dims["embed_dim"], dims["num_heads"], dims["mlp_ratio"], max(depth, 1), design)
    head.load_state_dict(state, strict=True)
    return head
