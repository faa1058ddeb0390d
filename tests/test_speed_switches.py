"""The training-step speed switches beside ``train.compile`` / ``train.fused_optim`` (tests/test_compile.py):
``train.fused_attn`` (every attention layer through SDPA, or the explicit softmax(QK^T)V) and ``train.sync_free``
(BEiT's masked positions selected with a fixed size instead of a boolean index), ``train.embed_visible`` (only the
kept patches projected) and ``train.sdpa`` (SDPA's kernel order). Each gives the same loss on and off
on the CPU, from identical weights and inputs; relative-position attention (BEiT's bias, LoMaR's contextual iRPE,
the visible-only Swin windows) through SDPA equals the explicit product. Micro models, one thread."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from repro.engine.train import apply_fused_attn, build_optimizer
from repro.models.irpe import IRPEAttention
from repro.models.relpos import RelPosAttention, attention, grid_coords
from repro.models.vit import set_fused_attn
from repro.profile.bench import build_method, random_batch
from repro.resolve import resolve

MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path=0.0"]
SWIN = ("greenmim_swin_base", "localmim_swin_base", "simmim_swin_base")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _method(recipe: str, overrides: list[str] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    micro = [] if recipe in SWIN else MICRO  # the tiny Swin recipes are already swin_micro
    if recipe.startswith("beit"):
        micro = [*micro, "method.vocab_size=64"]  # a codebook the patches of two images can fit
    if recipe == "localmim":
        micro = [*micro, "model.depth=4"]  # one block per tap
    cfg = resolve(recipe, "tiny", [*micro, *(overrides or [])], kind="pretrain")
    torch.manual_seed(0)
    method = build_method(cfg)
    method.train()
    return method, cfg


def _step_losses(method: torch.nn.Module, batch: Any) -> list[float]:
    """One engine step (forward, backward, AdamW, after_step) from fixed seeds, then the next forward's loss."""
    opt = build_optimizer([{"params": [p for p in method.parameters() if p.requires_grad]}],
                          {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05}, 1e-3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    loss = method(batch, gen).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_step(1, 100)
    with torch.no_grad():
        return [loss.item(), method(batch, gen).loss.item()]


def _with_tokens(method: torch.nn.Module, batch: Any) -> None:
    """BEiT's k-means codebook fitted on the batch (instead of on the training set)."""
    if hasattr(method, "fit_tokenizer"):
        first = batch[0]
        method.fit_tokenizer(first[0] if isinstance(first, (list, tuple)) else first)


@pytest.mark.parametrize("recipe", ["mae", "lomar", "beit", "beit_window", "extrema", "simmim", "maskfeat",
                                    "localmim", "greenmim_swin_base", "localmim_swin_base", "simmim_swin_base"])
def test_fused_attn_off_gives_the_sdpa_step(recipe):
    sdpa, cfg = _method(recipe)
    batch = random_batch(sdpa, cfg, 2, torch.device("cpu"))
    _with_tokens(sdpa, batch)
    explicit = copy.deepcopy(sdpa)
    assert set_fused_attn(explicit, False) >= 2
    if recipe == "simmim_swin_base":  # timm leaves its Swin window attention explicit: the switch's "on" is SDPA
        assert set_fused_attn(sdpa, True) >= 2
    want = _step_losses(sdpa, batch)
    got = _step_losses(explicit, batch)
    assert want[1] != want[0]  # the update changed the model
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


def _rel_pos_layer(kind: type[RelPosAttention], grid: int = 6) -> RelPosAttention:
    torch.manual_seed(0)
    att = kind(32, 4, grid)
    with torch.no_grad():  # both tables start at zero in the methods: random here, so positions show
        (att.rpe_k if kind is IRPEAttention else att.rel_table).normal_(std=0.5)
    return att.eval()


@pytest.mark.parametrize("kind", [RelPosAttention, IRPEAttention])
def test_relative_position_attention_through_sdpa_equals_the_explicit_product(kind):
    """BEiT / SimMIM's relative position bias and LoMaR's contextual iRPE term (q . r_bucket on the keys; LoMaR has
    no value term: rpe_on='k') as SDPA's float mask give the explicit softmax(QK^T / sqrt(d) + bias)V, on the full
    grid, on per-image subsets of it (MAE-style visible tokens) and on one window shared by every sequence."""
    att = _rel_pos_layer(kind)
    x = torch.randn(3, 1 + 36, 32, generator=torch.Generator().manual_seed(1))
    sub = torch.stack([torch.randperm(36, generator=torch.Generator().manual_seed(i))[:9] for i in range(3)])
    coords = grid_coords(6, 6)
    window = grid_coords(3, 3)[None] + torch.tensor([2, 1])
    for inp, c in ((x, None), (x[:, :10], coords[sub]), (x[:, :10], window)):
        att.fused_attn = True
        fused = att(inp, coords=c)
        att.fused_attn = False
        explicit = att(inp, coords=c)
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
        # the layer's own pieces, written out once more
        b, n, _ = inp.shape
        q, k, v = att.qkv(inp).reshape(b, n, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-2, -1) * att.head_dim**-0.5 + att.position_term(q, n, c)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        torch.testing.assert_close(fused, att.proj(out), rtol=1e-5, atol=1e-6)


def test_attention_helper_with_a_blocking_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=g).masked_fill(torch.rand(1, 1, 5, 5, generator=g) < 0.3, -100.0)
    torch.testing.assert_close(attention(q, k, v, bias, 0.0, fused=True), attention(q, k, v, bias, 0.0, fused=False))
    torch.testing.assert_close(attention(q, k, v, None, 0.0, fused=True), attention(q, k, v, None, 0.0, fused=False))


def test_fused_attn_switch_defaults():
    """null: the CPU keeps the layers as built (SDPA, timm's Swin window attention explicit), CUDA forces SDPA;
    true / false force either. Only attributes change: no device is touched."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    lomar, _ = _method("lomar")
    assert apply_fused_attn(lomar, None, cpu) is None
    assert all(m.fused_attn for m in lomar.modules() if isinstance(m, RelPosAttention))
    assert apply_fused_attn(lomar, False, cpu) is False
    assert not any(getattr(m, "fused_attn", False) for m in lomar.modules())
    assert apply_fused_attn(lomar, None, cuda) is True
    swin, _ = _method("simmim_swin_base")
    windows = [m for m in swin.modules() if hasattr(m, "relative_position_bias_table")]
    assert windows and not any(m.fused_attn for m in windows)  # timm's experimental default, kept on the CPU
    apply_fused_attn(swin, None, cpu)
    assert not any(m.fused_attn for m in windows)
    apply_fused_attn(swin, None, cuda)
    assert all(m.fused_attn for m in windows)


def test_switches_resolve_default_to_null_and_stay_out_of_stage_keys():
    from repro.pipeline.stage import Stage

    cfg = resolve("beit", "tiny", kind="pretrain")
    keys = ("fused_attn", "sync_free", "embed_visible", "sdpa")
    assert all(cfg["train"][k] is None for k in keys)
    on = resolve("beit", "tiny", ["train.fused_attn=false", "train.sync_free=true", "train.embed_visible=true",
                                  "train.sdpa=[flash,math]"], kind="pretrain")
    assert [on["train"][k] for k in keys] == [False, True, True, ["flash", "math"]]
    assert Stage("pretrain", on).key == Stage("pretrain", cfg).key


@pytest.mark.parametrize("recipe", ["beit", "beit_window"])
def test_sync_free_beit_step_matches_the_boolean_selection(recipe):
    """One step with the fixed-size selection of masked positions (weights 0 on fillers) gives the boolean
    selection's loss, accuracy and next loss; on the CPU the default is the boolean selection."""
    off, cfg = _method(recipe, ["train.sync_free=false"])
    assert not off.speed_switch("sync_free", torch.device("cpu"))
    batch = random_batch(off, cfg, 3, torch.device("cpu"))
    _with_tokens(off, batch)
    on = copy.deepcopy(off)
    on.cfg = _method(recipe, ["train.sync_free=true"])[1]
    assert on.speed_switch("sync_free", torch.device("cpu"))
    want = _step_losses(off, batch)
    got = _step_losses(on, batch)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        a, b = off(batch, g0).logs, on(batch, g1).logs
    torch.testing.assert_close(b["mlm_acc"], a["mlm_acc"], rtol=1e-6, atol=0)


def test_sync_free_selection_with_masks_short_of_the_target():
    """Block-wise masking may stop a few patches short: those sequences get zero-weight fillers."""
    m, _ = _method("beit")
    t, n = m.mask_side**2, m.num_mask
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, t)
    for i, count in enumerate((n, n - 3, 1, n)):
        mask[i, torch.randperm(t, generator=g)[:count]] = 1.0
    out = torch.randn(4, t, m.encoder.embed_dim, generator=g)
    tokens = torch.randint(0, m.lm_head.out_features, (4, t), generator=g)
    with torch.no_grad():
        loss, acc = m.masked_loss_static(out, tokens, mask)
        sel = mask.bool()
        logits = m.lm_head(out[sel])
        want = torch.nn.functional.cross_entropy(logits, tokens[sel])
        want_acc = (logits.argmax(-1) == tokens[sel]).float().mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(acc, want_acc)


@pytest.mark.parametrize("recipe", ["mae", "localmim", "extrema"])
def test_embed_visible_step_matches_the_full_patch_embedding(recipe):
    """Projecting only the kept patches' pixels gives the conv-then-gather step's losses (float rounding apart) and
    the same masks; on the CPU the default is the full patch embedding."""
    off, cfg = _method(recipe, ["train.embed_visible=false"])
    assert not off.speed_switch("embed_visible", torch.device("cpu"))
    on = copy.deepcopy(off)
    on.cfg = _method(recipe, ["train.embed_visible=true"])[1]

    def conv_path(*_: Any) -> None:
        raise AssertionError("train.embed_visible=true ran the full patch embedding")

    on.encoder.patch_embed.forward = conv_path  # the switch's path projects gathered pixels, never the conv
    batch = random_batch(off, cfg, 3, torch.device("cpu"))
    want, got = _step_losses(off, batch), _step_losses(on, batch)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


def test_embed_visible_equals_gathering_the_conv_tokens():
    from repro.models.mim import embed_visible, gather_tokens

    vit, _ = _method("mae")
    pe = vit.encoder.patch_embed
    imgs = torch.randn(2, 3, *pe.img_size)
    ids = torch.stack([torch.randperm(pe.num_patches)[:5] for _ in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(embed_visible(pe, imgs, ids), gather_tokens(pe(imgs), ids), rtol=1e-5, atol=1e-5)


def test_sdpa_order_enables_only_the_named_kernels():
    """``train.sdpa`` names the kernels SDPA may use, in order: inside its context only those are enabled (torch's
    global flags, which the CUDA dispatch reads), all of them again after it; None changes nothing; the result is
    the explicit product's; a name outside the list is refused when the recipe resolves."""
    import torch.nn.functional as F

    from repro.config import SDPA_NAMES, ConfigError
    from repro.engine.train import sdpa_backends

    b = torch.backends.cuda

    def enabled() -> tuple[bool, ...]:
        return b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()

    before = enabled()
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    with sdpa_backends(["flash", "math"]):
        assert enabled() == (True, False, False, True)
        got = F.scaled_dot_product_attention(q, k, v)
    assert enabled() == before
    want = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with sdpa_backends(None):
        assert enabled() == before
    with sdpa_backends(list(SDPA_NAMES)):
        assert all(enabled())
    with pytest.raises(ConfigError, match="train.sdpa"):
        resolve("mae", "tiny", ["train.sdpa=[fast]"], kind="pretrain")
