"""BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers"), as microsoft/unilm beit
(run_beit_pretraining.py, modeling_pretrain.py, masking_generator.py, datasets.py) does it, plus LoMaR's window
masking variant (LoMaR paper Sec. 2.5 / Table 5).

Every patch goes through the encoder; the embeddings of masked patches are replaced by a learned mask token. Masking
is block-wise: 75 of the 196 patches (blocks of >= 16 patches, aspect ratio in [0.3, 1/0.3]; ``blockwise_mask``).
No absolute position table: one relative position bias table shared by all layers (``shared_rel_pos``), LayerScale
0.1 (``model.layer_scale``). A linear LM head on the masked positions only predicts the visual token of each patch
(cross-entropy). Tokens come from a pluggable tokenizer (``repro.models.tokenizer``): the DALL-E dVAE of the paper
(``tokenizer: dalle``, weights from ``tokenizer_path``), or the offline substitute ``kmeans`` (the default at both
scales, since the dVAE weights are not obtainable here; reports label it as a substitute).

Window masking (``num_windows > 0``, LoMaR Table 5: "randomly sample four 7x7 windows and feed them into the BEiT
model ... retaining all other settings"): LoMaR's random windows (``repro.models.mim.sample_windows``) are cut from
the patch grid; each window (+ cls) is one encoder sequence at its own grid coordinates (the relative bias is indexed
by them), block-wise masked on the K x K window with the full image's masking fraction and a minimum block scaled by
the window area (LoMaR does not say how it masks inside the windows; this keeps BEiT's masking as close as the window
allows). Targets are the tokens of the full image at the window's patches.

Initialisation as modeling_pretrain.py: truncated normal (std 0.02, cut at +-1 std) for Linear / patch-embedding
weights, the cls and mask tokens and the LM head, zero biases, unit LayerNorms, zero relative-bias table, and
the attention / MLP output projections of block l divided by sqrt(2 l). Deviation: timm's attention has a key bias
(BEiT's has q and v biases only); it starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import trunc_normal_
from timm.optim import param_groups_weight_decay
from torch import nn
from torchvision import transforms
from torchvision.transforms import functional as TF

from repro.config import ConfigError
from repro.data.datasets import normalize
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.beit import BEiTSpec
from repro.models.mim import blockwise_mask, encode_at, gather_tokens, sample_windows
from repro.models.relpos import RelPosAttention, grid_coords, share_rel_pos_table
from repro.models.tokenizer import KMeansTokenizer, build_tokenizer
from repro.models.vit import create_vit, with_zero_pos_embed


class TwoViewCrop:
    """BEiT's pretraining augmentation: ColorJitter -> horizontal flip -> one RandomResizedCrop resized to the encoder
    size (normalised) and, for a tokenizer with its own view, to ``second_size`` with ``second_interpolation``
    (pixels in [0, 1]), as RandomResizedCropAndInterpolationWithTwoPic."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: float, color_jitter: float, interpolation: str,
                 second_size: int | None = None, second_interpolation: str = "lanczos") -> None:
        self.size, self.scale, self.hflip = size, scale, hflip
        self.jitter = transforms.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
        self.interp = transforms.InterpolationMode(interpolation)
        self.second_size = second_size
        self.second_interp = transforms.InterpolationMode(second_interpolation)
        self.norm = normalize()

    def __call__(self, img: Image.Image) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.jitter is not None:
            img = self.jitter(img)
        if torch.rand(()) < self.hflip:
            img = TF.hflip(img)
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), [3 / 4, 4 / 3])
        main = self.norm(TF.to_tensor(TF.resized_crop(img, i, j, h, w, [self.size, self.size], self.interp)))
        if self.second_size is None:
            return main
        second = TF.resized_crop(img, i, j, h, w, [self.second_size, self.second_size], self.second_interp)
        return main, TF.to_tensor(second)


def beit_init_(module: nn.Module, blocks: nn.ModuleList, std: float = 0.02) -> None:
    """modeling_pretrain.py's initialisation (see the module docstring)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std, a=-std, b=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))


class BEiT(BEiTSpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p, m = self.params, cfg["model"]
        img = cfg["data"]["img_size"]
        self.patch = m["patch_size"]
        self.grid = img // self.patch
        length = self.grid * self.grid
        if not m.get("class_token", True):
            raise ConfigError("BEiT feeds a cls token; set model.class_token=true")
        if p["shared_rel_pos"] and m.get("rel_pos") != "bias":
            raise ConfigError("method.shared_rel_pos=true needs model.rel_pos=bias (or method.shared_rel_pos=false)")
        if not 1 <= p["num_mask_patches"] < length:
            raise ConfigError(f"method.num_mask_patches={p['num_mask_patches']} must be in [1, {length}) for the "
                              f"{self.grid}x{self.grid} patch grid")
        self.windowed = p["num_windows"] > 0
        self.k = p["window_size"]
        if self.windowed and self.k > self.grid:
            raise ConfigError(f"method.window_size={self.k} exceeds the {self.grid}x{self.grid} patch grid; "
                              "pass a smaller method.window_size")
        # Masking geometry on the masked grid (the image, or one K x K window: same fraction, area-scaled blocks).
        side = self.k if self.windowed else self.grid
        area = side * side / length
        self.mask_side = side
        self.num_mask = max(1, round(p["num_mask_patches"] * area))
        self.min_block = max(1, round(p["min_block"] * area))
        self.max_block = None if p["max_block"] is None else max(1, round(p["max_block"] * area))
        if self.num_mask >= side * side:
            raise ConfigError(f"method.num_mask_patches={p['num_mask_patches']} masks a whole {side}x{side} window")

        self.encoder = create_vit(m, img, num_classes=0)
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, p["vocab_size"])
        self.tokenizer = build_tokenizer(p, self.patch)
        beit_init_(self, self.encoder.blocks)
        std = 0.02
        for t in (self.encoder.cls_token, self.mask_token):
            trunc_normal_(t, std=std, a=-std, b=std)
        if p["shared_rel_pos"]:
            nn.init.zeros_(share_rel_pos_table(self.encoder))
        else:
            for a in self.encoder.modules():
                if isinstance(a, RelPosAttention):
                    nn.init.zeros_(a.rel_table)

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """No weight decay on biases, norms, LayerScale and the cls token (BEiT's skip list: pos_embed, cls_token)."""
        return param_groups_weight_decay(self, optim["weight_decay"],
                                         no_weight_decay_list=("encoder.cls_token", "encoder.pos_embed"))

    def train_transform(self) -> Callable[[Any], Any] | None:
        d = self.cfg["data"]
        return TwoViewCrop(d["img_size"], tuple(d["crop_scale"]), d["hflip"], float(self.params["color_jitter"]),
                           d.get("interpolation", "bicubic"), self.tokenizer.view_size(self.grid),
                           self.params["second_interpolation"])

    # -- tokenizer ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit_tokenizer(self, imgs: torch.Tensor | None = None) -> None:
        """Fit the k-means codebook on ``imgs`` (encoder inputs) or, by default, on ``kmeans_images`` training images
        (seeded choice, evaluation crop), then share rank 0's codebook with every rank."""
        tok = self.tokenizer
        if not isinstance(tok, KMeansTokenizer):
            return
        seed = int(self.cfg.get("seed", 0))
        device = tok.codebook.device
        if imgs is None:
            from torch.utils.data import DataLoader, Subset

            from repro.data.datasets import build_split, eval_transform

            ds = build_split(self.cfg["data"], "train", eval_transform(self.cfg["data"]))
            pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:self.params["kmeans_images"]]
            loader = DataLoader(Subset(ds, pick.tolist()), batch_size=256, shuffle=False,
                                num_workers=self.cfg["train"].get("num_workers", 0))
            feats = [tok.features(x.to(device)).flatten(0, 1) for x, _ in loader]
        else:
            feats = [tok.features(imgs.to(device)).flatten(0, 1)]
        tok.fit(torch.cat(feats), seed)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(tok.codebook, 0)

    def targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder input images, visual tokens (N, L))."""
        first = batch[0]
        imgs, view = (first[0], first[1]) if isinstance(first, (list, tuple)) else (first, first)
        if not self.tokenizer.ready:
            with torch.autocast(imgs.device.type, enabled=False):
                self.fit_tokenizer()
        return imgs, self.tokenizer.encode(view)

    # -- forward -----------------------------------------------------------------------------------------------------

    def mask(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """(m, side*side) block-wise mask (1 = masked) on the image grid or on each window."""
        s = self.mask_side
        return blockwise_mask(m, s, s, self.num_mask, generator, min_num=self.min_block, max_num=self.max_block,
                              min_aspect=float(self.params["min_aspect"]))

    def encode(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``x`` (m, T, D) with the masked ones replaced, + cls, through the blocks at grid ``coords``
        (1 or m, T, 2); returns the normed patch tokens (m, T, D)."""
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return encode_at(self.encoder, x, coords)[:, 1:]

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        imgs, tokens = self.targets(batch)
        n = imgs.shape[0]
        x = self.encoder.patch_embed(imgs)  # (n, L, D)
        if self.windowed:
            coords = sample_windows(n, self.grid, self.k, self.params["num_windows"], generator,
                                    per_image=self.params["window_placement"] == "per_image")
            m, t = n * coords.shape[1], self.k * self.k
            coords = coords.reshape(m, t, 2)
            flat = (coords[..., 0] * self.grid + coords[..., 1]).reshape(n, -1)  # image n's windows, in order
            x = gather_tokens(x, flat).reshape(m, t, -1)
            tokens = torch.gather(tokens, 1, flat).reshape(m, t)
        else:
            coords = grid_coords(self.grid, self.grid, imgs.device)[None]
        mask = self.mask(x.shape[0], generator)
        out = self.encode(x, mask, coords)
        if self.speed_switch("sync_free", imgs.device):
            loss, acc = self.masked_loss_static(out, tokens, mask)
        else:
            sel = mask.bool()  # a boolean selection: its size is read back from the device
            logits = self.lm_head(out[sel])
            labels = tokens[sel]
            loss = F.cross_entropy(logits.float(), labels)
            acc = (logits.argmax(-1) == labels).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "mlm_acc": acc.detach(), "mask_ratio": mask.mean().detach()})

    def masked_loss_static(self, out: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy on the masked positions, as the boolean selection gives them, from a fixed
        ``num_mask`` positions per sequence (block-wise masking never masks more): the masked ones in raster order,
        then unmasked fillers weighted 0. Static shapes, no host sync."""
        idx = mask.argsort(dim=1, descending=True, stable=True)[:, :self.num_mask]
        w = mask.gather(1, idx).flatten()
        logits = self.lm_head(gather_tokens(out, idx)).flatten(0, 1)
        labels = tokens.gather(1, idx).flatten()
        count = w.sum()
        loss = (F.cross_entropy(logits.float(), labels, reduction="none") * w).sum() / count
        acc = ((logits.argmax(-1) == labels).float() * w).sum() / count
        return loss, acc

    def export(self) -> dict[str, torch.Tensor]:
        return with_zero_pos_embed(super().export(), self.encoder, self.grid)

    def extras(self) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        return {"tokenizer.codebook": tok.codebook.detach().cpu().clone()} if isinstance(tok, KMeansTokenizer) else {}

