"""ExtreMA (Wu et al., "Extreme Masking for Learning Instance and Distributed Visual Representations"), as
microsoft/ExtreMA implements it.

BYOL-style siamese learning where random extreme masking is the augmentation:

- encoder: a ViT on patch tokens with fixed sin-cos positions and NO cls token in the sequence (``model.class_token:
  false``); an instance head of CaiT class-attention blocks (a learned cls query attends to [cls, patches], LayerScale
  0.1) followed by the final LayerNorm gives the instance vector. Fig. 5's alternatives: ``cls_design: vit_cls`` (the
  cls token inside the ViT sequence, ``model.class_token: true``) and ``avgpool`` (LayerNorm + mean of the tokens).
- student = encoder + instance head + projector (Linear-LN-GELU x2 + Linear) + predictor (Linear-LN-GELU + Linear),
  fed ``num_masks`` disjoint random subsets of ``int(N (1 - mask_ratio))`` visible patches per image (one argsort per
  image cut into chunks), stacked along the batch; teacher = EMA copy of encoder + instance head + projector (no
  drop path, no gradient) fed every patch once.
- loss: per mask, the normalised MSE ``sum_d (q - k)^2 = 2 - 2 cos(q, k)`` between the student's prediction and the
  teacher's projection, averaged over masks (asymmetric: student -> teacher only); ``loss: infonce`` is the MoCo v3
  contrastive form (``2T * CE``, T = 0.2) of Table 6.
- EMA: ``teacher = m teacher + (1 - m) student`` with ``m = 1 - (1 - base)(1 + cos(pi t / T)) / 2`` per iteration.
  The official code applies it inside the forward, before the teacher pass of iteration t, with the student weights
  after t updates; here it runs in ``after_step(t, T)`` right after update t, which is the same sequence of teachers
  (the update at t = 0 is a no-op there) and stays correct under gradient accumulation.

The exported encoder is the student's (``export_branch``), as the official fine-tuning loads it; the official linear
probe evaluates the momentum encoder (``--eval_momentum``), available with ``export_branch: teacher``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from repro.config import ConfigError
from repro.methods.base import PretrainMethod, StepOutput
from repro.methods.specs.extrema import AUGS, ExtreMASpec
from repro.models.instance_head import InstanceHead, load_instance_head
from repro.models.mim import embed_pixels, gather_tokens, mae_init_, patch_pixels
from repro.models.vit import arch_dims, create_vit

EXTRAS_PREFIX = "instance_head."

# ----------------------------------------------------------------------------------------------------------------
# Masks, momentum, losses


def multi_mask(n: int, length: int, ratio: float, num_masks: int, generator: torch.Generator,
               disjoint: bool = True) -> torch.Tensor:
    """Visible-token indices ``(num_masks, n, int(length (1 - ratio)))``.

    ``disjoint``: one random permutation per image cut into consecutive chunks (the masks never share a visible
    token); otherwise an independent permutation per mask."""
    keep = int(length * (1 - ratio))
    if disjoint:
        noise = torch.rand(n, length, generator=generator, device=generator.device)
        ids = torch.argsort(noise, dim=1)
        return torch.stack([ids[:, i * keep:(i + 1) * keep] for i in range(num_masks)])
    noise = torch.rand(num_masks, n, length, generator=generator, device=generator.device)
    return torch.argsort(noise, dim=2)[:, :, :keep]


def momentum_at(step: int, total: int, base: float) -> float:
    """Half-cycle cosine from ``base`` (t = 0) to 1 (t = T)."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t)) * (1.0 - base)


def byol_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_d (q/|q| - k/|k|)^2`` (= 2 - 2 cos)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    return (q - k).pow(2).sum(dim=1).mean()


def _gather_all(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated (no gradient), and this rank's offset into it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x, 0
    world = torch.distributed.get_world_size()
    if world == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts), torch.distributed.get_rank() * x.shape[0]


def infonce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3: cross-entropy of ``q`` against every rank's ``k`` (its own image the positive), times ``2T``."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k_all, offset = _gather_all(k)
    logits = q @ k_all.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers, each but the last followed by LayerNorm + GELU (BYOL heads without BatchNorm)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        a = in_dim if i == 0 else hidden
        b = out_dim if i == layers - 1 else hidden
        mods.append(nn.Linear(a, b))
        if i < layers - 1:
            mods += [nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*mods)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation


class PairTransform:
    """PIL image -> (student view, teacher view), normalised tensors.

    Geometry: ``none``/``color*`` use a centre crop (resize to img/0.875); ``crop*``/``shared_crop*`` a
    RandomResizedCrop + flip. Modes ending in ``_2views``/``2colors`` augment the two branches independently (the
    shared-crop mode draws the crop once and the colour twice); the others give both branches the same view, which
    the student then masks. Colour: ColorJitter(0.4, 0.4, 0.2, 0.1) with p = ``jitter_p``, grayscale p = ``gray_p``.
    """

    def __init__(self, mode: str, img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                 interpolation: str = "bicubic", jitter_p: float = 0.8, gray_p: float = 0.2) -> None:
        if mode not in AUGS:
            raise ConfigError(f"method.aug={mode!r} is unknown; valid: {', '.join(AUGS)}")
        self.mode = mode
        interp = transforms.InterpolationMode(interpolation)
        if mode in ("none", "color", "color_2views"):
            self.geometry: Callable[[Any], Any] = transforms.Compose([
                transforms.Resize(int(round(img_size / 0.875)), interpolation=interp), transforms.CenterCrop(img_size)])
        else:
            self.geometry = transforms.Compose([
                transforms.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=interp),
                transforms.RandomHorizontalFlip(hflip)])
        self.color: Callable[[Any], Any] | None = None
        if "color" in mode:
            self.color = transforms.Compose([
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=jitter_p),
                transforms.RandomGrayscale(p=gray_p)])
        from repro.data.datasets import normalize

        self.finish = transforms.Compose([transforms.ToTensor(), normalize()])

    def _view(self, img: Any, geometry: bool = True) -> Any:
        if geometry:
            img = self.geometry(img)
        return self.color(img) if self.color is not None else img

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "shared_crop_2colors":
            base = self.geometry(img)
            return self.finish(self._view(base, False)), self.finish(self._view(base, False))
        if self.mode in ("color_2views", "crop_2views", "crop_color_2views"):
            return self.finish(self._view(img)), self.finish(self._view(img))
        view = self.finish(self._view(img))
        return view, view


# ----------------------------------------------------------------------------------------------------------------
# The method


class ExtreMA(ExtreMASpec, PretrainMethod):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        p = self.params
        model = dict(cfg["model"])
        img = cfg["data"]["img_size"]
        design = p["cls_design"]
        want_cls = design == "vit_cls"
        if bool(model.get("class_token", True)) != want_cls:
            raise ConfigError(f"method.cls_design={design} needs model.class_token={str(want_cls).lower()}")
        if model.get("rel_pos", "none") != "none":
            raise ConfigError("ExtreMA uses fixed sin-cos absolute positions; set model.rel_pos=none")
        dims = arch_dims(model)
        dim = dims["embed_dim"]

        def head() -> InstanceHead:
            return InstanceHead(dim, dims["num_heads"], dims["mlp_ratio"], p["ca_blocks"], design,
                                p["ca_layer_scale"])

        self.encoder = create_vit(model, img, num_classes=0)
        self.head = head()
        self.projector = mlp(dim, p["proj_hidden"], p["proj_dim"], 3)
        self.predictor = mlp(p["proj_dim"], p["pred_hidden"], p["proj_dim"], 2)
        # The teacher: same modules, no drop path (the official momentum encoder is built without it).
        self.t_encoder = create_vit({**model, "drop_path": 0.0}, img, num_classes=0)
        self.t_head = head()
        self.t_projector = mlp(dim, p["proj_hidden"], p["proj_dim"], 3)
        for vit in (self.encoder, self.t_encoder):
            vit.fc_norm = nn.Identity()  # unused in pretraining (would be an unused DDP parameter)
        mae_init_(self)
        if design == "cait":
            for h in (self.head, self.t_head):
                nn.init.normal_(h.cls_token, std=0.02)
        for s, t in self._pairs():
            t.load_state_dict(s.state_dict())
            t.requires_grad_(False)
        self.num_patches = self.encoder.patch_embed.num_patches
        keep = int(self.num_patches * (1 - p["mask_ratio"]))
        if keep < 1 or (p["disjoint"] and keep * p["num_masks"] > self.num_patches):
            raise ConfigError(f"method.num_masks={p['num_masks']} x {keep} visible tokens does not fit in "
                              f"{self.num_patches} patches; lower num_masks or raise mask_ratio")

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.t_encoder), (self.head, self.t_head), (self.projector, self.t_projector)]

    def train_transform(self) -> Callable[[Any], Any]:
        d = self.cfg["data"]
        return PairTransform(self.params["aug"], d["img_size"], tuple(d.get("crop_scale", (0.2, 1.0))),
                             d.get("hflip", 0.5), d.get("interpolation", "bicubic"))

    def param_groups(self, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
        """MoCo v3 / official: no weight decay on biases, norms, LayerScale, position tables and cls tokens."""
        from timm.optim import param_groups_weight_decay

        skip = [n for n, _ in self.named_parameters() if n.endswith(("cls_token", "pos_embed"))]
        return param_groups_weight_decay(self, optim["weight_decay"], no_weight_decay_list=skip)

    # -- forward ---------------------------------------------------------------------------------------------------

    def _tokens_visible(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Student pass on ``ids`` (K, B, keep) visible patches: (K*B, [1 +] keep, D) normed tokens, mask-major."""
        vit = self.encoder
        prefix = vit.cls_token is not None
        if self.speed_switch("embed_visible", imgs.device):  # the kept patches' pixels first, then the projection
            pixels = patch_pixels(vit.patch_embed, imgs)
            x = embed_pixels(vit.patch_embed, torch.cat([gather_tokens(pixels, i) for i in ids], dim=0))
            if vit.pos_embed is not None:
                x = x + vit.pos_embed[0, int(prefix):][ids.flatten(0, 1)]
        else:
            x = vit.patch_embed(imgs)
            if vit.pos_embed is not None:
                x = x + vit.pos_embed[:, int(prefix):, :]
            x = torch.cat([gather_tokens(x, i) for i in ids], dim=0)
        if prefix:
            cls = vit.cls_token if vit.pos_embed is None else vit.cls_token + vit.pos_embed[:, :1, :]
            cls = cls.expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, batch: Any, generator: torch.Generator) -> StepOutput:
        views = batch[0]
        student, teacher = (views, views) if isinstance(views, torch.Tensor) else (views[0], views[1])
        p = self.params
        k_masks = p["num_masks"]
        ids = multi_mask(student.shape[0], self.num_patches, p["mask_ratio"], k_masks, generator, p["disjoint"])
        q = self.predictor(self.projector(self.head(self._tokens_visible(student, ids))))
        with torch.no_grad():
            k = self.t_projector(self.t_head(self.t_encoder.forward_features(teacher)))
        losses = []
        for qi in q.chunk(k_masks, dim=0):
            losses.append(byol_loss(qi, k) if p["loss"] == "byol" else infonce_loss(qi, k, p["temperature"]))
        loss = torch.stack(losses).mean()
        return StepOutput(loss, {"loss": loss.detach()})

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the teacher with the momentum of iteration ``step`` (see the module docstring)."""
        m = momentum_at(step, total_steps, self.params["ema_base"])
        student = [p for s, _ in self._pairs() for p in s.parameters()]  # no_grad: no detach (one op per tensor)
        teacher = [p for _, t in self._pairs() for p in t.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    # -- evaluation ------------------------------------------------------------------------------------------------

    def _branch(self) -> tuple[nn.Module, InstanceHead]:
        if self.params["export_branch"] == "teacher":
            return self.t_encoder, self.t_head
        return self.encoder, self.head

    @torch.no_grad()
    def instance_features(self, x: torch.Tensor) -> torch.Tensor:
        """Instance vector of full images (the pretraining kNN curves), from the exported branch."""
        vit, head = self._branch()
        return head(vit.forward_features(x))

    def export(self) -> dict[str, torch.Tensor]:
        from repro.models.vit import encoder_state_dict

        return encoder_state_dict(self._branch()[0])

    def extras(self) -> dict[str, torch.Tensor]:
        head = self._branch()[1]
        return {EXTRAS_PREFIX + k: v.detach().cpu().clone() for k, v in head.state_dict().items()}

    @classmethod
    def instance_head(cls, cfg: Mapping[str, Any], extras: Mapping[str, torch.Tensor]) -> nn.Module | None:
        state = {k[len(EXTRAS_PREFIX):]: v for k, v in extras.items() if k.startswith(EXTRAS_PREFIX)}
        return load_instance_head(cfg["model"], state)
