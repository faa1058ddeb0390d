"""The device input path (``data.decode: device``, repro.data.device_input): loader workers read JPEG bytes and draw
the recipe's crops, the device decodes and augments. Its batches are shaped and normalised as the CPU path's, its
crops are RandomResizedCrop's own draws, the same seed gives the same batch with or without workers, training on it
resumes exactly, it stays out of the default stage keys, and the loader benchmark runs on a handful of JPEGs."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms

from repro.config import ConfigError
from repro.data.datasets import crop_flip_transform
from repro.data.device_input import EncodedImages, device_plan, encode_file, encoded_split, train_split
from repro.data.loader import SeededDataset
from repro.engine.dist import DistEnv
from repro.engine.fit import fit
from repro.methods.mae import MAE
from repro.profile.bench import jpeg_loader_bench, write_jpegs
from repro.resolve import resolve

CPU_DEV = torch.device("cpu")
DATA = {"img_size": 32, "crop_scale": [0.2, 1.0], "hflip": 0.5, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Eight small JPEGs (48x36, every fourth 36x48), plus one PNG and one CMYK JPEG (decoded by the worker)."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = write_jpegs(8, size=(48, 36), folder=str(folder))
    rgb = Image.open(paths[1]).convert("RGB")
    rgb.save(folder / "png.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=90)
    return [*paths, str(folder / "png.png"), str(folder / "cmyk.jpg")]


def _finish(ds: EncodedImages, items: list[Any]) -> list[Any]:
    return ds.to_device(default_collate(items), CPU_DEV)


def test_device_batch_is_shaped_and_normalised_as_the_cpu_path(jpegs: list[str]) -> None:
    plan = device_plan(None, DATA)
    ds = EncodedImages([(p, k % 3) for k, p in enumerate(jpegs)], plan)
    tf = crop_flip_transform(DATA)
    cpu = []
    for k, p in enumerate(jpegs):  # the CPU transform and the device path from the same RNG state
        torch.manual_seed(k)
        cpu.append(tf(Image.open(p).convert("RGB")))
    items = []
    for k in range(len(jpegs)):
        torch.manual_seed(k)
        items.append(ds[k])
    images, labels = _finish(ds, items)
    assert images.shape == (len(jpegs), 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [k % 3 for k in range(len(jpegs))]
    std = torch.tensor(plan.std).view(1, 3, 1, 1)
    mean = torch.tensor(plan.mean).view(1, 3, 1, 1)
    grey = images * std * 255 + mean * 255  # back to 8-bit levels: whole numbers in 0..255
    assert grey.min() >= -1e-3 and grey.max() <= 255 + 1e-3
    torch.testing.assert_close(grey, grey.round(), rtol=0, atol=1e-3)
    # Same crops and flips as the CPU path; the resize differs by at most a few grey levels (torch vs PIL bicubic).
    diff = ((images - torch.stack(cpu)) * std * 255).abs()
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_crops_are_random_resized_crop_draws() -> None:
    plan = device_plan(None, {**DATA, "crop_scale": [0.08, 1.0], "hflip": 0.3})
    img = Image.new("RGB", (500, 375))
    for seed in range(20):
        torch.manual_seed(seed)
        want = list(transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]))
        want.append(int(bool(torch.rand(1) < 0.3)))
        after = torch.rand(1)
        torch.manual_seed(seed)
        assert plan.draw(img) == [want]
        assert torch.equal(torch.rand(1), after)  # the stream advanced exactly as the CPU transform advances it


def test_plans_of_the_methods_transforms() -> None:
    from repro.methods.beit import TwoViewCrop
    from repro.methods.extrema import PairTransform

    two = device_plan(PairTransform("crop_2views", 32, (0.2, 1.0), 0.5, "bicubic"), DATA)
    assert (two.draws, two.pair, two.size, two.scale) == (2, True, (32, 32), (0.2, 1.0))
    one = device_plan(PairTransform("crop", 32), DATA)
    assert (one.draws, one.pair) == (1, True)
    img = Image.new("RGB", (64, 48))
    torch.manual_seed(0)
    draws = two.draw(img)
    torch.manual_seed(0)
    geometry = PairTransform("crop_2views", 32).geometry
    want = []
    for _ in range(2):  # crop then flip, per view, as the PairTransform's two geometry calls
        want.append([*transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]),
                     int(bool(torch.rand(1) < geometry.transforms[1].p))])
    assert draws == want
    for tf in (PairTransform("shared_crop_2colors", 32), TwoViewCrop(32, (0.2, 1.0), 0.5, 0.4, "bicubic")):
        with pytest.raises(ConfigError, match="data.decode=cpu"):
            device_plan(tf, DATA)
    with pytest.raises(ConfigError, match="bicubic or bilinear"):
        device_plan(None, {**DATA, "interpolation": "lanczos"})


def test_pair_batch_and_worker_decoded_files(jpegs: list[str]) -> None:
    from repro.methods.extrema import PairTransform

    data = Path(jpegs[-1]).read_bytes()
    payload, img = encode_file(data)
    assert payload.startswith(b"RGB8") and img.mode == "CMYK"  # decoded by the worker, as raw RGB
    assert encode_file(Path(jpegs[0]).read_bytes())[0] == Path(jpegs[0]).read_bytes()  # a JPEG travels as it is
    ds = EncodedImages([(p, 0) for p in jpegs], device_plan(PairTransform("crop", 32), DATA))
    (a, b), labels = _finish(ds, [ds[k] for k in range(len(jpegs))])
    assert a.shape == b.shape == (len(jpegs), 3, 32, 32) and torch.equal(a, b) and a is not b


def test_same_seed_same_batch_with_or_without_workers(jpegs: list[str]) -> None:
    ds = EncodedImages([(p, k) for k, p in enumerate(jpegs)], device_plan(None, DATA))
    seeded = SeededDataset(ds, seed=3)
    first = seeded.__getitems__([4, 1, 7])
    again = seeded.__getitems__([4, 1, 7])
    assert all(x[0][1].tolist() == y[0][1].tolist() for x, y in zip(first, again, strict=True))
    seeded.epoch = 1
    assert [x[0][1].tolist() for x in seeded.__getitems__([4, 1, 7])] != [x[0][1].tolist() for x in first]
    seeded.epoch = 0

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(seeded, batch_size=4, num_workers=workers, drop_last=True)
        return [ds.to_device(b, CPU_DEV)[0] for b in loader]

    serial, parallel = batches(0), batches(1)
    assert len(serial) == 2 and all(torch.equal(x, y) for x, y in zip(serial, parallel, strict=True))


def _cfg(**over: Any) -> dict[str, Any]:
    base = {"optim.epochs": 2, "optim.warmup_epochs": 0.5, "optim.batch_size": 4, "train.batch_per_device": 4,
            "data.img_size": 32, "optim.blr": 1.0e-3, "data.decode": "device"}
    base.update(over)
    return resolve("mae", "tiny", [f"{k}={v}" for k, v in base.items()])


def test_training_on_device_input_resumes_exactly(jpegs: list[str], tmp_path: Path) -> None:
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU_DEV)
    cfg = _cfg()
    ds = EncodedImages([(p, 0) for p in jpegs[:8]], device_plan(None, cfg["data"]))

    def train(c: dict[str, Any], out: Path) -> tuple[MAE, dict[str, Any]]:
        torch.manual_seed(1)
        model = MAE(c)
        return model, fit(model, ds, c, out, env=env, desc="test")

    a, acct = train(cfg, tmp_path / "a")
    assert acct["completed"] and acct["steps"] == 4
    train(_cfg(**{"train.max_steps": 1}), tmp_path / "b")
    b, _ = train(cfg, tmp_path / "b")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_switch_is_validated_split_built_and_out_of_default_keys(jpegs: list[str], tmp_path: Path) -> None:
    from repro.pipeline.stage import Stage

    cfg = resolve("mae", "tiny", kind="pretrain")
    assert cfg["data"]["decode"] == "cpu"
    with pytest.raises(ConfigError, match="data.decode"):
        resolve("mae", "tiny", ["data.decode=gpu"], kind="pretrain")
    old = copy.deepcopy(cfg)
    del old["data"]["decode"]
    assert Stage("pretrain", cfg).key == Stage("pretrain", old).key  # default: keys as before the switch
    dev = copy.deepcopy(cfg)
    dev["data"]["decode"] = "device"
    assert Stage("pretrain", dev).key != Stage("pretrain", cfg).key  # other numerics, another stage

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for k in range(2):
                with Image.open(jpegs[2 * c + k]) as im:
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=90)
                (root / split / cls / f"{k}.jpg").write_bytes(buf.getvalue())
    data = {**DATA, "dataset": "imagenet1k", "path": str(root), "decode": "device"}
    ds = train_split(data, crop_flip_transform(data))
    assert isinstance(ds, EncodedImages) and [t for _, t in ds.samples] == [0, 0, 1, 1]
    assert len(encoded_split({**data, "train_fraction": 0.5}, None)) == 2  # one image per class
    assert not isinstance(train_split({**data, "decode": "cpu"}, crop_flip_transform(data)), EncodedImages)


def test_loader_benchmark_on_a_handful_of_jpegs() -> None:
    from repro.profile.bench import build_method

    cfg = resolve("mae", "tiny", kind="pretrain")
    res = jpeg_loader_bench(build_method(cfg), cfg, 2, num_workers=0, files=4, num_batches=2)
    assert res["loader_jpeg_cpu_images_per_s"] > 0 and res["loader_jpeg_device_images_per_s"] > 0
    meta = res["loader_jpeg"]
    assert (meta["files"], meta["workers"], meta["batch"], meta["device"]) == (4, 0, 2, "cpu")
    assert 20 < meta["mean_kb"] < 400  # ImageNet-like files, not tiny test images
    assert jpeg_loader_bench(build_method(cfg), cfg, 2, num_workers=0, files=4, num_batches=2) is res  # measured once
