"""Slurm times of every profiled stage kind: fine-tuning, linear probing and kNN stages projected from stored
profiles keyed by their step kind; a FLOPs estimate (named, with its own margin) where the exact configuration was
not measured on the projection's device; the cluster cap still over everything; segmentation and detection estimated
from their counted FLOPs at a published timing's rate; and the evaluation steps `repro profile` times, counted
FLOPs equal to the analytic model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from repro.config import ConfigError
from repro.pipeline import slurm
from repro.pipeline.plan import chain, eval_overrides
from repro.pipeline.slurm_resources import TimePlan, wall_text
from repro.pipeline.stage import Stage
from repro.profile.projection import ESTIMATE_MARGIN, KNN_VOTE_FLOPS, cost_key, instance_head, store_profiles
from repro.resolve import resolve

IN1K, VAL = 1_281_167, 50_000


def _prof(device: str, kind: str, s: float, key: str, flops: float | None = None, arch: str = "vit_base",
          recipe: str = "vit_base", img: int = 224) -> dict:
    return {"device": device, "device_type": "cpu" if device.startswith("CPU") else "cuda",
            "precision": "fp32" if device.startswith("CPU") else "bf16 autocast", "compile": False,
            "fused_optim": False, "timed_steps": 5, "s_per_image": s, "recipe": recipe, "img_size": img,
            "arch": arch, "kind": kind, "flops_per_image": flops, "date": "d", "cost_key": key}


def _key(stage: Stage) -> str:
    init = stage.deps.get("init")
    return cost_key(stage.cfg, init.cfg if init is not None else None)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "profiles.json"
    monkeypatch.setenv("REPRO_PROFILES", str(path))
    return path


def _stages() -> dict[str, Stage]:
    return {s.kind: s for s in chain("mae", "paper")}  # pretrain, finetune (vit_base), linear (mae), knn


def _limit(stages: dict[str, Stage], kind: str, profile: slurm.Profile | None = None, device: str | None = None):
    gpu8 = profile or slurm.load_profile("gpu8")
    plan = TimePlan.for_stages(list(stages.values()), gpu8, device)
    st = stages[kind]
    return plan.limit(st, slurm.stage_resources(st, None, gpu8))


def test_finetune_and_knn_stages_projected_from_their_profiles(env: Path) -> None:
    st = _stages()
    ft, knn = st["finetune"], st["knn"]
    store_profiles({_key(ft): _prof("NVIDIA H200", "finetune", 0.002, _key(ft)),
                    _key(knn): _prof("NVIDIA H200", "knn", 0.0005, _key(knn), recipe="default")}, env,
                   log=lambda _: None)
    lim = _limit(st, "finetune")
    wall = 0.002 * IN1K * 100 / 3600 / 8  # 100 epochs of ImageNet-1K on the stage's 8 GPUs
    assert lim.minutes == math.ceil(wall * 60 * 1.25 + 15)
    assert lim.rule == f"projected {wall_text(wall)} on NVIDIA H200 x 8 GPUs x 1.25 + 15 min start-up"
    # kNN: one pass over train + val plus the vote (2 x val x train x 768 per k, k = 20 and 200: 2e14 FLOPs), both
    # shared by the stage's 8 GPUs; no kNN profile with a FLOPs count: the vote at the stated conservative fp32 rate
    lim = _limit(st, "knn")
    forward = 0.0005 * (IN1K + VAL) / 3600
    vote_flops = 2 * VAL * IN1K * 768 * 2
    vote = vote_flops / KNN_VOTE_FLOPS / 3600
    wall = (forward + vote) / 8
    assert lim.minutes == math.ceil(wall * 60 * 1.25 + 15)
    assert lim.rule.startswith(f"projected {wall_text(wall)} on NVIDIA H200 x 8 GPUs x 1.25 + 15 min start-up (kNN "
                               f"device-hours: encoder forward {forward:.2f} h (measured) + vote {vote * 60:.1f} min "
                               f"({vote_flops:.3g} FLOPs at 10.0 TFLOP/s, a stated conservative fp32 rate")
    # a kNN profile with a FLOPs count: the vote at that forward's measured fp32 rate (here 40 TFLOP/s)
    store_profiles({_key(knn): _prof("NVIDIA H200", "knn", 0.0005, _key(knn), 20e9, recipe="default")}, env,
                   log=lambda _: None, replace=True)
    lim = _limit(st, "knn")
    wall = (forward + vote_flops / 40e12 / 3600) / 8
    assert lim.minutes == math.ceil(wall * 60 * 1.25 + 15)
    assert "at 40.0 TFLOP/s, the fp32 rate of this kNN forward, measured)" in lim.rule
    # the linear stage: no linear profile on the device, nothing to estimate from
    assert str(_limit(st, "linear")) == "time 4320 min = cluster cap of 'gpu8' (no stored profile covers this stage)"


def test_an_unmeasured_configuration_is_estimated_from_flops_and_says_so(env: Path) -> None:
    st = _stages()
    ft = st["finetune"]
    ref_cfg = resolve("vit_base", "paper", eval_overrides(resolve("mae_384", "paper", kind="pretrain"), "finetune",
                                                          "vit_base"), kind="finetune")
    ref_key = cost_key(ref_cfg)
    assert ref_key != _key(ft)
    # measured at 384 px: 3e11 FLOPs per image in 2 ms (150 TFLOP/s)
    store_profiles({ref_key: _prof("NVIDIA H200", "finetune", 0.002, ref_key, 3e11, img=384)}, env,
                   log=lambda _: None)
    from repro.profile.cost import eval_flops

    target = eval_flops(ft.cfg)
    assert target == pytest.approx(3 * 35.1e9, rel=0.01)  # ViT-B/16 at 224: 17.6 G multiply-adds forward, ~x3
    lim = _limit(st, "finetune")
    wall = target / 150e12 * IN1K * 100 / 3600 / 8
    assert lim.minutes == math.ceil(wall * 60 * 1.25 * ESTIMATE_MARGIN + 15)
    assert lim.rule == (f"estimated from FLOPs vs finetune/vit_base at 384 px (150.0 TFLOP/s): {wall_text(wall)} on "
                        "NVIDIA H200 x 8 GPUs x 1.25 x 1.5 + 15 min start-up")
    # a counted FLOPs figure of the stage's own configuration (any device's set) wins over the analytic one
    store_profiles({_key(ft): _prof("CPU (x86_64, 2 threads)", "finetune", 1.0, _key(ft), 2 * target)}, env,
                   log=lambda _: None)
    lim2 = _limit(st, "finetune")
    assert lim2.minutes == math.ceil(2 * wall * 60 * 1.25 * ESTIMATE_MARGIN + 15)
    # the cap still applies, said with the estimate it cut
    slow = slurm.Profile("slow", gpus_per_node=8, cpus_per_node=80, max_time_min=60)
    capped = _limit(st, "finetune", slow)
    assert capped.minutes == 60 and capped.rule.startswith("cluster cap of 'slow' (estimated from FLOPs vs finetune/")
    assert "the stage requeues itself at the limit" in capped.rule


def test_estimates_stay_within_the_kind_the_family_and_the_device(env: Path) -> None:
    st = _stages()
    ft = st["finetune"]
    swin = {s.kind: s for s in chain("localmim_swin_base", "paper")}
    # a ViT fine-tuning profile on the H200 and a finetune profile of the stage itself on an H100
    store_profiles({"vitref": _prof("NVIDIA H200", "finetune", 0.002, "vitref", 1e11)}, env, log=lambda _: None)
    store_profiles({_key(ft): _prof("NVIDIA H100 80GB HBM3", "finetune", 0.001, _key(ft), 5e10)}, env,
                   log=lambda _: None)
    h200 = _limit(st, "finetune", device="H200")
    assert h200.rule.startswith("estimated from FLOPs vs finetune/vit_base (50.0 TFLOP/s)")  # never the H100's
    assert _limit(st, "finetune", device="H100").rule.startswith("projected ")
    with pytest.raises(ConfigError, match="several devices"):
        _limit(st, "finetune", device="NVIDIA")
    # a Swin: no analytic count, no stored one -> the cap, saying why
    lim = _limit(swin, "finetune", device="H200")
    assert lim.minutes == 4320 and "its FLOPs per image are not known" in lim.rule
    # counted elsewhere (a CPU profile of the same configuration), but no Swin measured on the H200 to compare with
    k = _key(swin["finetune"])
    store_profiles({k: _prof("CPU (x86_64, 2 threads)", "finetune", 1.0, k, 9e10, arch="swin_base")}, env,
                   log=lambda _: None)
    lim = _limit(swin, "finetune", device="H200")
    assert lim.minutes == 4320
    assert "no measured finetune profile of a swin with a FLOPs count on NVIDIA H200" in lim.rule
    # a pretraining profile is never the reference of an evaluation (nor the reverse)
    assert "no stored profile covers this stage" in _limit(st, "linear", device="H200").rule


def test_segment_and_detect_estimated_from_their_counted_flops(env: Path) -> None:
    """No transfer step is timed: a segment / detect stage is estimated from its counted FLOPs (the file beside the
    stored profiles) at the FLOP rate of the published reference timing, on whatever device, x ESTIMATE_MARGIN; a
    recipe without a count: the cap, saying why."""
    import json

    from repro.profile.projection import TRANSFER_FLOPS, TRANSFER_REFERENCE

    st = _stages()
    k = _key(st["finetune"])
    store_profiles({k: _prof("NVIDIA H200", "finetune", 0.002, k, 1e11)}, env, log=lambda _: None)
    seg = Stage("segment", resolve("upernet_vit_base", "paper", kind="segment"))
    vitdet = Stage("detect", resolve("vitdet_vit_base", "paper", kind="detect"))
    swin = Stage("detect", resolve("mask_rcnn_swin_base_3x", "paper", kind="detect"))
    gpu8 = slurm.load_profile("gpu8")

    def limit(s: Stage):
        plan = TimePlan.for_stages([*st.values(), seg, vitdet, swin], gpu8)
        return plan.limit(s, slurm.stage_resources(s, None, gpu8))

    assert "has no count of its model" in limit(seg).rule and limit(seg).minutes == 4320
    rate = 4e12 / TRANSFER_REFERENCE["s_per_image"]  # the reference counted at 4 TFLOP per image
    rows = [{"cost_key": cost_key(s.cfg), "flops_per_image": f} for s, f in ((seg, 3.6e12), (vitdet, 4e12))]
    (env.parent / TRANSFER_FLOPS).write_text(json.dumps({"rows": rows, "reference": {
        **TRANSFER_REFERENCE, "flops_per_s": rate}}))
    lim, gpus = limit(seg), slurm.stage_resources(seg, None, gpu8).world_size
    wall = 3.6e12 / rate * 160_000 * 16 / 3600 / gpus  # 160k iterations of 16 crops
    assert lim.minutes == math.ceil(wall * 60 * 1.25 * ESTIMATE_MARGIN + 15)
    assert lim.rule.startswith(f"estimated from FLOPs at the rate of detect/vitdet_vit_base ({rate / 1e12:.1f} "
                               "TFLOP/s: 0.314 s per image published, on any GPU)")
    lim = limit(vitdet)  # the reference itself: its published time per image, 100 epochs of COCO on its 64 GPUs
    wall = TRANSFER_REFERENCE["s_per_image"] * 118_287 * 100 / 3600 / 64
    assert lim.minutes == math.ceil(wall * 60 * 1.25 * ESTIMATE_MARGIN + 15)
    assert f"{wall_text(wall)} on NVIDIA H200 x 64 GPUs" in lim.rule
    assert "has no count of its model" in limit(swin).rule  # not in the file
    # the encoder geometry a stage takes from its pretraining leaves the key (and the count) as it is; its size not
    other = {k: resolve("upernet_vit_base", "paper", ov, kind="segment")
             for k, ov in (("geometry", ["model.class_token=false", "model.rel_pos=bias", "model.layer_scale=0.1"]),
                           ("size", ["data.img_size=640"]))}
    assert cost_key(other["geometry"]) == cost_key(seg.cfg) != cost_key(other["size"])


def test_cost_keys_of_evaluations() -> None:
    """Fine-tuning keys follow what its step depends on (not epochs, lr, drop path); a linear probe on the instance
    feature is keyed by its input's head."""
    st = _stages()
    ft = st["finetune"]
    assert cost_key({**ft.cfg, "optim": {**ft.cfg["optim"], "epochs": 7, "blr": 1.0}}) == cost_key(ft.cfg)
    assert cost_key({**ft.cfg, "model": {**ft.cfg["model"], "drop_path": 0.3}}) == cost_key(ft.cfg)
    assert cost_key({**ft.cfg, "data": {**ft.cfg["data"], "img_size": 384}}) != cost_key(ft.cfg)
    assert cost_key({**ft.cfg, "kind": "linear"}) != cost_key(ft.cfg)
    ex = {s.kind: s for s in chain("extrema", "paper")}
    lin, pre = ex["linear"], ex["pretrain"]
    assert instance_head(lin.cfg, pre.cfg) == {"method": "extrema", "design": "cait", "depth": 2}
    deeper = {**pre.cfg, "method": {**pre.cfg["method"], "ca_blocks": 4}}
    assert cost_key(lin.cfg, pre.cfg) != cost_key(lin.cfg, deeper) != cost_key(lin.cfg)


MICRO_PRE = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.img_size=32", "model.patch_size=4"]


@pytest.mark.parametrize("kind,recipe,pretrain,extra", [
    ("finetune", "vit_base", "mae", []),
    ("linear", "extrema", "extrema", ["method.proj_hidden=64", "method.pred_hidden=64", "method.proj_dim=16"]),
    ("knn", "default", "lomar", []),  # iRPE blocks
])
def test_evaluation_steps_profiled_with_flops_equal_to_the_analytic_model(kind, recipe, pretrain, extra) -> None:
    from repro.profile.bench import profile_config
    from repro.profile.cost import eval_flops

    pre = resolve(pretrain, "paper", MICRO_PRE + extra, kind="pretrain")
    cfg = resolve(recipe, "paper", eval_overrides(pre, kind, recipe), kind=kind)
    prof = profile_config(cfg, input_cfg=pre, warmup=0, steps=1, batch=2)
    assert prof["kind"] == kind and prof["cost_key"] == cost_key(cfg, pre) and prof["step_time_s"] > 0
    assert prof["flops_per_image"] == pytest.approx(eval_flops(cfg, instance_head(cfg, pre)), rel=1e-6)
    assert prof["analytic_flops_per_image"] == pytest.approx(prof["flops_per_image"], rel=1e-6)
    if kind == "knn":
        assert prof["step_runs"].startswith("fp32, eager")
    if kind == "linear":  # the instance head read from the exported input: a feature of its own width
        assert prof["instance_head"]["design"] == "cait"


def test_cli_profiles_evaluation_targets(env: Path) -> None:
    from repro.cli import main
    from repro.profile.projection import load_profiles

    micro = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.img_size=32", "model.patch_size=4"]
    assert main(["profile", "knn/default", *micro, "--steps", "1", "--warmup", "0", "--batch", "2"]) == 0
    (cpu,) = load_profiles(env).values()
    (prof,) = cpu.values()
    assert prof["kind"] == "knn" and prof["recipe"] == "default"
    assert main(["profile", "linear/extrema", *micro, "--steps", "1"]) == 2  # instance feature: name its input
    assert main(["profile", "segment/upernet_vit_base"]) == 2


@pytest.mark.parametrize(("kind", "recipe"), [("segment", "upernet_vit_base"), ("detect", "vitdet_vit_base"),
                                              ("detect", "mask_rcnn_vit_base_12ep"),
                                              ("detect", "mask_rcnn_swin_base_3x")])
def test_transfer_steps_counted_through_their_frameworks(kind: str, recipe: str) -> None:
    """`repro profile --transfer-flops` counts a synthetic training step of each framework's own model (here at
    tiny scale): a forward and a larger backward."""
    import importlib

    import torch

    from repro.profile.flops import count_loss_flops

    torch.manual_seed(0)
    cfg = resolve(recipe, "tiny", kind=kind)
    module = "mmseg" if kind == "segment" else cfg["framework"]
    loss = importlib.import_module(f"repro.transfer.{module}").synthetic_loss(cfg, 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        f = count_loss_flops(loss)
    finally:
        torch.set_num_threads(n)
    assert f["backward"] > f["forward"] > 0 and f["total"] == f["forward"] + f["backward"]
