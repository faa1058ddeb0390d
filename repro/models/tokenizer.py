"""Visual tokenizers for BEiT-style pretraining: each maps images to one discrete token per patch.

BEiT (microsoft/unilm beit) predicts the tokens of OpenAI's DALL-E dVAE: its encoder sees a second 112-px view of the
crop (lanczos-resized, pixels in [0, 1] through the logit-Laplace ``map_pixels``), downsamples by 8 to the 14 x 14
patch grid and the token is the argmax over its 8192 logits. The dVAE weights cannot be downloaded here, so the
tokenizer is pluggable:

- ``dalle``: the dVAE encoder architecture in plain PyTorch, weights from a user file (``method.tokenizer_path``), a
  plain state dict. Convert OpenAI's ``encoder.pkl`` once, with OpenAI's own ``dall_e`` package (not a dependency of
  this suite)::

      import dall_e, torch
      enc = dall_e.load_model("encoder.pkl", torch.device("cpu"))
      torch.save(enc.state_dict(), "dalle_encoder.pth")   # then method.tokenizer_path=dalle_encoder.pth

- ``kmeans`` (the offline SUBSTITUTE, labelled as such in every report): a codebook of ``vocab_size`` centroids over
  (per-patch normalised) patch pixels of the encoder's own input, fitted by a few seeded Lloyd iterations on training
  patches when pretraining starts; the token is the nearest centroid. The codebook is a buffer, so it is saved with
  the run's checkpoint and a resumed stage uses the same one.

Contract (``Tokenizer``): ``vocab_size``, ``substitute``, ``label``, ``view_size(grid)`` (the side in pixels of the
tokenizer's own input view, or None when it reads the encoder's input) and ``encode(imgs) -> LongTensor (N, grid_h *
grid_w)`` in raster patch order, computed without gradients.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repro.config import ConfigError
from repro.models.mim import norm_pix, patchify

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x -> (1 - 2 eps) x + eps
DALLE_DOWNSAMPLE = 8  # three 2x max-pools


class Tokenizer(nn.Module):
    kind: ClassVar[str]
    substitute: ClassVar[bool]
    vocab_size: int

    @property
    def label(self) -> str:
        raise NotImplementedError

    def view_size(self, grid: int) -> int | None:
        """Pixel side of the tokenizer's own view of the crop (None: it reads the encoder's input images)."""
        return None

    @property
    def ready(self) -> bool:
        return True

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# -- k-means substitute ----------------------------------------------------------------------------------------------


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for every row of ``x``, in row chunks of bounded size."""
    c2 = centroids.pow(2).sum(1)
    rows = max(1, chunk // max(1, centroids.shape[0]))
    out = [(c2[None] - 2 * x[i:i + rows] @ centroids.t()).argmin(1) for i in range(0, x.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x`` (float32), initialised with ``k`` distinct rows drawn with ``seed``; a
    cluster left empty is re-seeded with a random row. Deterministic for a given input, seed and device."""
    n = x.shape[0]
    if n < k:
        raise ConfigError(f"k-means tokenizer: {n} training patches are fewer than method.vocab_size={k}; "
                          "raise method.kmeans_images or lower method.vocab_size")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None]
        if empty.any():
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=g).to(x.device)]
    return c


class KMeansTokenizer(Tokenizer):
    """Nearest centroid of each patch's pixels (per-patch normalised with ``norm='patch'``), centroids fitted by
    ``fit`` on training patches. Reads the encoder's input images (N, 3, H, W)."""

    kind = "kmeans"
    substitute = True

    def __init__(self, vocab_size: int, patch_size: int, norm: str = "patch", iters: int = 10) -> None:
        super().__init__()
        if norm not in ("patch", "none"):
            raise ConfigError(f"method.kmeans_norm={norm!r}; valid: patch, none")
        self.vocab_size = int(vocab_size)
        self.patch = int(patch_size)
        self.norm = norm
        self.iters = int(iters)
        self.register_buffer("codebook", torch.zeros(self.vocab_size, self.patch**2 * 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._ready = False

    @property
    def label(self) -> str:
        return f"k-means codebook ({self.vocab_size} tokens, substitute for the DALL-E dVAE)"

    @property
    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.fitted)  # one host read, then cached (the flag only ever turns on)
        return self._ready

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) float32 patch vectors the codebook lives in."""
        x = patchify(imgs.float(), self.patch)
        return norm_pix(x) if self.norm == "patch" else x

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, seed: int) -> None:
        """Fit the codebook on ``patches`` (M, p*p*3), already through ``features``."""
        c = kmeans(patches.float().to(self.codebook.device), self.vocab_size, self.iters, seed)
        self.codebook.copy_(c)
        self.fitted.fill_(True)

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("the k-means tokenizer has no codebook yet; call fit() first")
        f = self.features(imgs)
        n, length, d = f.shape
        return nearest(f.reshape(-1, d), self.codebook.float()).reshape(n, length)


# -- DALL-E dVAE encoder --------------------------------------------------------------------------------------------


class DalleConv(nn.Module):
    """DALL-E's Conv2d: parameters ``w`` (out, in, kw, kw) and ``b`` (out), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.pad = (kw - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class DalleEncoderBlock(nn.Module):
    """id_path (1x1 conv when the width changes) + post_gain * (relu-conv3-relu-conv3-relu-conv3-relu-conv1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = DalleConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv(n_in, hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv(hid, hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv(hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder (openai/DALL-E dall_e/encoder.py): 7x7 input conv, four groups of residual blocks
    (widths 1, 2, 4, 8 x n_hid; 2x max-pool after the first three), ReLU + 1x1 conv to ``vocab_size`` logits. Module
    and parameter names match OpenAI's, so its ``state_dict()`` loads as is."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192,
                 group_count: int = 4) -> None:
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**i for i in range(group_count)]
        groups: list[tuple[str, nn.Module]] = [("input", DalleConv(3, n_hid, 7))]
        for g, w in enumerate(widths):
            prev = widths[g - 1] if g else n_hid
            items: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DalleEncoderBlock(prev if i == 0 else w, w, n_layers))
                for i in range(n_blk_per_group)]
            if g < group_count - 1:
                items.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(items))))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", DalleConv(widths[-1], vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's logit-Laplace input map of [0, 1] pixels."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class DalleTokenizer(Tokenizer):
    """DALL-E dVAE tokens. Input: the second view, (N, 3, 8*grid, 8*grid) pixels in [0, 1] (ToTensor, no
    normalisation); ``map_pixels`` is applied here. The dVAE is frozen and kept out of the state dict (it is loaded
    again from ``path`` on resume)."""

    kind = "dalle"
    substitute = False

    def __init__(self, path: str | Path | None, vocab_size: int = 8192, n_hid: int = 256,
                 n_blk_per_group: int = 2) -> None:
        super().__init__()
        if not path or not Path(path).is_file():
            raise ConfigError(f"method.tokenizer=dalle needs method.tokenizer_path=<DALL-E encoder state dict>; "
                              f"'{path}' is not a file (convert OpenAI's encoder.pkl: see repro/models/tokenizer.py)")
        net = DalleEncoder(n_hid, n_blk_per_group, vocab_size)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ConfigError(f"method.tokenizer_path={path} is not a readable state dict ({e.__class__.__name__}); "
                              "save OpenAI's encoder.pkl as a state_dict() (see repro/models/tokenizer.py)") from None
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"method.tokenizer_path={path} does not fit the DALL-E encoder with vocab_size="
                              f"{vocab_size}, n_hid={n_hid}: {first}") from None
        net.requires_grad_(False).eval()
        self._net = [net]  # a list: not a submodule, so neither trained, checkpointed nor exported
        self.vocab_size = int(vocab_size)

    @property
    def net(self) -> DalleEncoder:
        return self._net[0]

    @property
    def label(self) -> str:
        return f"DALL-E dVAE ({self.vocab_size} tokens)"

    def view_size(self, grid: int) -> int | None:
        return grid * DALLE_DOWNSAMPLE

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        net = self.net
        if next(net.parameters()).device != imgs.device:
            net.to(imgs.device)
        with torch.autocast(imgs.device.type, enabled=False):
            logits = net(map_pixels(imgs.float()))
        return logits.argmax(1).flatten(1)


TOKENIZERS = ("kmeans", "dalle")


def build_tokenizer(params: Mapping[str, Any], patch_size: int) -> Tokenizer:
    """The tokenizer a BEiT ``method:`` section asks for."""
    kind = params["tokenizer"]
    if kind == "kmeans":
        return KMeansTokenizer(params["vocab_size"], patch_size, params["kmeans_norm"], params["kmeans_iters"])
    if kind == "dalle":
        return DalleTokenizer(params["tokenizer_path"], params["vocab_size"])
    raise ConfigError(f"method.tokenizer={kind!r}; valid: {', '.join(TOKENIZERS)}")
