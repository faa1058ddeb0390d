"""Detection transfer: the encoder -> detectron2 ViT and -> mmdet Swin / ViT converters (key by key, and the
backbones' features equal to our encoder's), the detect recipes and their tiny rule, the trivial AP floor, and REAL
tiny train + eval runs on detectron2 (ViTDet) and mmdet (Mask R-CNN) (``slow``; skipped only without the framework,
a failure under ``$CI``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from repro.config import ConfigError, deep_merge
from repro.models.swin import create_swin
from repro.models.vit import create_vit, encoder_state_dict, run_blocks
from repro.resolve import resolve


def _missing(*modules: str) -> str | None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - any import failure means the framework is unusable here
            return f"{m} is not usable ({type(e).__name__}: {e}); install the transfer extra (Makefile)"
    return None


def _need(*modules: str) -> None:
    why = _missing(*modules)
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def d2_ready() -> None:
    _need("detectron2.modeling", "pycocotools")


@pytest.fixture(scope="module")
def mmdet_ready() -> None:
    _need("mmdet.models", "mmengine.runner", "pycocotools")


# ------------------------------------------------------------------------------------------------------- recipes


def recipe(name: str) -> dict:
    """A detect recipe at paper scale, as the suite resolves it."""
    return resolve(name, "paper", kind="detect")


def tiny(name: str, **over: dict) -> dict:
    return deep_merge(resolve(name, "tiny", kind="detect"), over)


RECIPES = ("vitdet_vit_base", "lomar_vitdet_25ep", "mask_rcnn_swin_base_3x", "mask_rcnn_vit_base_12ep")


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("tiny_overrides",):
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_recipes_hold_the_papers_settings_and_scale_to_tiny() -> None:
    schema = _keys(recipe("vitdet_vit_base")) - {"extends"}
    for name in RECIPES:
        cfg = recipe(name)
        assert _keys(cfg) <= schema | {"extends"}, name  # no key outside _common + detect/_base
        t = tiny(name)
        assert t["data"]["dataset"] == "synthetic" and t["data"]["img_size"] == (32 if "swin" in name else 64)
        assert t["model"]["arch"] in ("vit_micro", "swin_micro") and t["optim"]["batch_size"] <= 8
    v = recipe("vitdet_vit_base")
    assert v["framework"] == "detectron2" and v["optim"]["epochs"] == 100 and v["optim"]["batch_size"] == 64
    assert v["optim"]["layer_decay"] == 0.7 and v["detect"]["global_blocks"] == [2, 5, 8, 11]
    assert v["detect"]["window_size"] == 14 and v["data"]["img_size"] == 1024
    assert recipe("lomar_vitdet_25ep")["optim"]["epochs"] == 25
    s = recipe("mask_rcnn_swin_base_3x")
    assert s["framework"] == "mmdet" and s["optim"]["epochs"] == 36 and s["optim"]["lr"] == 1e-4
    assert s["optim"]["weight_decay"] == 0.05 and [round(f * 36) for f in s["optim"]["steps"]] == [27, 33]
    e = recipe("mask_rcnn_vit_base_12ep")
    assert e["framework"] == "mmdet" and e["optim"]["epochs"] == 12


def test_unknown_framework_is_one_line() -> None:
    from repro.transfer.detect import run_detect

    with pytest.raises(ConfigError, match="unknown detect framework 'yolo'; valid: detectron2, mmdet"):
        run_detect({"framework": "yolo"}, Path("/nonexistent"))


# ----------------------------------------------------------------------------------------- detectron2 converter

VIT_CASES = {
    "plain": {"arch": "vit_micro", "patch_size": 4, "class_token": False},
    "layer_scale": {"arch": "vit_micro", "patch_size": 4, "class_token": False, "layer_scale": 0.1},
    "irpe": {"arch": "vit_micro", "patch_size": 4, "class_token": False, "pos_embed": "none", "rel_pos": "irpe"},
}


def _vit(model: dict, img: int = 32) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    vit = create_vit(model, img).eval()
    for blk in vit.blocks:  # no cls token: no prefix row for the relative-position attention either
        if hasattr(blk.attn, "num_prefix"):
            blk.attn.num_prefix = vit.num_prefix_tokens
    state = encoder_state_dict(vit)
    for k in state:  # zero-initialised tables would hide a mistake: give them values
        if k.endswith(("gamma", "rpe_k")):
            state[k] = torch.randn_like(state[k]) * 0.3
    vit.load_state_dict(state, strict=False)  # the encoder state has no fc_norm (a head part)
    return vit, state


def _pre_norm_tokens(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = run_blocks(vit, vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
    return t[:, vit.num_prefix_tokens:]


@pytest.mark.parametrize("case", list(VIT_CASES))
@pytest.mark.parametrize("window", [0, 8])  # 8 = the whole 8x8 grid: the window path must equal global attention
def test_d2_converter_key_by_key_and_same_features(d2_ready: None, case: str, window: int) -> None:
    from repro.transfer.convert_d2 import NEW_KEYS, build_d2_vit, convert_vit_to_d2, load_into_d2

    vit, state = _vit(VIT_CASES[case])
    d2 = build_d2_vit(state, num_heads=2, img_size=32, window_size=window, global_blocks=[] if window else [0, 1, 2, 3])
    conv, dropped = convert_vit_to_d2(state)
    own = set(d2.state_dict())
    assert set(conv) == {k for k in own if not k.endswith(NEW_KEYS)}  # no missing, no unexpected backbone key
    assert dropped == sorted(k for k in state if k.startswith(("cls_token", "norm.")))
    holder = torch.nn.Module()
    holder.net = d2
    info = load_into_d2(holder, state, prefix="net.")
    assert len(info["new"]) == 2 * len(d2.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = _pre_norm_tokens(vit, x)
        theirs = d2.eval()(x)["last_feat"].flatten(2).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


def test_d2_converter_pos_table_and_cls_token_travel(d2_ready: None) -> None:
    """A cls-token encoder at 32 px: the table keeps its pretraining grid (+ cls row), detectron2 resamples it to a
    64-px detection grid; windows of 4 at the ViTDet blocks run."""
    from repro.transfer.convert_d2 import build_d2_vit, load_into_d2

    _, state = _vit({"arch": "vit_micro", "patch_size": 4})
    d2 = build_d2_vit(state, num_heads=2, img_size=64, window_size=4, global_blocks=[1, 3])
    assert d2.pretrain_use_cls_token and d2.pos_embed.shape == state["pos_embed"].shape
    holder = torch.nn.Module()
    holder.net = d2
    load_into_d2(holder, state, prefix="net.")
    with torch.no_grad():
        out = d2.eval()(torch.randn(1, 3, 64, 64))["last_feat"]
    assert out.shape == (1, 64, 16, 16) and torch.isfinite(out).all()


def test_d2_converter_refuses_a_shared_relative_bias(d2_ready: None) -> None:
    from repro.transfer.convert_d2 import vit_geometry

    vit = create_vit({"arch": "vit_micro", "patch_size": 4, "rel_pos": "bias"}, 32)
    with pytest.raises(ConfigError, match="framework=mmdet"):
        vit_geometry(encoder_state_dict(vit))


# --------------------------------------------------------------------------------------------- mmdet converters


def test_mm_swin_converter_key_by_key_and_same_features(mmdet_ready: None) -> None:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from repro.transfer.convert_mm import convert_swin_to_mm, mm_swin_backbone

    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    # 64 px: every stage's grid (64..8) exceeds the window, so timm shifts every other block as mmdet always does
    swin = create_swin({"arch": "swin_micro", "patch_size": 1, "window_size": 4}, 64).eval()
    state = {k: v for k, v in swin.state_dict().items() if not k.startswith("head.")}
    conv, dropped = convert_swin_to_mm(state)
    assert dropped == []
    bb = MODELS.build(mm_swin_backbone(state, window_size=4, drop_path=0.0, checkpoint=None))
    bb.eval()  # (mmdet's Swin overrides train() without returning the module)
    own = set(bb.state_dict())
    mine = {k[len("backbone."):] for k in conv}
    assert mine <= own  # nothing unexpected
    new = own - mine
    assert all(k.endswith("relative_position_index") or k.split(".")[0] in ("norm0", "norm1", "norm2") for k in new)
    bb.load_state_dict({k[len("backbone."):]: v for k, v in conv.items()}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = bb(x)[-1]  # (B, C, H, W) after norm3 = the encoder's final norm
        ours = swin.forward_features(x).permute(0, 3, 1, 2)
    torch.testing.assert_close(last, ours, atol=2e-5, rtol=1e-4)


def test_mm_vit_adapter_loads_strictly_and_gives_the_encoder_features(mmdet_ready: None, tmp_path: Path) -> None:
    from mmdet.registry import MODELS

    from repro.transfer.convert_mm import register_repro_vit

    register_repro_vit()
    vit, state = _vit({"arch": "vit_micro", "patch_size": 4})
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    bb = MODELS.build(dict(type="ReproViT", model_cfg={"arch": "vit_micro", "patch_size": 4}, img_size=32,
                           out_indices=[0, 1, 2, 3], checkpoint=str(path))).eval()
    bb.init_weights()
    assert bb.load_info["missing"] == [] and bb.load_info["unexpected"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = bb(x)
        hidden: list[torch.Tensor] = []
        run_blocks(vit, vit.norm_pre(vit._pos_embed(vit.patch_embed(x))), hidden=hidden)
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]
    torch.testing.assert_close(outs[2], hidden[2][:, 1:].transpose(1, 2).reshape(2, 64, 8, 8))
    torch.save({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}, path)
    with pytest.raises(ConfigError, match="lacks encoder weights"):
        MODELS.build(dict(type="ReproViT", model_cfg={"arch": "vit_micro", "patch_size": 4}, img_size=32,
                          out_indices=[0, 1, 2, 3], checkpoint=str(path))).init_weights()


# ------------------------------------------------------------------------------------------------ AP and stages


def test_trivial_ap_is_a_low_floor(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    from repro.data.dense import ensure_coco
    from repro.transfer.coco import trivial_ap

    root = ensure_coco(tmp_path, img_size=32, n_train=24, n_val=8, num_classes=4)
    ann = root / "annotations"
    ap = trivial_ap(ann / "instances_train2017.json", ann / "instances_val2017.json")
    assert set(ap) == {f"trivial_{p}_{k}" for p in ("box", "mask") for k in ("ap", "ap50", "ap75")}
    assert all(0.0 <= v < 30.0 for v in ap.values())


SMALL = {"data": {"synthetic_train": 16, "synthetic_val": 8}, "optim": {"epochs": 1, "batch_size": 4},
         "train": {"log_every": 1}}


def _check(res: dict) -> None:
    m = res["metrics"]
    for p in ("box", "mask", "trivial_box", "trivial_mask"):
        for k in ("ap", "ap50", "ap75"):
            assert 0.0 <= m[f"{p}_{k}"] <= 100.0
    acct = res["accounting"]
    assert acct["completed"] and acct["iterations"] == 4 and acct["precision"] == "fp32"


@pytest.mark.slow
def test_detectron2_stage_trains_evaluates_and_resumes(d2_ready: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from repro.transfer.detect import run_detect

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    cfg = tiny("lomar_vitdet_25ep", **deep_merge(SMALL, {"detect": {"checkpoint_every": 2}}))
    # the LoMaR pretraining's encoder: no absolute table, iRPE in every block
    cfg["model"].update(pos_embed="none", rel_pos="irpe")
    enc = create_vit(cfg["model"], 32)
    torch.save(encoder_state_dict(enc), tmp_path / "encoder.pth")
    cfg["init"] = str(tmp_path / "encoder.pth")
    out = tmp_path / "stage"
    res = run_detect(cfg, out)
    _check(res)
    assert (out / "d2" / "model_final.pth").is_file() and (out / "eval" / "coco_instances_results.json").is_file()
    again = run_detect(cfg, out)  # resumes after the last iteration: nothing left to train
    assert again["accounting"]["images"] == 0 and again["metrics"]["box_ap"] == res["metrics"]["box_ap"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mask_rcnn_swin_base_3x", "mask_rcnn_vit_base_12ep"])
def test_mmdet_stage_trains_and_evaluates(mmdet_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          name: str) -> None:
    from repro.transfer.detect import run_detect

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    cfg = tiny(name, **SMALL)
    res = run_detect(cfg, tmp_path / "stage")
    _check(res)
    assert res["artifacts"]["backbone"] == ("swin" if "swin" in name else "vit")
    assert json.loads(json.dumps(res["metrics"]))  # plain floats


# ----------------------------------------------------------------------------------- several processes (torchrun)


def _two_process_stage(cfg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Path]:
    """Run one detect stage on 2 CPU processes through the suite's own ``--devices 2`` path (torchrun + worker);
    (its result.json, its folder)."""
    from repro.pipeline.execute import LocalExecutor
    from repro.pipeline.stage import RESULT, Stage

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    stage = Stage("detect", cfg)
    runs = tmp_path / "runs"
    status = LocalExecutor(devices=2, stream=False, jobs=2).run([stage], runs)  # jobs=2: one thread per process
    d = stage.dir(runs)
    assert status == {stage.key: "done"}, (d / "log.txt").read_text()[-3000:] if (d / "log.txt").is_file() else status
    return json.loads((d / RESULT).read_text()), d


def _check_two(res: dict) -> None:
    import math

    acct, m = res["accounting"], res["metrics"]
    assert acct["world_size"] == 2 and acct["completed"] and acct["iterations"] == 4 and acct["images"] == 16
    assert acct["device_s"] == pytest.approx(2 * acct["wall_s"])
    for p in ("box", "mask"):
        for k in ("ap", "ap50", "ap75"):
            v = m[f"{p}_{k}"]
            assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 100.0


@pytest.mark.slow
def test_detectron2_stage_on_two_processes(d2_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun, 2 CPU processes (gloo): DDP training at 2 images per process, evaluation gathered on rank 0,
    checkpoints and metrics written by rank 0 only."""
    res, d = _two_process_stage(tiny("vitdet_vit_base", **SMALL), tmp_path, monkeypatch)
    _check_two(res)
    assert (d / "d2" / "model_final.pth").is_file() and (d / "d2_log.txt.rank1").is_file()
    dets = json.loads((d / "eval" / "coco_instances_results.json").read_text())
    assert {x["image_id"] for x in dets} == set(range(1, 9))  # both ranks' shares of the 8 val images, gathered


@pytest.mark.slow
def test_mmdet_stage_on_two_processes(mmdet_ready: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun, 2 CPU processes (gloo): mmengine's pytorch launcher on the group initialised by the stage, 2
    images per process, CocoMetric gathering on rank 0."""
    res, d = _two_process_stage(tiny("mask_rcnn_vit_base_12ep", **SMALL), tmp_path, monkeypatch)
    _check_two(res)
    assert res["artifacts"]["backbone"] == "vit" and (d / "eval" / "results.bbox.json").is_file()


@pytest.mark.parametrize("name", ["vitdet_vit_base", "mask_rcnn_vit_base_12ep"])
def test_batch_not_divisible_by_the_world_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      name: str) -> None:
    """Refused before any process group or training starts."""
    _need("detectron2.modeling" if name.startswith("vitdet") else "mmdet.models", "pycocotools")
    from repro.transfer.detect import run_detect

    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"^optim.batch_size=4 is not divisible by the world size 3$"):
        run_detect(tiny(name, **SMALL), tmp_path / "stage")


def test_mmdet_vit_layer_decay_keys() -> None:
    """ViTDet's layer-wise lr decay for the mmdet ViT (used at tiny): block i of D at decay ** (D - i), the patch /
    position / class embeddings at decay ** (D + 1), zero weight decay kept for norms and position tables."""
    pytest.importorskip("mmengine")
    from repro.transfer.mmdet import vit_layer_decay_keys

    state = encoder_state_dict(create_vit({"arch": "vit_nano", "patch_size": 4}, 32))
    keys = vit_layer_decay_keys(state, 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for name, tensor_keys in (("blocks.0.attn.qkv.weight", 0.5 ** depth),
                              (f"blocks.{depth - 1}.mlp.fc1.weight", 0.5), ("patch_embed.proj.weight",
                                                                             0.5 ** (depth + 1))):
        assert keys[f"backbone.vit.{name}"] == {"lr_mult": pytest.approx(tensor_keys), "decay_mult": 1.0}
    assert keys["backbone.vit.blocks.0.norm1.weight"]["decay_mult"] == 0.0
    assert keys["backbone.vit.pos_embed"] == {"lr_mult": pytest.approx(0.5 ** (depth + 1)), "decay_mult": 0.0}
    assert not any(k.startswith("backbone.vit.norm") for k in keys)  # the final norm: the heads' lr
