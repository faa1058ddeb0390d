"""Encoders for evaluation: build the ViT or Swin an evaluation needs (``repro.models.encoders``), load a pretrained
encoder into it, pick features (a Swin: the average of its last stage after the final norm)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from repro.config import ConfigError
from repro.io import load_checkpoint
from repro.models.encoders import adapt_state_dict, create_encoder, encoder_tokens, is_swin_model

# Keys an encoder checkpoint may legitimately lack in an evaluation model: its new classifier (and fc_norm).
HEAD_KEYS = ("head.", "fc_norm.")


def load_encoder(vit: nn.Module, init: str | None) -> dict[str, list[str]]:
    """Load an encoder state dict (``init`` path) into ``vit``; ``random``/None keeps the random initialisation.

    Any encoder key missing from the checkpoint is an error (a silent partial load would fake a result).
    """
    if init in (None, "", "random"):
        return {"missing": [], "unexpected": []}
    state = load_checkpoint(init)
    if isinstance(state, Mapping) and "encoder" in state:
        state = state["encoder"]
    state = adapt_state_dict(vit, state)
    own = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        raise ConfigError(f"{init}: position table {tuple(state['pos_embed'].shape)} does not fit "
                          f"{tuple(own['pos_embed'].shape)}; evaluate at the pretraining resolution")
    res = vit.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith(HEAD_KEYS)]
    if missing:
        raise ConfigError(f"{init} lacks encoder weights {missing[:4]}...; it was not written for this model "
                          "(check model.arch / patch_size / rel_pos)")
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def eval_encoder(cfg: Mapping[str, Any], init: str | None, num_classes: int = 0,
                 global_pool: str | None = None) -> nn.Module:
    vit = create_encoder(cfg["model"], cfg["data"]["img_size"], num_classes=num_classes, global_pool=global_pool)
    load_encoder(vit, init)
    return vit


def instance_head(cfg: Mapping[str, Any], init: str | None) -> torch.nn.Module | None:
    """The pretraining method's own instance head (``feature: instance``), built from the extras.pth and
    encoder.json written beside the encoder; None for other features."""
    if feature_kind(cfg) != "instance":
        return None
    if init in (None, "", "random"):
        raise ConfigError("feature=instance needs a pretrained encoder (--init PATH) whose method has an instance head")
    import json
    from pathlib import Path

    from repro.methods import get_method

    folder = Path(init).parent
    meta = json.loads((folder / "encoder.json").read_text())
    extras_path = folder / "extras.pth"
    extras = load_checkpoint(extras_path) if extras_path.is_file() else {}
    head = get_method(meta["method"]).instance_head(cfg, extras)
    if head is None:
        raise ConfigError(f"method {meta['method']} has no instance head; use feature=cls or feature=avg")
    return head


def features(vit: nn.Module, x: torch.Tensor, kind: str, head: torch.nn.Module | None = None,
             ) -> torch.Tensor:
    """``cls``: the class token after the final norm; ``avg``: mean of the normed patch tokens; ``instance``: the
    method's own head on the normed tokens."""
    tokens, prefix = encoder_tokens(vit, x)
    if kind == "cls":
        if tokens.ndim == 3 and is_swin_model(vit):
            raise ConfigError("feature=cls needs a class token; a Swin has none (use feature=avg)")
        return tokens[:, 0]
    if kind == "avg":
        return tokens[:, prefix:].mean(dim=1)
    if kind == "instance" and head is not None:
        return head(tokens)
    raise ConfigError(f"feature '{kind}' needs the method's own head; valid here: cls, avg")


def feature_kind(cfg: Mapping[str, Any], default: str = "cls") -> str:
    kind = cfg.get("feature", "auto")
    return default if kind == "auto" else kind
