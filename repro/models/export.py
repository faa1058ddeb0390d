"""Checkpoints that travel: our exported encoder in timm's layout (strict), and the official ``{'model': ...}`` layout.

- ``timm_card(meta)``: the timm model name and kwargs that build exactly the exported encoder (``meta`` is the
  ``encoder.json`` beside it: ``model`` section and ``img_size``). Plain ViTs -> timm ``vit_*``; relative-position-bias
  ViTs (BEiT, SimMIM ViT) -> timm ``beit_*``; LoMaR's iRPE ViTs -> ``repro_vit_irpe_*``, registered by importing
  ``repro.models.timm_irpe`` (the card's ``import``); Swins -> timm ``swin_*``.
- ``to_timm(state, meta)``: the state dict that ``timm.create_model(**card)`` loads with ``strict=True``. BEiT: our
  ``attn.rel_table`` is timm's ``attn.relative_position_bias_table`` (same layout: offset (dr, dc) at
  ``(dr + g - 1) * (2g - 1) + dc + g - 1``, then cls->token, token->cls, cls->cls), ``qkv.bias`` splits into
  ``q_bias`` / ``v_bias`` (timm's BEiT has no key bias: a key bias adds the same q.b to every logit of a query row,
  which the softmax cancels), ``ls1/ls2.gamma`` are ``gamma_1/gamma_2``. An all-zero ``pos_embed`` (written for
  position-free encoders) is dropped; an ``fc_norm`` the timm model has (average pooling) is added as identity.
- ``to_repro(state, model)``: the inverse, also for official MAE / BEiT checkpoints (``{'model': state_dict}``; MAE's
  keys are timm's, BEiT's are timm's BEiT keys with a shared ``rel_pos_bias`` table in pretraining checkpoints);
  pretraining-only parts (MAE decoder, mask token, BEiT's ``lm_head``) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro.io import atomic_json_and_tensors, atomic_torch_save
from repro.models.archs import arch_dims, is_swin

TIMM_FILE = "encoder_timm.pth"
CARD_FILE = "timm.json"
IRPE_MODULE = "repro.models.timm_irpe"
# Keys of official pretraining checkpoints that are not part of the encoder.
PRETRAIN_ONLY = re.compile(r"^(decoder_|mask_token$|lm_head\.|rel_pos_bias\.relative_position_index$)|"
                           r"\.relative_position_index$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Our BEiT-style block keys -> timm's BEiT (qkv.bias is split separately).
_TO_BEIT = {"attn.rel_table": "attn.relative_position_bias_table", "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}


def _model(meta: Mapping[str, Any]) -> tuple[Mapping[str, Any], int]:
    if "model" not in meta or "img_size" not in meta:
        raise ValueError("encoder metadata needs 'model' and 'img_size' (the encoder.json beside encoder.pth)")
    return meta["model"], int(meta["img_size"])


def timm_card(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``{"timm_name", "kwargs", "import"}``: ``import`` (a module to import first, or None) registers the name."""
    from repro.models import swin, vit

    m, img = _model(meta)
    if is_swin(m["arch"]):
        kw = swin.timm_kwargs(m, img)
        kw.pop("drop_path_rate")
        return {"timm_name": swin.timm_name(m["arch"]), "kwargs": _plain(kw), "import": None}
    kw = vit.timm_kwargs(m, img)
    kw.pop("drop_path_rate")
    name = vit.timm_name(m["arch"], m["patch_size"])
    rel = m.get("rel_pos", "none")
    if rel == "none":
        return {"timm_name": name, "kwargs": _plain(kw), "import": None}
    if rel == "irpe":
        from repro.models.timm_irpe import irpe_timm_name

        return {"timm_name": irpe_timm_name(name), "kwargs": _plain(kw), "import": IRPE_MODULE}
    if rel == "bias":
        if not kw["class_token"]:
            raise ValueError("timm's BEiT always has a class token; a rel_pos=bias encoder without one has no card")
        beit = {k: kw[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                   "num_classes", "global_pool", "init_values")}
        beit.update(use_abs_pos_emb=kw["pos_embed"] != "none", use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                    qkv_bias=True)
        size = "large" if m["arch"] in ("vit_large", "vit_huge") else "base"
        return {"timm_name": f"beit_{size}_patch16_224", "kwargs": _plain(beit), "import": None}
    raise ValueError(f"no timm card for model.rel_pos '{rel}'")


def _plain(kw: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready kwargs (tuples as lists), so the card reads back the same from timm.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def create_timm(card: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(card["timm_name"], **card["kwargs"])`` after importing the card's module."""
    import importlib

    import timm

    if card.get("import"):
        importlib.import_module(card["import"])
    return timm.create_model(card["timm_name"], pretrained=False, **card["kwargs"])


def to_timm(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our exported encoder ``state`` as the state dict of ``create_timm(timm_card(meta))`` (loads strictly)."""
    m, _ = _model(meta)
    card = timm_card(meta)
    out = dict(state)
    if is_swin(m["arch"]):
        return out
    if m.get("pos_embed") == "none":
        pos = out.pop("pos_embed", None)
        if pos is not None and bool(pos.abs().max() > 0):
            raise ValueError("model.pos_embed is 'none' but the state has a non-zero pos_embed")
    if card["kwargs"]["global_pool"] == "avg" and "fc_norm.weight" not in out:
        dim = arch_dims(m)["embed_dim"]
        out["fc_norm.weight"], out["fc_norm.bias"] = torch.ones(dim), torch.zeros(dim)  # identity at init
    if m.get("rel_pos") == "bias":
        out = _to_beit(out)
    return out


def _to_beit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, val in state.items():
        head, tail = _split(key)
        if tail == "attn.qkv.bias":
            q, _k, v = val.chunk(3)
            out[head + "attn.q_bias"], out[head + "attn.v_bias"] = q.clone(), v.clone()
        else:
            out[head + _TO_BEIT.get(tail, tail)] = val
    return out


def _split(key: str) -> tuple[str, str]:
    """``blocks.3.attn.x`` -> (``blocks.3.``, ``attn.x``); other keys -> ("", key)."""
    hit = _BLOCK.match(key)
    return (hit.group(0), key[hit.end():]) if hit else ("", key)


def to_repro(state: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A ViT checkpoint in our, timm's or an official MAE/BEiT layout (optionally wrapped in ``{'model': ...}`` or
    ``{'module': ...}``) as our encoder's keys. ``model`` (the ViT it will load into) fills a position-free
    encoder's absent ``pos_embed`` with zeros where the model has an absolute table, as ``with_zero_pos_embed``."""
    for wrap in ("model", "module"):
        inner = state.get(wrap) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping):
            state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    blocks = sorted({int(h.group(1)) for k in state if (h := _BLOCK.match(k))})
    out: dict[str, torch.Tensor] = {}
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    for key, val in state.items():
        if PRETRAIN_ONLY.search(key) or key == "rel_pos_bias.relative_position_bias_table":
            continue
        head, tail = _split(key)
        if tail in ("attn.q_bias", "attn.v_bias"):
            if tail == "attn.q_bias":
                v = state[head + "attn.v_bias"]
                out[head + "attn.qkv.bias"] = torch.cat([val, torch.zeros_like(val), v])
            continue
        inverse = {t: o for o, t in _TO_BEIT.items()}
        out[head + inverse.get(tail, tail)] = val
    if shared is not None:  # BEiT pretraining's shared table: every block starts from it
        for i in blocks:
            out.setdefault(f"blocks.{i}.attn.rel_table", shared.clone())
    relative = any(k.endswith(("attn.rel_table", "attn.rpe_k")) for k in out)
    if model is not None and "pos_embed" not in out and relative and getattr(model, "pos_embed", None) is not None:
        out["pos_embed"] = torch.zeros_like(model.pos_embed.detach().cpu())
    return out


def is_official(obj: Any) -> bool:
    """True for the ``{'model': state_dict}`` layout of the official MAE / BEiT scripts."""
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "encoder" not in obj


def write_official(path: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Our encoder as ``{'model': timm-layout state}``: the official MAE fine-tune script's input (its keys are
    timm's ViT keys), and for BEiT-style encoders the official BEiT fine-tuning's per-layer relative-bias keys."""
    return atomic_torch_save({"model": to_timm(state, meta)}, path)


def write_timm_sidecar(out_dir: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                       ) -> dict[str, str]:
    """``encoder_timm.pth`` (strict timm state dict) and ``timm.json`` (the card) beside ``encoder.pth``."""
    return atomic_json_and_tensors(out_dir, {TIMM_FILE: to_timm(state, meta)}, CARD_FILE, timm_card(meta))
