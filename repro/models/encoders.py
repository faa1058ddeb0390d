"""The one encoder factory of the evaluations: a timm ViT (``repro.models.vit``) or a timm Swin
(``repro.models.swin``, archs named ``swin_*``), with their output tokens in one shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from repro.models.swin import create_swin, is_swin
from repro.models.vit import create_vit


def create_encoder(model_cfg: Mapping[str, Any], img_size: int, num_classes: int = 0,
                   global_pool: str | None = None) -> nn.Module:
    """ViT or Swin by ``model.arch``. A Swin always pools by averaging its last stage (it has no cls token)."""
    if is_swin(model_cfg["arch"]):
        return create_swin(model_cfg, img_size, num_classes=num_classes, global_pool="avg")
    return create_vit(model_cfg, img_size, num_classes=num_classes, global_pool=global_pool)


def is_swin_model(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def encoder_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tokens (B, N, C) after the final norm, number of prefix (cls) tokens before the patch tokens)."""
    tokens = model.forward_features(x)
    if is_swin_model(model):
        return tokens.flatten(1, 2), 0  # (B, H, W, C) -> (B, H*W, C)
    return tokens, int(getattr(model, "num_prefix_tokens", 0))


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Swin checkpoint through timm's own filter: relative position tables resized when the window differs
    (e.g. SimMIM's 192-px / window 6 pretraining fine-tuned at 224 / window 7), non-persistent buffers dropped."""
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

    if isinstance(model, SwinTransformer):
        return checkpoint_filter_fn(dict(state), model)
    return dict(state)
