"""The cost profiler: FLOP counting with attention, the analytic model, projection / calibration arithmetic,
resolution scaling of LoMaR vs MAE at the papers' geometry, the cost-table writer and the CLI (micro widths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repro.profile import bench, cost, run
from repro.profile.flops import flops_per_image, method_flops_per_image
from repro.profile.tables import Calibration, CostRow, CostTable
from repro.resolve import resolve

MICRO = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
MICRO_DEC = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def _tiny_vit_cfg() -> dict:
    return {"arch": "vit_micro", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
            "drop_path": 0.0, "pos_embed": "sincos", "rel_pos": "none", "layer_scale": None, "global_pool": "token",
            "class_token": True}


def test_fused_attention_formula_registered():
    from torch.utils.flop_counter import flop_registry

    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward in flop_registry


def test_vit_step_flops_match_analytic_count_with_attention():
    """A small timm ViT (fused SDPA on the CPU): counted fwd+bwd == patch embedding + blocks, attention included;
    at these sizes attention is a third of a block, so a counter that missed it would fail."""
    from repro.models.vit import create_vit

    vit = create_vit(_tiny_vit_cfg(), 32, num_classes=0)
    x = torch.randn(3, 3, 32, 32)

    class Task(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, batch, generator):
            from repro.methods.base import StepOutput

            return StepOutput(self.vit.forward_features(batch[0]).pow(2).mean())

    counted = flops_per_image(Task(), (x, None), torch.Generator())
    n = (32 // 4) ** 2 + 1
    attn = 2 * cost.attention_flops(n, n, 32)
    analytic = cost.linear_flops(n - 1, 3 * 16, 32, input_grad=False) + 2 * cost.block_flops(n, 32, 4.0)
    assert attn / analytic > 0.2
    assert counted["total"] == pytest.approx(analytic, rel=1e-6)
    assert counted["backward"] > counted["forward"]


@pytest.mark.parametrize("recipe,extra,tol", [("mae", MICRO_DEC, 1e-6), ("lomar", [], 0.02),
                                              ("extrema_2mask", ["method.proj_hidden=64", "method.pred_hidden=64"],
                                               1e-6)])
def test_analytic_model_matches_counter(recipe, extra, tol):
    cfg = resolve(recipe, "paper", MICRO + extra + ["data.img_size=64", "model.patch_size=8"], kind="pretrain")
    counted = method_flops_per_image(cfg)["total"]
    assert counted == pytest.approx(cost.analytic_flops(cfg)["total"], rel=tol)


def test_lomar_flat_and_mae_growing_with_resolution():
    """Real geometry (patch 16, 224 / 384 / 448 px, 7x7 windows, mask 0.75 / 0.8) at micro width: LoMaR's step cost
    does not depend on the resolution for a fixed number of windows; MAE's grows faster than its token count."""
    lomar, mae = {}, {}
    for res in (224, 384, 448):
        lomar[res] = method_flops_per_image(resolve("lomar", "paper", MICRO + [f"data.img_size={res}"],
                                                    kind="pretrain"))["total"]
        mae[res] = method_flops_per_image(resolve("mae", "paper", MICRO + MICRO_DEC + [f"data.img_size={res}"],
                                                  kind="pretrain"))["total"]
    assert lomar[384] == pytest.approx(lomar[224], rel=1e-9) and lomar[448] == pytest.approx(lomar[224], rel=1e-9)
    tokens = (448 / 224) ** 2
    assert mae[448] / mae[224] > tokens and mae[384] / mae[224] > (384 / 224) ** 2


def test_projection_arithmetic():
    p = bench.project(0.5, 1000, 10, devices=2)
    assert p["epoch_hours"] == pytest.approx(0.5 * 1000 / 2 / 3600)
    assert p["total_wall_hours"] == pytest.approx(0.5 * 1000 * 10 / 2 / 3600)
    assert p["total_device_hours"] == pytest.approx(0.5 * 1000 * 10 / 3600)
    assert bench.train_images({"data": {"dataset": "imagenet1k", "train_fraction": 0.1}}) == 128117
    with pytest.raises(ValueError):
        bench.project(0.0, 1000, 10)


def test_calibration_arithmetic():
    f = bench.calibration_factor(58.0, 2000.0)
    assert bench.calibrate(2000.0, f) == pytest.approx(58.0)
    # ratios survive calibration: a row twice as slow stays twice as slow
    assert bench.calibrate(4000.0, f) / bench.calibrate(2000.0, f) == pytest.approx(2.0)
    s = bench.speedups({"ref": 10.0, "a": 4.0, "b": None}, "ref")
    assert s == {"ref": 1.0, "a": 2.5, "b": None}
    with pytest.raises(ValueError):
        bench.calibration_factor(58.0, 0.0)


def _micro_table(monkeypatch):
    ov = {k: v for k, v in (o.split("=") for o in MICRO + ["data.img_size=32", "model.patch_size=4"])}
    rows = [CostRow("MAE", "mae", {**ov, **dict(o.split("=") for o in MICRO_DEC)}, 10.0),
            CostRow("LoMaR", "lomar", {**ov, "method.window_size": 4}, 4.0),
            CostRow("BEiT", None, {}, 20.0, skip="reported only")]
    table = CostTable("lomar/t2", "lomar", "h (4xA100)", False, rows, lambda _r: "MAE", "test")
    monkeypatch.setattr(run, "cost_table", lambda _t: table)
    monkeypatch.setitem(run.CALIBRATION, "lomar", Calibration("lomar/t2", "MAE", "mae", rows[0].overrides, 10.0,
                                                              False, "test hw"))


def test_profile_table_writes_consistent_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "profiles.json"))
    _micro_table(monkeypatch)
    out = run.profile_table("lomar/t2", tmp_path, warmup=0, steps=1, batch=2, loader_workers=0, log=lambda _m: None)
    rows = {r["row"]: r for r in out["rows"]}
    mae, lomar = rows["MAE"], rows["LoMaR"]
    assert mae["measured_speedup"] == pytest.approx(1.0) and mae["calibrated_h"] == pytest.approx(10.0)
    assert lomar["paper_speedup"] == pytest.approx(2.5)
    assert lomar["measured_speedup"] == pytest.approx(mae["measured_total_device_h"] / lomar["measured_total_device_h"])
    assert lomar["calibrated_h"] == pytest.approx(10.0 / lomar["measured_speedup"])
    assert lomar["measured_total_device_h"] == pytest.approx(
        lomar["step_time_s"] / 2 * 1_281_167 * lomar["epochs"] / 3600)
    assert rows["BEiT"]["status"].startswith("not measured")
    for suffix in ("md", "csv", "json"):
        assert (tmp_path / "tables" / "lomar" / f"t2-cost.{suffix}").stat().st_size > 0
    assert (tmp_path / "plots" / "lomar" / "t2-cost.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "profiles.json").read_text())) == 2
    from repro.profile.report import efficiency_section

    sec = efficiency_section(tmp_path)
    assert "Efficiency claims: paper vs measured" in sec and "| LoMaR | MAE |" in sec and out["meta"]["date"] in sec
    assert "No cost table yet for: lomar/t1" in sec


def test_cli_profiles_a_tiny_recipe_and_plan_projection(tmp_path, monkeypatch):
    from repro.cli import main
    from repro.profile.projection import projected_hours

    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "profiles.json"))
    ov = MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"]
    rc = main(["profile", "mae", *ov, "--steps", "1", "--warmup", "0", "--batch", "2", "--loader-workers", "0"])
    assert rc == 0
    prof = next(iter(json.loads((tmp_path / "profiles.json").read_text()).values()))
    assert prof["step_time_s"] > 0 and prof["batch"] == 2 and prof["flops_per_image"] > 0
    cfg = resolve("mae", "paper", ov, kind="pretrain")
    assert projected_hours(cfg) == pytest.approx(prof["s_per_image"] * 1_281_167 * 800 / 3600)
    assert projected_hours(resolve("mae", "paper", ov + ["model.depth=2"], kind="pretrain")) is None
    assert main(["profile"]) == 2  # nothing named: a one-line error
    assert main(["profile", "lomar/t9"]) == 2


def test_flops_benchmark_table_written(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "FLOPS_CONFIGS", (("MAE", "mae", {k: v for k, v in (o.split("=") for o in
                                                                                   MICRO + MICRO_DEC)}),))
    path = run.flops_benchmark(Path(tmp_path), resolutions=(224, 448), log=lambda _m: None)
    text = path.read_text()
    assert "| MAE | 448 |" in text and "attention counted" in text


def test_stage_accounting_counts_flops_per_image():
    from repro.engine.pretrain import step_flops_per_image

    cfg = resolve("mae", "paper", MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"], kind="pretrain")
    method = bench.build_method(cfg)
    train = [(torch.randn(3, 32, 32), 0)]
    f = step_flops_per_image(method, train, torch.device("cpu"))
    assert f == pytest.approx(cost.analytic_flops(cfg)["total"], rel=1e-6)
    assert all(p.grad is None for p in method.parameters())
