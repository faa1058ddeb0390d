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
from repro.models.export import to_repro

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
    try:  # official {'model': ...} (MAE/BEiT) or timm (encoder_timm.pth) keys -> ours
        state = to_repro(state, vit)
    except ValueError as e:
        raise ConfigError(f"{init}: {e}; pass an encoder.pth written by `repro pretrain`") from None
    state = resize_positions(vit, adapt_state_dict(vit, state))
    own = vit.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k in [k for k in bad if k.startswith(HEAD_KEYS)]:  # another task's classifier: the new head stays random
        bad.remove(k)
        del state[k]
    if bad:
        raise ConfigError(f"{init}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, this model needs "
                          f"{tuple(own[bad[0]].shape)} ({len(bad)} such keys); check model.arch / patch_size / "
                          "embed_dim")
    res = vit.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith(HEAD_KEYS)]
    if missing:
        raise ConfigError(f"{init} lacks encoder weights {missing[:4]}...; it was not written for this model "
                          "(check model.arch / patch_size / rel_pos)")
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def resize_positions(vit: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position tables of ``state`` fitted to ``vit``'s grid, for an evaluation at another resolution than the
    pretraining's (LoMaR 384-FT): the absolute table by timm's ``resample_abs_pos_embed`` (bicubic over the patch
    grid, prefix tokens kept), relative-bias tables (``rel_pos: bias``) by timm's ``resize_rel_pos_bias_table``
    (the 3 prefix entries kept). A Swin's tables were already resized by ``adapt_state_dict``."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    out = dict(state)
    own = vit.state_dict()
    pos = out.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 0))
        old = round((pos.shape[1] - prefix) ** 0.5)
        if old * old + prefix != pos.shape[1] or pos.shape[-1] != own["pos_embed"].shape[-1]:
            raise ConfigError(f"position table {tuple(pos.shape)} does not fit {tuple(own['pos_embed'].shape)} "
                              "(not a square grid of the same width); check model.arch / patch_size")
        out["pos_embed"] = resample_abs_pos_embed(pos, list(vit.patch_embed.grid_size), [old, old],
                                                  num_prefix_tokens=prefix)
    for key, table in state.items():
        if key.endswith("attn.rel_table") and key in own and table.shape != own[key].shape:
            grid = vit.patch_embed.grid_size
            out[key] = resize_rel_pos_bias_table(table, tuple(grid), tuple(own[key].shape))
    return out


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
