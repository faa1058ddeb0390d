"""benchmarks/official/parity.py's machinery, without the official code: weights copied by name (views into fused
tensors, buffers), and a refusal for anything unmapped or trained on one side only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _parity() -> Any:
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "official" / "parity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["parity"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Official(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_bias = nn.Parameter(torch.randn(4))
        self.v_bias = nn.Parameter(torch.randn(4))
        self.w = nn.Parameter(torch.randn(12, 4))
        self.table = nn.Parameter(torch.randn(3), requires_grad=False)
        self.sobel = nn.Parameter(torch.ones(2), requires_grad=False)


class Ours(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.register_buffer("table", torch.zeros(3))


def _case(p: Any, official: nn.Module, ours: nn.Module, **kw: Any) -> Any:
    pairs = [("w", "qkv.weight", None), ("q_bias", "qkv.bias", lambda t: t[:4]),
             ("v_bias", "qkv.bias", lambda t: t[8:]), ("table", "table", None)]
    return p.Case(official, ours, pairs, {"qkv.bias[k]": "no key bias"}, lambda: None, lambda: None,
                  official_only={"sobel": "fixed filters"}, **kw)


def test_copy_fills_views_and_buffers_and_zeroes_the_key_bias() -> None:
    p = _parity()
    torch.manual_seed(0)
    off, ours = Official(), Ours()
    assert p._copy(_case(p, off, ours)) == 4
    assert torch.equal(ours.qkv.weight, off.w) and torch.equal(ours.table, off.table)
    assert torch.equal(ours.qkv.bias[:4], off.q_bias) and torch.equal(ours.qkv.bias[8:], off.v_bias)
    assert torch.all(ours.qkv.bias[4:8] == 0)


def test_copy_refuses_unmapped_or_one_sided_tensors() -> None:
    p = _parity()
    off, ours = Official(), Ours()
    ours.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(SystemExit, match="unmapped parameters: ours \\['extra'\\]"):
        p._copy(_case(p, off, ours))
    off, ours = Official(), Ours()
    off.sobel.requires_grad_(True)
    with pytest.raises(SystemExit, match="listed as fixed constants are trained"):
        p._copy(_case(p, off, ours))
    off, ours = Official(), Ours()
    ours.qkv.weight.requires_grad_(False)
    with pytest.raises(SystemExit, match="trained on one side only"):
        p._copy(_case(p, off, ours))


def test_official_swin_names_move_patch_merging_to_the_next_stage() -> None:
    p = _parity()
    assert p._official_swin_name("layers.0.downsample.reduction.weight") == "layers.1.downsample.reduction.weight"
    assert p._official_swin_name("layers.2.blocks.3.attn.qkv.bias") == "layers.2.blocks.3.attn.qkv.bias"
    assert set(p.CASES) == set(p.BUILDERS)
