"""Checkpoints that travel: every method's exported encoder loads strictly into the timm model its sidecar names, with
the same features; the official ``{'model': ...}`` layout reads and writes; misfits are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models.beit import gen_relative_position_index

from repro.cli import check_init
from repro.config import ConfigError
from repro.engine.pretrain import export_encoder
from repro.evals.features import load_encoder
from repro.io import load_checkpoint
from repro.methods import get_method
from repro.models.encoders import create_encoder
from repro.models.export import CARD_FILE, TIMM_FILE, create_timm, timm_card, to_repro, to_timm, write_official
from repro.models.relpos import RelPosAttention
from repro.models.vit import create_vit, encoder_state_dict
from repro.resolve import resolve

# (pretraining recipe, timm family the card must name)
METHODS = [
    ("mae", "vit_"), ("lomar", "repro_vit_irpe_"), ("localmim", "vit_"), ("localmim_swin_base", "swin_"),
    ("extrema", "vit_"), ("beit", "beit_"), ("simmim", "beit_"), ("greenmim_swin_base", "swin_"), ("maskfeat", "vit_"),
]
MICRO = {"arch": "vit_micro", "patch_size": 4}


def _method(recipe: str) -> tuple[Any, dict[str, Any]]:
    cfg = resolve(f"pretrain/{recipe}", "tiny")
    torch.manual_seed(0)
    method = get_method(cfg["method"]["name"])(cfg).eval()
    with torch.no_grad():  # away from the initialisation (zero iRPE tables, constant layer scales ...)
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return method, cfg


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.mark.parametrize("recipe,family", METHODS)
def test_export_loads_strictly_into_timm_with_same_features(tmp_path: Path, recipe: str, family: str) -> None:
    method, cfg = _method(recipe)
    paths = export_encoder(method, cfg, tmp_path)
    assert {Path(paths[TIMM_FILE]).name, Path(paths[CARD_FILE]).name} == {TIMM_FILE, CARD_FILE}
    card = json.loads((tmp_path / CARD_FILE).read_text())
    assert card["timm_name"].startswith(family) and set(card) == {"timm_name", "kwargs", "import"}
    timm_model = create_timm(card)
    timm_model.load_state_dict(load_checkpoint(tmp_path / TIMM_FILE), strict=True)
    ours = method._branch()[0] if hasattr(method, "_branch") else method.encoder  # ExtreMA: the exported branch
    img = cfg["data"]["img_size"]
    x = torch.randn(2, 3, img, img)
    want = _features(ours, x)
    assert torch.allclose(_features(timm_model, x), want, atol=1e-5)
    # The timm file is also a valid --init: it loads into the evaluation encoder with the same features.
    for name in ("encoder.pth", TIMM_FILE):
        enc = create_encoder(cfg["model"], img)
        load_encoder(enc, str(tmp_path / name))
        assert torch.allclose(_features(enc, x), want, atol=1e-5), name


def test_beit_relative_table_layout_is_timms() -> None:
    """Our rel_table rows are indexed exactly as timm's BEiT relative_position_index (offsets, then cls entries)."""
    attn = RelPosAttention(8, 2, grid=3)
    with torch.no_grad():
        attn.rel_table.copy_(torch.arange(attn.rel_table.shape[0], dtype=torch.float)[:, None].expand(-1, 2))
    ours = attn.position_term(torch.zeros(1, 2, 10, 4), 10)[0, 0].long()
    assert torch.equal(ours, gen_relative_position_index((3, 3)))


def test_official_mae_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = {**MICRO, "pos_embed": "sincos"}
    src = create_vit(model, 32)
    state = encoder_state_dict(src)
    meta = {"model": model, "img_size": 32}
    write_official(tmp_path / "ours_official.pth", state, meta)
    out = torch.load(tmp_path / "ours_official.pth", weights_only=True)
    assert set(out) == {"model"} and set(out["model"]) == set(state)  # official MAE keys are timm's ViT keys
    # An official MAE pretraining checkpoint: encoder + decoder + mask token, and a 1000-class head from elsewhere.
    official = {"model": {**state, "mask_token": torch.zeros(1, 1, 8), "decoder_embed.weight": torch.zeros(4, 8),
                          "decoder_pos_embed": torch.zeros(1, 65, 4), "head.weight": torch.zeros(1000, 64),
                          "head.bias": torch.zeros(1000)}}
    path = tmp_path / "mae_pretrain.pth"
    torch.save(official, path)
    dst = create_vit(model, 32, num_classes=10)
    load_encoder(dst, str(path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(dst, x), _features(src, x))
    check_init({"init": str(path), "model": model, "data": {"img_size": 32}})  # `repro finetune --init` accepts it


def test_official_beit_layout_reads_shared_and_per_layer_tables(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = {**MICRO, "pos_embed": "none", "rel_pos": "bias", "layer_scale": 0.1}
    src = create_vit(model, 32)
    state = encoder_state_dict(src)
    for k in state:
        state[k] = state[k] + torch.randn_like(state[k]) * 0.05
    meta = {"model": model, "img_size": 32}
    beit = to_timm(state, meta)
    assert "blocks.0.attn.q_bias" in beit and "blocks.0.gamma_1" in beit and "blocks.0.attn.rel_table" not in beit
    back = to_repro({"model": beit})
    assert set(back) == set(state)
    for k, v in back.items():
        if k.endswith("qkv.bias"):  # the key bias is not carried (the softmax cancels it)
            d = v.shape[0] // 3
            assert torch.equal(v[:d], state[k][:d]) and torch.equal(v[2 * d:], state[k][2 * d:])
        else:
            assert torch.equal(v, state[k]), k
    # BEiT pretraining layout: one shared table, index buffers, lm_head; every block starts from the shared table.
    shared = {k: v for k, v in beit.items() if not k.endswith("relative_position_bias_table")}
    shared["rel_pos_bias.relative_position_bias_table"] = beit["blocks.0.attn.relative_position_bias_table"]
    shared["blocks.0.attn.relative_position_index"] = gen_relative_position_index((8, 8))
    shared["lm_head.weight"] = torch.zeros(16, 64)
    path = tmp_path / "beit_pretrain.pth"
    torch.save({"model": shared}, path)
    dst = create_vit({**model, "pos_embed": "sincos"}, 32)  # a fine-tuning ViT with a (zeroed) absolute table
    load_encoder(dst, str(path))
    assert all(torch.equal(b.attn.rel_table, state["blocks.0.attn.rel_table"]) for b in dst.blocks)
    assert not dst.pos_embed.detach().any()
    timm_model = create_timm(timm_card(meta))
    timm_model.load_state_dict(beit, strict=True)
    ref = create_vit(model, 32)
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_features(timm_model, x), _features(ref, x), atol=1e-5)


def test_misfit_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    state = encoder_state_dict(create_vit({**MICRO, "pos_embed": "sincos"}, 32))
    torch.save({"model": state}, tmp_path / "micro.pth")
    with pytest.raises(ConfigError) as err:  # another patch size (the same 8x8 grid at 64 px)
        load_encoder(create_vit({"arch": "vit_micro", "patch_size": 8}, 64), str(tmp_path / "micro.pth"))
    assert "patch_embed.proj.weight has shape" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # another width
        load_encoder(create_vit({"arch": "vit_mini", "patch_size": 4}, 32), str(tmp_path / "micro.pth"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # another layout: relative-bias model, plain checkpoint
        load_encoder(create_vit({**MICRO, "rel_pos": "bias"}, 32), str(tmp_path / "micro.pth"))
    assert "lacks encoder weights" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # through `repro finetune --init`'s check, before any stage
        check_init({"init": str(tmp_path / "micro.pth"), "model": {"arch": "vit_mini", "patch_size": 4},
                    "data": {"img_size": 32}})
    assert str(err.value).startswith("--init ") and "\n" not in str(err.value)
