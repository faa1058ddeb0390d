"""BEiT (repro.methods.beit) and its tokenizers (repro.models.tokenizer): block-wise masking at BEiT's geometry, the
tokenizer plug-in contract (k-means substitute, DALL-E dVAE encoder), the shared relative position bias and its
export, LoMaR's window variant, the tiny rule and a micro overfit (its tiny chain: test_chain_smoke.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import ConfigError
from repro.engine.train import build_optimizer
from repro.methods.beit import BEiT, TwoViewCrop
from repro.models.mim import blockwise_mask
from repro.models.relpos import grid_coords
from repro.models.tokenizer import DalleEncoder, DalleTokenizer, KMeansTokenizer, map_pixels
from repro.models.vit import create_vit, set_fused_attn
from repro.resolve import resolve
from repro.scales import TinyRule

MICRO = {"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.0}


def make(recipe: str = "beit", scale: str = "tiny", model: dict[str, Any] | None = None, **method: Any) -> BEiT:
    """Tiny: 32-px images, 4-px patches (8 x 8 grid), 24 masked patches, windows of 4 x 4; a 64-token vocabulary
    (unless given) so that a codebook fits on the patches of two images."""
    torch.manual_seed(0)
    method = {"vocab_size": 64, **method}
    return BEiT(resolve(recipe, scale, {"model": {**MICRO, **(model or {})}, "method": method}))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def imgs(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=gen(seed))


# -- masking ---------------------------------------------------------------------------------------------------------


def test_blockwise_mask_at_beit_geometry() -> None:
    m = blockwise_mask(300, 14, 14, 75, gen(), min_num=16)  # num_mask_patches 75 of 196, blocks of >= 16
    counts = m.sum(1)
    assert counts.max() == 75  # never over
    assert counts.mean() >= 73.5 and counts.min() >= 60
    assert abs(float(m.mean()) - 75 / 196) < 0.01  # ~38%
    # min_block = target = 16 with square blocks: exactly one filled 4 x 4 block per image.
    one = blockwise_mask(50, 14, 14, 16, gen(1), min_num=16, min_aspect=1.0).view(50, 14, 14)
    for g in one:
        rows, cols = g.nonzero(as_tuple=True)
        assert g.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3


def test_method_mask_tiny_and_window() -> None:
    m = make()
    assert (m.num_mask, m.min_block, m.mask_side) == (24, 5, 8)  # 75/196 and 16/196 of an 8 x 8 grid
    mask = m.mask(64, gen())
    assert mask.shape == (64, 64) and mask.sum(1).max() == 24 and mask.sum(1).mean() >= 22.5
    w = make("beit_window")
    assert (w.k, w.num_mask, w.min_block, w.mask_side) == (4, 6, 1, 4)  # 24 * 16/64 of each 4 x 4 window
    wm = w.mask(64, gen())
    assert wm.shape == (64, 16) and wm.sum(1).max() == 6 and wm.sum(1).mean() >= 5.5


# -- tokenizers ------------------------------------------------------------------------------------------------------


def test_kmeans_tokenizer_contract() -> None:
    tok = KMeansTokenizer(vocab_size=16, patch_size=4, iters=5)
    assert tok.substitute and "substitute" in tok.label and tok.view_size(8) is None
    x = imgs(4)
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode(x)
    feats = tok.features(x).flatten(0, 1)  # 4 images x 64 patches
    tok.fit(feats, seed=3)
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (4, 64) and ids.min() >= 0 and ids.max() < 16
    assert len(ids.unique()) > 8  # the codebook is used, not collapsed
    # Nearest centroid: no centroid is closer to a patch than the one it was given.
    d = torch.cdist(feats, tok.codebook)
    assert torch.allclose(d.gather(1, ids.reshape(-1, 1)).squeeze(1), d.min(1).values)
    # Seeded: the same fit twice gives the same codebook; another seed another one.
    again = KMeansTokenizer(16, 4, iters=5)
    again.fit(feats, seed=3)
    assert torch.equal(again.codebook, tok.codebook)
    other = KMeansTokenizer(16, 4, iters=5)
    other.fit(feats, seed=4)
    assert not torch.equal(other.codebook, tok.codebook)
    # Saved with the run: a fresh tokenizer loading the state dict gives the same tokens without fitting.
    fresh = KMeansTokenizer(16, 4, iters=5)
    fresh.load_state_dict(tok.state_dict())
    assert fresh.ready and torch.equal(fresh.encode(x), ids)
    with pytest.raises(ConfigError, match="vocab_size"):
        KMeansTokenizer(1000, 4).fit(feats, seed=0)  # 256 patches < 1000 centroids


def test_dalle_tokenizer_contract(tmp_path: Path) -> None:
    assert torch.allclose(map_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 0.9]))
    net = DalleEncoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    keys = set(net.state_dict())
    # OpenAI's names (dall_e/encoder.py), so a converted encoder.pkl state dict loads as is.
    for k in ("blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w",
              "blocks.group_4.block_1.res_path.conv_4.b", "blocks.output.conv.w"):
        assert k in keys, k
    path = tmp_path / "dalle_encoder.pth"
    torch.save(net.state_dict(), path)
    tok = DalleTokenizer(path, vocab_size=512, n_hid=64, n_blk_per_group=1)
    assert not tok.substitute and tok.view_size(8) == 64 and tok.view_size(14) == 112
    assert list(tok.state_dict()) == []  # frozen dVAE: neither trained nor checkpointed
    views = torch.rand(2, 3, 64, 64, generator=gen())
    ids = tok.encode(views)
    assert ids.dtype == torch.long and ids.shape == (2, 64) and ids.max() < 512
    with torch.no_grad():
        expect = net(map_pixels(views)).argmax(1).flatten(1)
    assert torch.equal(ids, expect)
    with pytest.raises(ConfigError, match="tokenizer_path"):
        DalleTokenizer(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        DalleTokenizer(path, vocab_size=8192, n_hid=64, n_blk_per_group=1)
    with pytest.raises(ConfigError, match="tokenizer_path"):
        resolve("beit", "tiny", {"method": {"tokenizer": "dalle"}})


def test_dalle_view_reaches_the_method(tmp_path: Path) -> None:
    """With a tokenizer of its own view, the transform yields (image, view) and the method tokenizes the view."""
    crop = TwoViewCrop(32, (0.08, 1.0), 0.5, 0.4, "bicubic", second_size=64)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    main, view = crop(img)
    assert main.shape == (3, 32, 32) and view.shape == (3, 64, 64) and view.min() >= 0 and view.max() <= 1
    assert isinstance(TwoViewCrop(32, (0.08, 1.0), 0.5, 0.4, "bicubic")(img), torch.Tensor)
    net = DalleEncoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(net.state_dict(), tmp_path / "d.pth")
    m = make(vocab_size=512)
    m.tokenizer = DalleTokenizer(tmp_path / "d.pth", vocab_size=512, n_hid=64, n_blk_per_group=1)
    views = torch.rand(2, 3, 64, 64, generator=gen(2))
    _, tokens = m.targets(([imgs(), views], None))
    assert torch.equal(tokens, m.tokenizer.encode(views))
    assert abs(m(([imgs(), views], None), gen()).loss.item() - math.log(512)) < 0.5


# -- model -------------------------------------------------------------------------------------------------------------


def test_shared_bias_exports_per_layer_copies() -> None:
    m = make()
    tables = [b.attn.rel_table for b in m.encoder.blocks]
    assert all(t is tables[0] for t in tables) and not tables[0].any()  # one zero-initialised table
    assert sum(p is tables[0] for p in m.parameters()) == 1  # optimised once
    with torch.no_grad():
        tables[0].normal_()
    state = m.export()
    assert torch.equal(state["blocks.0.attn.rel_table"], state["blocks.1.attn.rel_table"])
    assert not state["pos_embed"].any()  # no absolute positions
    cfg = resolve("beit_vit_base", "tiny", {"model": {**MICRO, "layer_scale": 0.1}}, kind="finetune")
    ft = create_vit(cfg["model"], cfg["data"]["img_size"], num_classes=10, global_pool="token")  # keeps the final norm
    res = ft.load_state_dict(state, strict=False)
    assert not [k for k in res.missing_keys if not k.startswith(("head.", "fc_norm."))]
    assert ft.blocks[0].attn.rel_table is not ft.blocks[1].attn.rel_table  # fine-tuning: one copy per layer
    x = imgs()
    m.eval()
    ft.eval()
    with torch.no_grad():
        assert torch.allclose(ft.forward_features(x), m.encoder.forward_features(x), atol=1e-5)


def test_loss_is_cross_entropy_on_masked_tokens() -> None:
    m = make()
    x = imgs()
    m.fit_tokenizer(x)
    out = m((x, None), gen(5))
    mask = m.mask(2, gen(5)).bool()
    with torch.no_grad():
        feats = m.encode(m.encoder.patch_embed(x), mask.float(), grid_coords(8, 8)[None])
        expect = torch.nn.functional.cross_entropy(m.lm_head(feats[mask]), m.tokenizer.encode(x)[mask])
    assert torch.allclose(out.loss, expect, atol=1e-6)
    assert abs(out.loss.item() - math.log(64)) < 0.3  # ~uniform over the vocabulary at init
    assert abs(float(out.logs["mask_ratio"]) - float(mask.float().mean())) < 1e-6


@pytest.mark.parametrize("recipe", ["beit", "beit_window"])
def test_attention_masks_reach_sdpa_with_unit_key_stride(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's fused SDPA kernels take a float mask only with unit stride along the keys (otherwise SDPA runs its
    explicit math path in fp32): the relative bias of every block does, on the full grid and per window, and the
    loss is the explicit attention's."""
    masks: list[torch.Tensor] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: Any, **kw: Any) -> torch.Tensor:
        masks.append(kw["attn_mask"])
        return sdpa(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    m = make(recipe)
    x = imgs()
    m.fit_tokenizer(x)
    with torch.no_grad():
        m.encoder.blocks[0].attn.rel_table.normal_()  # the shared table, so that positions matter
    loss = m((x, None), gen(3)).loss
    assert len(masks) == 2 and all(b.stride(-1) == 1 for b in masks)
    set_fused_attn(m, False)
    torch.testing.assert_close(m((x, None), gen(3)).loss, loss, rtol=1e-5, atol=0)
    assert len(masks) == 2


def test_window_geometry_and_token_counts() -> None:
    """Paper geometry (224 px, patch 16, 14 x 14 grid) with a micro width: four 7 x 7 windows of 49 (+cls) tokens."""
    m = make("beit_window", "paper", {"depth": 1}, vocab_size=64)
    assert (m.grid, m.k, m.num_mask, m.min_block) == (14, 7, 19, 4)  # 75/196 of 49; 16/196 of 49
    x = imgs(2, 224)
    m.fit_tokenizer(x)
    full_tokens = m.tokenizer.encode(x)
    seen: dict[str, torch.Tensor] = {}
    orig_encode = m.encode

    def spy_encode(feats: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        seen.update(feats=feats, mask=mask, coords=coords)
        return orig_encode(feats, mask, coords)

    m.encode = spy_encode  # type: ignore[method-assign]
    out = m((x, None), gen(3))
    feats, mask, coords = seen["feats"], seen["mask"], seen["coords"]
    assert feats.shape == (8, 49, 32) and mask.shape == (8, 49) and coords.shape == (8, 49, 2)
    assert mask.sum(1).max() <= 19 and mask.sum(1).min() >= 10
    for c in coords:  # each window: a contiguous 7 x 7 square inside the grid, raster order
        top, left = c[0].tolist()
        assert torch.equal(c, grid_coords(7, 7) + torch.tensor([top, left]))
        assert 0 <= top <= 7 and 0 <= left <= 7
    assert torch.equal(coords[:4], coords[4:])  # shared placement: the same windows for the whole batch
    # The patch embeddings and targets are those of the image at the window's positions.
    flat = coords[..., 0] * 14 + coords[..., 1]
    with torch.no_grad():
        emb = m.encoder.patch_embed(x)
    assert torch.allclose(feats[1], emb[0, flat[1]], atol=1e-6) and torch.allclose(feats[5], emb[1, flat[5]])
    sel = mask.bool()
    with torch.no_grad():
        logits = m.lm_head(orig_encode(feats, mask, coords)[sel])
    labels = torch.stack([full_tokens[i // 4, flat[i]] for i in range(8)])[sel]
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits, labels), atol=1e-6)
    with pytest.raises(ConfigError, match="window_size"):
        make("beit_window", window_size=9)  # 9 > the 8 x 8 tiny grid


def test_tiny_rule_paper_values_and_validation() -> None:
    t = BEiT.tiny(dict(BEiT.defaults), TinyRule("vit_base"))
    assert (t["num_mask_patches"], t["min_block"], t["window_size"], t["vocab_size"]) == (24, 5, 4, 512)
    assert BEiT.tiny({**BEiT.defaults, "tokenizer": "dalle"}, TinyRule("vit_base"))["vocab_size"] == 8192
    p = resolve("beit", "paper")
    assert p["method"]["num_mask_patches"] == 75 and p["method"]["min_block"] == 16
    assert p["method"]["vocab_size"] == 8192 and p["method"]["tokenizer"] == "kmeans"
    assert p["model"]["layer_scale"] == 0.1 and p["model"]["rel_pos"] == "bias" and p["model"]["pos_embed"] == "none"
    o = p["optim"]
    assert o["blr"] * o["batch_size"] / 256 == pytest.approx(1.5e-3) and o["batch_size"] == 2048
    assert (o["epochs"], o["warmup_epochs"], o["clip_grad"]) == (300, 10, 3.0)
    assert resolve("beit_window", "paper")["optim"]["betas"] == [0.9, 0.999]  # official --opt_betas default
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], o, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999)
    assert resolve("beit_window", "paper")["method"]["num_windows"] == 4
    ft = resolve("beit_vit_base", "paper", kind="finetune")
    assert ft["optim"]["blr"] * ft["optim"]["batch_size"] / 256 == pytest.approx(4e-3)
    assert ft["optim"]["layer_decay"] == 0.65 and ft["model"]["rel_pos"] == "bias"
    for bad, match in (({"tokenizer": "vqgan"}, "tokenizer"), ({"min_aspect": 2.0}, "min_aspect"),
                       ({"max_block": 2}, "max_block"), ({"num_windows": -1}, "num_windows")):
        with pytest.raises(ConfigError, match=match):
            resolve("beit", "tiny", {"method": bad})
    with pytest.raises(ConfigError, match="num_mask_patches"):
        make(num_mask_patches=64)
    with pytest.raises(ConfigError, match="rel_pos"):
        make(model={"rel_pos": "none"})


# -- training ----------------------------------------------------------------------------------------------------------


def test_overfits_fixed_batch() -> None:
    m = make()
    x = imgs()
    m.fit_tokenizer(x)
    # Random-noise images give near-random tokens: the model must memorise 48 labels at mask-token inputs that differ
    # only through the (zero-initialised) relative position bias, hence a few hundred steps.
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(320):
        loss = m((x, None), gen(7)).loss  # the same block mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < losses[0] / 10, losses[::40]  # from ~ln(64)


def test_resume_keeps_the_codebook() -> None:
    m = make()
    m.fit_tokenizer(imgs(4, seed=9))
    state = m.state_dict()
    assert "tokenizer.codebook" in state and bool(state["tokenizer.fitted"])
    r = make()
    r.load_state_dict(state)
    r.fit_tokenizer = lambda *a, **k: pytest.fail("a resumed run must not refit the codebook")  # type: ignore
    x = imgs()
    assert torch.equal(r.targets((x, None))[1], m.tokenizer.encode(x))
