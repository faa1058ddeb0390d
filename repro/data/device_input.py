"""Input decoded and augmented on the training device (``data.decode: device``).

With ``data.decode: cpu`` (the default) loader workers decode each image with PIL and run the method's per-image
transform. With ``device`` the workers only read each file's bytes and draw the image's random crop and flip, from
the same seeded RNG, in the same order and with the same torchvision calls (``RandomResizedCrop.get_params``, then
``torch.rand(1) < p``) as the CPU transform: the crop distribution and the data stream stay the recipe's and stay
deterministic and resumable (``repro.data.loader``). The trainer then hands each batch to ``to_device``
(``EncodedImages.to_device``), which decodes the JPEGs there in one batched call (``torchvision.io.decode_jpeg``,
nvJPEG on CUDA: hardware-decoded on A100/H100/H200; libjpeg-turbo on the CPU), crops and resizes each image, flips
and normalises.

Numerics differ from the CPU path, which is why this is a switch (and part of a stage's identity): nvJPEG's IDCT and
chroma upsampling are not libjpeg-turbo's (on the CPU both decoders are libjpeg-turbo); the resize is torch's
antialiased bicubic (bilinear) on float pixels of the crop, rounded and clamped to 0..255 afterwards, where PIL
resamples bicubic in fixed point per axis, rounding after each pass. On the CPU (same decoded pixels) 224-px crops of
500x375 JPEGs differ from PIL's in ~18% of values by one grey level, rarely (<1e-5) by 2-3, mean 0.19 levels. The
crop is cut before the resize in both paths (no pixel outside the crop enters it). Not a batched ``roi_align``: the
images of a batch differ in size, and a padded batch would let padding into crops at the image's right and bottom
edges; per image the loop is three small kernels.

Covered: the RandomResizedCrop + horizontal-flip + normalise transform (MAE, LoMaR, LocalMIM, SimMIM, GreenMIM,
MaskFeat: ``crop_flip_transform``) and ExtreMA's ``crop`` / ``crop_2views`` pairs. Colour jitter (ExtreMA's default
``shared_crop_2colors``, BEiT) is not: such a recipe is refused with one line. Files that are not plain JPEGs (PNG,
CMYK JPEG) are decoded by the worker with PIL, as the CPU path would, and travel as raw RGB.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from repro.config import ConfigError

RAW = b"RGB8"  # payload header of an image the worker decoded: magic, height, width (uint32 little-endian), pixels
RESIZE_MODES = ("bicubic", "bilinear")
# ExtreMA's PairTransform modes without colour augmentation: one geometry shared by both views, or one per view.
PAIR_MODES = {"crop": 1, "crop_2views": 2}


@dataclass(frozen=True)
class DevicePlan:
    """What ``to_device`` does to each image: ``draws`` independent crop+flip views (each ``size`` (h, w) from a
    RandomResizedCrop with ``scale`` / ``ratio``, flipped with probability ``hflip``), resized with
    ``interpolation``, normalised with ``mean`` / ``std``; ``pair``: the sample is a (view, view) pair (one draw
    given twice, or two draws)."""

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    draws: int = 1
    pair: bool = False

    def draw(self, img: Any) -> list[list[int]]:
        """``[top, left, height, width, flip]`` per view of ``img`` (anything ``get_params`` reads the size of),
        drawn from the global torch RNG exactly as RandomResizedCrop then RandomHorizontalFlip draw."""
        out = []
        for _ in range(self.draws):
            i, j, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
            out.append([i, j, h, w, int(bool(torch.rand(1) < self.hflip))])
        return out


def _crop_flip(ts: Sequence[Any]) -> tuple[transforms.RandomResizedCrop, float] | None:
    """(the crop, the flip probability) of exactly [RandomResizedCrop, RandomHorizontalFlip], else None."""
    if len(ts) == 2 and isinstance(ts[0], transforms.RandomResizedCrop) \
            and isinstance(ts[1], transforms.RandomHorizontalFlip):
        return ts[0], float(ts[1].p)
    return None


def _to_tensor_normalize(ts: Sequence[Any]) -> tuple[Sequence[float], Sequence[float]] | None:
    """(mean, std) of exactly [ToTensor, Normalize], else None."""
    if len(ts) == 2 and isinstance(ts[0], transforms.ToTensor) and isinstance(ts[1], transforms.Normalize):
        return ts[1].mean, ts[1].std
    return None


def _steps(tf: Any) -> list[Any]:
    return list(getattr(tf, "transforms", None) or [])


def device_plan(tf: Callable[[Any], Any] | None, data: Mapping[str, Any]) -> DevicePlan:
    """The plan of a training transform (None: the recipe's default ``crop_flip_transform(data)``), or a one-line
    ConfigError naming why ``data.decode=device`` cannot run it."""
    if tf is None:
        from repro.data.datasets import crop_flip_transform

        tf = crop_flip_transform(data)
    steps, mode = _steps(tf), getattr(tf, "mode", None)
    geo, norm, pair, draws = _crop_flip(steps[:2]), _to_tensor_normalize(steps[2:]), False, 1
    if (geo is None or norm is None) and mode in PAIR_MODES and getattr(tf, "color", "?") is None:
        geo = _crop_flip(_steps(getattr(tf, "geometry", None)))
        norm = _to_tensor_normalize(_steps(getattr(tf, "finish", None)))
        pair, draws = True, PAIR_MODES[mode]
    if geo is None or norm is None:
        what = type(tf).__name__ + (f" (aug={mode})" if mode else "")
        raise ConfigError(f"data.decode=device runs RandomResizedCrop + flip + normalise only; this method's training "
                          f"transform is {what}: use data.decode=cpu")
    (rrc, p), (mean, std) = geo, norm
    interp = getattr(rrc.interpolation, "value", str(rrc.interpolation))
    if interp not in RESIZE_MODES:
        raise ConfigError(f"data.decode=device resizes {' or '.join(RESIZE_MODES)}, not data.interpolation={interp}; "
                          "use data.decode=cpu")
    return DevicePlan(size=(int(rrc.size[0]), int(rrc.size[1])), scale=tuple(rrc.scale), ratio=tuple(rrc.ratio),
                      hflip=p, interpolation=interp, mean=tuple(float(m) for m in mean),
                      std=tuple(float(s) for s in std), draws=draws, pair=pair)


# -- worker side: bytes and random geometry --------------------------------------------------------------------------


def _raw_payload(img: Any) -> bytes:
    """An RGB PIL image as ``RAW`` + height + width + pixels (HWC)."""
    rgb = img.convert("RGB")
    return RAW + struct.pack("<II", rgb.height, rgb.width) + rgb.tobytes()


def encode_file(data: bytes) -> tuple[bytes, Any]:
    """(payload, header-only PIL image) of a file's bytes: a plain (RGB or grey) JPEG travels as it is, anything
    else (PNG, CMYK JPEG, ...) is decoded here, with PIL as the CPU path does, and travels as raw RGB."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))  # reads the header only
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        return data, img
    img.load()
    return _raw_payload(img), img


class EncodedImages(Dataset):
    """``((payload, geometry), label)`` per image: the file's bytes (``encode_file``) and the ``DevicePlan``'s
    random draws (int64 tensor ``(draws, 5)``). A batch collates to ``[[payloads], geometry (B, draws, 5)]`` and
    ``labels``; ``to_device`` finishes it on the device. ``samples``: (path, label); ``images``: decoded PIL
    images kept in memory instead of files (the embedded data sets)."""

    def __init__(self, samples: Sequence[tuple[str, int]], plan: DevicePlan,
                 images: Sequence[Any] | None = None) -> None:
        self.samples = list(samples)
        self.plan = plan
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path, label = self.samples[index]
        if self.images is not None:
            img = self.images[index]
            payload = _raw_payload(img)
        else:
            payload, img = encode_file(Path(path).read_bytes())
        return (payload, torch.tensor(self.plan.draw(img), dtype=torch.int64)), label

    def to_device(self, batch: Any, device: torch.device) -> list[Any]:
        """A collated batch -> ``[images, labels]`` on ``device``, as the CPU transform's batch would be: images
        ``(B, 3, H, W)`` float32, normalised (a pair: a list of two)."""
        (payloads, geometry), labels = batch
        views = finish_on_device(payloads, geometry, self.plan, device)
        return [views if self.plan.pair else views[0], labels.to(device, non_blocking=True)]


def encoded_split(data: Mapping[str, Any], tf: Callable[[Any], Any] | None, seed: int = 0) -> EncodedImages:
    """The train split of ``data`` (``build_split``: the same files, classes and ``train_fraction`` subset) as an
    ``EncodedImages`` for ``tf``'s plan."""
    from repro.data.datasets import build_split

    plan = device_plan(tf, data)
    ds = build_split(data, "train", None, seed=seed)
    idx = list(ds.indices) if isinstance(ds, Subset) else None
    base = ds.dataset if isinstance(ds, Subset) else ds
    samples = [(str(p), int(t)) for p, t in base.samples]  # type: ignore[attr-defined]
    images = getattr(base, "images", None)
    if idx is not None:
        samples = [samples[i] for i in idx]
        images = [images[i] for i in idx] if images is not None else None
    return EncodedImages(samples, plan, images)


def train_split(data: Mapping[str, Any], tf: Callable[[Any], Any], seed: int = 0) -> Dataset:
    """The pretraining train split by ``data.decode``: ``cpu`` -> ``build_split`` with ``tf`` run by the loader
    workers; ``device`` -> ``encoded_split`` (the trainer finishes each batch with its ``to_device``)."""
    if data.get("decode", "cpu") == "device":
        return encoded_split(data, tf, seed)
    from repro.data.datasets import build_split

    return build_split(data, "train", tf, seed=seed)


# -- device side: decode, crop, resize, flip, normalise --------------------------------------------------------------


def _tensor(payload: bytes) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only bytes: the decoders never write to their input
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=torch.uint8)


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 images on ``device``; one batched call, then, should it fail (a JPEG nvJPEG does not take),
    one call per image with the CPU decoder as the fallback."""
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = str(device)
    with warnings.catch_warnings():  # torchvision >= 0.29 marks its decoders deprecated (TorchCodec takes over)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=dev))
        except RuntimeError:
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
                except RuntimeError:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(device))
            return out


def decode_payloads(payloads: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Payloads (``encode_file``) -> (3, H, W) uint8 images on ``device``: JPEGs in one batched decode."""
    out: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [k for k, p in enumerate(payloads) if not p.startswith(RAW)]
    if jpegs:
        for k, img in zip(jpegs, _decode_jpegs([_tensor(payloads[k]) for k in jpegs], device), strict=True):
            out[k] = img
    for k, p in enumerate(payloads):
        if p.startswith(RAW):
            h, w = struct.unpack("<II", p[4:12])
            out[k] = _tensor(p)[12:].view(h, w, 3).permute(2, 0, 1).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


_NORM: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm(plan: DevicePlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 x (mean, std) as (1, 3, 1, 1) tensors on ``device``, made once (a blocking copy would wait for the
    model's queued kernels; the other host-to-device copies here are non-blocking)."""
    key = (str(device), plan.mean, plan.std)
    if key not in _NORM:
        _NORM[key] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255  # type: ignore[assignment]
                           for v in (plan.mean, plan.std))
    return _NORM[key]


def finish_on_device(payloads: Sequence[bytes], geometry: torch.Tensor, plan: DevicePlan,
                     device: torch.device) -> list[torch.Tensor]:
    """Decode a batch on ``device`` and make each of ``plan.draws`` views (a pair from one draw: the view twice):
    per image crop ``[top:top+h, left:left+w]``, antialiased resize to ``plan.size`` (float, then rounded and
    clamped to 0..255 as an 8-bit image would be), then batched flip and normalisation. ``geometry``: (B, draws, 5)
    on the CPU."""
    images = decode_payloads(payloads, device)
    geo = geometry.tolist()
    n = len(images)
    mean, std = _norm(plan, device)
    views = []
    for v in range(plan.draws):
        out = torch.empty((n, 3, *plan.size), dtype=torch.float32, device=device)
        for b, img in enumerate(images):
            top, left, h, w, _ = geo[b][v]
            crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
            out[b] = F.interpolate(crop, size=plan.size, mode=plan.interpolation, align_corners=False,
                                   antialias=True)[0]
        out = out.clamp_(0, 255).round_()
        flip = geometry[:, v, 4].bool().to(device, non_blocking=True).view(n, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
        views.append(out.sub_(mean).div_(std))
    if plan.pair and plan.draws == 1:
        views.append(views[0].clone())
    return views
