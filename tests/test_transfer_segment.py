"""Segmentation transfer: the embedded data in ADE20K / COCO layout, the encoder -> mmseg backbone converter (key by
key, and the backbone's features equal to our encoder's), the tiny rule of segment recipes, and a real mmseg
UperNet train + eval of a few iterations (``slow``; skipped without mmsegmentation, a failure under ``$CI``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from repro.config import ConfigError, deep_merge, flatten, get, recipes_root
from repro.data import dense
from repro.data.synthetic import load_objects, rle_to_mask


def _mmseg_missing() -> str | None:
    try:
        import mmseg  # noqa: F401
        from mmengine.runner import Runner  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the framework is unusable here
        return f"mmsegmentation is not installed ({type(e).__name__}: {e}); pip install -e '.[transfer]'"
    return None


@pytest.fixture(scope="module")
def mmseg_ready() -> None:
    why = _mmseg_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dense-cache")


SIZES = {"img_size": 32, "n_train": 24, "n_val": 8, "num_classes": 6}


# ---------------------------------------------------------------------------------------------------- data layouts


def test_ade_maps_match_the_object_masks(cache: Path) -> None:
    root = dense.ensure_ade(cache, **SIZES)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["layout"] == "ade20k"
    assert meta["classes"] == ["background", "arrow", "crescent", "cross", "disk", "frame", "heart"]
    src = root.parent / meta["source"]
    for split, ade in dense.ADE_SPLITS.items():
        objs = load_objects(src, split)
        imgs = sorted((root / "images" / ade).iterdir())
        assert len(imgs) == len(objs) == SIZES[f"n_{split}"]
        for rel, lst in objs.items():
            stem = Path(rel).stem
            m = np.asarray(Image.open(root / "annotations" / ade / f"{stem}.png"))
            assert m.dtype == np.uint8 and m.shape == (32, 32)
            union = np.zeros_like(m, dtype=bool)
            for o in lst:
                mask = rle_to_mask(o["segmentation"])
                assert (m[mask] == o["category"] + 2).all()  # shape c -> ADE id c+2 -> class c+1 (reduce_zero_label)
                union |= mask
            assert ((m != dense.ADE_BACKGROUND) == union).all() and (m != dense.ADE_OTHER).all()
            assert np.array_equal(np.asarray(Image.open(root / "images" / ade / f"{stem}.png")),
                                  np.asarray(Image.open(src / rel)))
    assert dense.ensure_ade(cache, **SIZES) == root  # cached


def test_coco_layout_loads_and_scores_with_pycocotools(cache: Path) -> None:
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = dense.ensure_coco(cache, **SIZES)
    src = root.parent / json.loads((root / "meta.json").read_text())["source"]
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    objs = load_objects(src, "val")
    assert len(gt.getImgIds()) == SIZES["n_val"] and len(gt.getCatIds()) == SIZES["num_classes"]
    assert len(gt.getAnnIds()) == sum(len(v) for v in objs.values())
    for ann in gt.loadAnns(gt.getAnnIds()):
        img = gt.loadImgs(ann["image_id"])[0]
        assert (root / "val2017" / img["file_name"]).is_file()
        assert ann["area"] == gt.annToMask(ann).sum() and ann["iscrowd"] == 0
    first = objs[sorted(objs)[0]][0]
    assert np.array_equal(gt.annToMask(gt.loadAnns(gt.getAnnIds(imgIds=[1]))[0]), rle_to_mask(first["segmentation"]))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt.loadAnns(gt.getAnnIds())]
    for kind in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(dets), kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # the ground truth as detections scores a perfect AP


def test_real_roots_are_checked_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.path is not set"):
        dense.check_ade_root(None)
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no images in images/training/"):
        dense.check_ade_root(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "training" / "ADE_train_1.jpg")
    with pytest.raises(ConfigError, match=r"annotations/training/ADE_train_1.png .* is missing"):
        dense.check_ade_root(tmp_path)
    with pytest.raises(ConfigError, match="no images in train2017/"):
        dense.check_coco_root(tmp_path)
    for folder in ("train2017", "val2017"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "1.jpg")
    with pytest.raises(ConfigError, match="annotations/instances_train2017.json is missing"):
        dense.check_coco_root(tmp_path)
    with pytest.raises(ConfigError, match="cannot feed a ade20k stage"):
        dense.dense_root({"dataset": "coco", "path": str(tmp_path)}, "ade20k")


# ------------------------------------------------------------------------------------------------------- recipes


def recipe(name: str) -> dict:
    """A segment recipe at paper scale, as the suite resolves it."""
    from repro.resolve import resolve

    return resolve(name, "paper", kind="segment")


def test_recipes_hold_the_papers_settings_and_scale_to_tiny() -> None:
    from repro.config import RULES, check_keys
    from repro.resolve import resolve
    from repro.transfer.tiny import tiny_segment

    schema = deep_merge(yaml.safe_load((recipes_root() / "_common.yaml").read_text()),
                        yaml.safe_load((recipes_root() / "segment" / "_base.yaml").read_text()))
    for p in sorted((recipes_root() / "segment").glob("[!_]*.yaml")):
        raw = yaml.safe_load(p.read_text())
        raw.pop("extends", None)
        check_keys({k: v for k, v in raw.items() if k not in ("description", "source")}, schema)
    base = recipe("upernet_vit_base")
    assert (base["data"]["img_size"], base["optim"]["batch_size"], base["optim"]["iters"]) == (512, 16, 160000)
    assert (base["optim"]["lr"], base["optim"]["layer_decay"], base["optim"]["warmup_iters"]) == (1e-4, 0.65, 1500)
    assert base["model"]["out_indices"] == [3, 5, 7, 11]
    assert recipe("localmim_vit_base")["optim"]["lr"] == 4e-4
    assert recipe("localmim_vit_base")["model"]["out_indices"] == [1, 3, 9, 11]
    ex = recipe("extrema_vit_base")
    assert (ex["optim"]["iters"], ex["optim"]["layer_decay"]) == (80000, 0.85)
    for key in flatten({k: v for k, v in base.items() if k in schema and k != "tiny_overrides"}):
        RULES[key].check(key, get(base, key))
    tiny = tiny_segment(base)
    assert tiny["model"]["arch"] == "vit_micro" and tiny["model"]["patch_size"] == 4
    assert tiny["model"]["out_indices"] == [0, 1, 2, 3]
    assert (tiny["data"]["img_size"], tiny["data"]["dataset"], tiny["data"]["num_classes"]) == (32, "synthetic", 11)
    assert (tiny["optim"]["iters"], tiny["optim"]["warmup_iters"], tiny["optim"]["batch_size"]) == (400, 4, 8)
    assert tiny["optim"]["lr"] == 1e-4 and tiny["eval"]["mode"] == "whole"
    assert tiny_segment(ex)["optim"]["iters"] == 200
    # the kind's own rule is what the suite applies at tiny scale (StageKind.tiny)
    assert resolve("upernet_vit_base", "tiny", kind="segment") == {**tiny, "scale": "tiny"}


# ----------------------------------------------------------------------------------------------------- converter

# Our encoders as the methods export them (tiny sizes): MAE/LocalMIM (sin-cos, cls), BEiT (shared relative bias,
# LayerScale, no absolute table), ExtreMA (no cls token), LoMaR (contextual iRPE, no absolute table).
ENCODERS = {
    "mae": {},
    "beit": {"rel_pos": "bias", "layer_scale": 0.1, "pos_embed": "none"},
    "extrema": {"class_token": False, "global_pool": "avg"},
    "lomar": {"rel_pos": "irpe", "pos_embed": "none"},
}


def _encoder(kind: str, img: int = 32) -> tuple[dict, torch.nn.Module]:
    from repro.models.vit import create_vit

    model = {"arch": "vit_nano", "patch_size": 4, "pos_embed": "sincos", "rel_pos": "none", "layer_scale": None,
             "global_pool": "token", "class_token": True, "drop_path": 0.0, **ENCODERS[kind]}
    torch.manual_seed(0)
    vit = create_vit(model, img).eval()
    with torch.no_grad():  # relative tables, iRPE and LayerScale start at constants: make them count
        for name, p in vit.named_parameters():
            if name.endswith(("rel_table", "rpe_k", "gamma")):
                p.add_(torch.randn_like(p) * 0.2)
    return model, vit


def _export(kind: str, vit: torch.nn.Module, grid: int) -> dict:
    from repro.models.vit import encoder_state_dict

    state = encoder_state_dict(vit)
    if kind in ("beit", "lomar"):  # as their export(): an all-zero absolute table
        state["pos_embed"] = torch.zeros(1, grid * grid + 1, vit.embed_dim)
    return state


def _backbone(model: dict, crop: int, final_norm: bool = False) -> torch.nn.Module:
    from mmseg.registry import MODELS

    from repro.transfer.mmseg import backbone_kwargs, register_backbone

    register_backbone()
    kw = backbone_kwargs({**model, "out_indices": [0, 1, 2, 3], "final_norm": final_norm}, crop)
    kw.pop("init_checkpoint")
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmseg"):  # an mmdet test earlier in the process may have set mmdet's
        bb = MODELS.build(kw)
    bb.eval()  # mmseg's BEiT.train() returns None
    return bb


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("crop", [32, 48])
def test_converter_key_by_key_and_same_features(mmseg_ready: None, kind: str, crop: int) -> None:
    from repro.evals.features import load_encoder
    from repro.models.vit import create_vit
    from repro.transfer.convert import vit_to_mmseg

    model, vit = _encoder(kind)
    state = _export(kind, vit, 8)
    grid = crop // 4
    has_norm = "norm.weight" in state  # not ExtreMA's (no cls token: timm pools with fc_norm, part of the head)
    for final_norm in (False, True) if has_norm else (False,):
        conv = vit_to_mmseg(state, (grid, grid), num_heads=2, final_norm=final_norm)
        bb = _backbone(model, crop, final_norm)
        own = {k for k in bb.state_dict() if not k.endswith("relative_position_index")}
        assert set(conv.state) == own, (set(conv.state) ^ own)
        res = bb.load_state_dict(conv.state, strict=False)
        assert not res.unexpected_keys
        assert all(k.endswith("relative_position_index") for k in res.missing_keys)
        assert all(bb.state_dict()[k].shape == v.shape for k, v in conv.state.items())
    if not has_norm:
        with pytest.raises(ValueError, match="the encoder has no final norm"):
            vit_to_mmseg(state, (grid, grid), num_heads=2, final_norm=True)
    # Our encoder at the crop's resolution, loaded as every evaluation loads it (positions resampled the same way).
    ref = vit if crop == 32 else create_vit(model, crop).eval()
    if crop != 32:
        load_encoder(ref, _save(state))
    x = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        outs = bb(x)  # the last backbone built: with final_norm where the encoder has a final norm
        mids = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
        last = ref.forward_features(x)[:, ref.num_prefix_tokens:]
    for o, m in zip(outs[:3], mids[:3]):
        torch.testing.assert_close(o, m, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[3], last.transpose(1, 2).reshape(2, -1, grid, grid), atol=2e-5, rtol=1e-4)


_SAVED: list[Path] = []


def _save(state: dict) -> str:
    import tempfile

    f = Path(tempfile.mkdtemp()) / "encoder.pth"
    torch.save(state, f)
    _SAVED.append(f)
    return str(f)


def test_converter_refuses_unknown_keys() -> None:
    from repro.transfer.convert import vit_to_mmseg

    _, vit = _encoder("mae")
    state = _export("mae", vit, 8)
    state["blocks.0.attn.extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no place in the mmseg backbone: \['blocks.0.attn.extra'\]"):
        vit_to_mmseg(state, (8, 8), num_heads=2)


# ------------------------------------------------------------------------------------------- a real mmseg run


@pytest.mark.slow
def test_segment_stage_trains_evaluates_and_resumes(mmseg_ready: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.transfer.mmseg import BACKBONE_INIT, run_segment
    from repro.transfer.tiny import tiny_segment

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    model, vit = _encoder("beit")
    pre = tmp_path / "pre"
    pre.mkdir()
    torch.save(_export("beit", vit, 8), pre / "encoder.pth")
    (pre / "encoder.json").write_text(json.dumps({"method": "beit", "model": {**model, "arch": "vit_nano"},
                                                  "img_size": 32}))
    cfg = tiny_segment(recipe("upernet_vit_base"))
    cfg["init"] = str(pre / "encoder.pth")
    # 48-px crops: the 8x8 grid of the 32-px pretraining resampled to 12x12
    cfg["data"].update(synthetic_train=16, synthetic_val=4, synthetic_classes=4, num_classes=5, img_size=48,
                       resize=[192, 48])
    cfg["optim"].update(iters=2, warmup_iters=1, batch_size=2)
    cfg["train"].update(ckpt_every=1, log_every=1)
    out = tmp_path / "stage"
    res = run_segment(cfg, out)
    assert set(res["metrics"]) == {"miou", "aacc", "macc", "trivial_miou"}
    assert 0.0 <= res["metrics"]["miou"] <= 100.0 and res["accounting"]["images"] == 4
    assert (out / BACKBONE_INIT).is_file() and (out / "mmseg" / "iter_2.pth").is_file()
    notes = json.loads((out / "conversion.json").read_text())["notes"]
    assert any("relative position tables resized" in n for n in notes)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    # A longer schedule in the same folder resumes from the stage's own last checkpoint (iteration 2).
    cfg["optim"]["iters"] = 3
    res2 = run_segment(cfg, out)
    log = "".join(p.read_text() for p in (out / "mmseg").rglob("*.log"))
    assert "resumed epoch: 0, iter: 2" in log
    assert (out / "mmseg" / "iter_3.pth").is_file() and res2["accounting"]["iters"] == 3
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.slow
def test_segment_stage_on_two_processes(mmseg_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun, 2 CPU processes (gloo) through the suite's own ``--devices 2`` path: mmengine's pytorch launcher on
    the group made by the stage, per-process BN (no SyncBN kernel on the CPU), 2 images per process, mIoU from
    IoUMetric gathered across the ranks; the accounting counts both processes."""
    from repro.pipeline.execute import LocalExecutor
    from repro.pipeline.stage import RESULT, Stage
    from repro.transfer.tiny import tiny_segment

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    cfg = tiny_segment(recipe("upernet_vit_base"))
    cfg["data"].update(synthetic_train=16, synthetic_val=4, synthetic_classes=4, num_classes=5)
    cfg["optim"].update(iters=2, warmup_iters=1, batch_size=4)
    cfg["train"].update(ckpt_every=2, log_every=1)
    stage = Stage("segment", cfg)
    runs = tmp_path / "runs"
    status = LocalExecutor(devices=2, stream=False, jobs=2).run([stage], runs)
    d = stage.dir(runs)
    assert status == {stage.key: "done"}, (d / "log.txt").read_text()[-3000:] if (d / "log.txt").is_file() else status
    res = json.loads((d / RESULT).read_text())
    acct = res["accounting"]
    assert acct["world_size"] == 2 and acct["completed"] and acct["images"] == 8
    assert acct["device_s"] == pytest.approx(2 * acct["wall_s"])
    assert 0.0 <= res["metrics"]["miou"] <= 100.0
