"""The cost profiler: FLOP counting with attention, the analytic model, projection / calibration arithmetic,
resolution scaling of LoMaR vs MAE at the papers' geometry, the cost-table writer and the CLI (micro widths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repro.models import cost as model_cost
from repro.profile import bench, cost, projection, run
from repro.profile.bench import method_flops_per_image
from repro.profile.flops import flops_per_image
from repro.profile.tables import Calibration, CostRow, CostTable, cost_suffix
from repro.resolve import resolve

MICRO = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
MICRO_DEC = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def _tiny_vit_cfg() -> dict:
    return {"arch": "vit_micro", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
            "drop_path": 0.0, "pos_embed": "sincos", "rel_pos": "none", "layer_scale": None, "global_pool": "token",
            "class_token": True}


def test_fused_attention_formula_registered():
    from torch.utils.flop_counter import flop_registry

    from repro.profile.flops import register_attention_formulas

    register_attention_formulas()  # an explicit call (count_step_flops makes it), not an import side effect
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
    attn = 2 * model_cost.attention_flops(n, n, 32)
    analytic = model_cost.linear_flops(n - 1, 3 * 16, 32, input_grad=False) + 2 * model_cost.block_flops(n, 32, 4.0)
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
    from repro.profile.projection import load_profiles

    (cpu_set,) = load_profiles(tmp_path / "profiles.json").values()
    assert len(cpu_set) == 2
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
    (cpu_set,) = json.loads((tmp_path / "profiles.json").read_text())["sets"].values()
    prof = next(iter(cpu_set.values()))
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
    from repro.pretrain import step_flops_per_image

    cfg = resolve("mae", "paper", MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"], kind="pretrain")
    method = bench.build_method(cfg)
    train = [(torch.randn(3, 32, 32), 0)]
    f = step_flops_per_image(method, train, torch.device("cpu"))
    assert f == pytest.approx(cost.analytic_flops(cfg)["total"], rel=1e-6)
    assert all(p.grad is None for p in method.parameters())


def test_profile_records_compile_recompiles_and_mfu(monkeypatch):
    """The profiler times the step as the engine runs it: with compile on, the blocks go through torch.compile
    (aot_eager here, so that it is fast on a CPU), the graphs are counted, and none is made after the first step;
    MFU = counted FLOPs per image x images/s / the device's named peak."""
    import functools

    from repro.engine import train

    torch.set_num_threads(1)
    torch._dynamo.reset()
    monkeypatch.setattr(train, "compile_blocks", functools.partial(train.compile_blocks, backend="aot_eager"))
    monkeypatch.setattr(bench, "peak_flops", lambda _d: (1e12, "test peak 1 TFLOP/s"))
    cfg = resolve("mae", "paper", MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"], kind="pretrain")
    prof = bench.profile_config(cfg, device=torch.device("cpu"), warmup=1, steps=2, batch=2, loader=False,
                                compile=True, fused_optim=True)
    assert prof["compile"] is True and prof["fused_optim"] is True and prof["compiled_blocks"] == 2
    assert prof["graphs_compiled"] >= 1 and prof["recompiles"] == 0
    assert prof["mfu"] == pytest.approx(prof["flops_per_image"] * prof["images_per_s"] / 1e12)
    assert prof["mfu_peak"] == "test peak 1 TFLOP/s"
    off = bench.profile_config(cfg, device=torch.device("cpu"), warmup=1, steps=1, batch=2, loader=False)
    assert (off["compile"], off["fused_optim"], off["graphs_compiled"]) == (False, False, 0)  # CPU default: eager
    torch._dynamo.reset()


def test_peak_flops_named_per_gpu(monkeypatch):
    assert bench.peak_flops(torch.device("cpu")) is None
    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, n=name: n)
        got = bench.peak_flops(torch.device("cuda"))
        assert (got[0] if got else None) == peak
        assert got is None or "dense bf16" in got[1]


def test_cli_json_and_switches(tmp_path, monkeypatch):
    from repro.cli import main

    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "profiles.json"))
    ov = MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"]
    out = tmp_path / "p.json"
    rc = main(["profile", "pretrain/mae", *ov, "--steps", "1", "--warmup", "0", "--batch", "2", "--no-loader",
               "--compile", "off", "--fused-optim", "on", "--json", str(out)])
    assert rc == 0  # `pretrain/NAME`: the recipe (`lomar`, `extrema` alone name a paper's tables)
    prof = json.loads(out.read_text())["pretrain/mae"]
    assert prof["recipe"] == "mae" and prof["loader_images_per_s"] is None
    assert prof["compile"] is False and prof["fused_optim"] is True
    assert prof["device"].startswith("CPU") and prof["precision"] == "fp32" and prof["mfu"] is None


def test_trace_names_what_the_step_spends_its_time_on(tmp_path, monkeypatch):
    """--trace: after the timed steps, a few steps under torch.profiler; the ops table is written and the profile
    carries the summary (on a CPU: wall time only; the device busy / idle split needs a GPU)."""
    from repro.cli import main

    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "profiles.json"))
    ov = MICRO + MICRO_DEC + ["data.img_size=32", "model.patch_size=4"]
    out = tmp_path / "p.json"
    rc = main(["profile", "pretrain/mae", *ov, "--steps", "1", "--warmup", "0", "--batch", "2", "--no-loader",
               "--trace", str(tmp_path / "tr"), "--json", str(out)])
    assert rc == 0
    t = json.loads(out.read_text())["pretrain/mae"]["trace"]
    assert t["label"] == "mae-32-b2-eager" and t["steps"] == 1 and t["wall_s_per_step"] > 0
    assert t["device_busy_s_per_step"] is None and t["device_s_per_step_by_category"] == {}
    table = (tmp_path / "tr" / "mae-32-b2-eager.txt").read_text()
    assert "aten::addmm" in table or "aten::mm" in table
    # the host's calls per step, by kind: every parameter's grad accumulated once, eager ops and autograd nodes
    kinds = t["host_calls_by_kind"]
    assert t["host_calls_per_step"] == sum(kinds.values()) and t["kernels_per_step"] is None
    assert kinds["eager ops"] > 0 and kinds["autograd"] > 0 and "compiled" not in kinds
    n_params = sum(1 for q in bench.build_method(resolve("mae", "paper", ov, kind="pretrain")).parameters()
                   if q.requires_grad)
    assert kinds["grad accumulation"] == n_params
    assert f"host calls per step: {t['host_calls_per_step']:g}" in table
    assert bench._category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert bench._category("flash_fwd_kernel") == "attention"
    assert bench._category("triton_poi_fused_add_native_layer_norm_0") == "fused pointwise / norm (triton)"
    assert bench._category("triton_per_fused__to_copy_add_native_layer_norm_1") == "fused pointwise / norm (triton)"
    assert bench._category("void at::native::unrolled_elementwise_kernel<copy_>") == "copy / fill"
    assert bench._category("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert bench._category("void at::native::vectorized_elementwise_kernel") == "pointwise / norm (eager)"


def test_trace_labels_name_every_mode_a_job_runs():
    from types import SimpleNamespace as R

    cfg = {"recipe": "localmim", "method": {"name": "localmim"}, "data": {"img_size": 224}}
    labels = {bench.trace_label(cfg, 128, R(compile=c, compile_mode=m, compile_scope=s))
              for c, m, s in [(False, None, None), (True, None, "blocks"), (True, None, "all"),
                              (True, "reduce-overhead", "blocks"), (True, "reduce-overhead", "all")]}
    assert labels == {"localmim-224-b128-eager", "localmim-224-b128-compiled", "localmim-224-b128-compiled-scope-all",
                      "localmim-224-b128-compiled-reduce-overhead",
                      "localmim-224-b128-compiled-reduce-overhead-scope-all"}


def test_host_calls_counts_top_level_events_by_kind():
    """Only events without a parent op count (their children are the same call), kernels are counted apart, and the
    counts are per step."""
    from types import SimpleNamespace as E

    parent = E(name="aten::linear", cpu_parent=None, device_type="DeviceType.CPU")
    events = [parent, E(name="aten::addmm", cpu_parent=parent, device_type="DeviceType.CPU"),
              E(name="Torch-Compiled Region: 0/0", cpu_parent=None, device_type="DeviceType.CPU"),
              E(name="TorchDynamo Cache Lookup", cpu_parent=None, device_type="DeviceType.CPU"),
              E(name="autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", cpu_parent=None,
                device_type="DeviceType.CPU"),
              E(name="autograd::engine::evaluate_function: AddmmBackward0", cpu_parent=None,
                device_type="DeviceType.CPU"),
              E(name="Optimizer.step#AdamW.step", cpu_parent=None, device_type="DeviceType.CPU"),
              E(name="sm90_xmma_gemm", cpu_parent=None, device_type="DeviceType.CUDA")] * 2
    c = bench.host_calls(events, steps=2)
    assert c["host_calls_by_kind"] == {"compiled": 2.0, "eager ops": 1.0, "grad accumulation": 1.0, "autograd": 1.0,
                                       "optimizer": 1.0}
    assert c["host_calls_per_step"] == 6.0 and c["kernels_per_step"] == 1.0


# -- stored profiles per device, the side-by-side table, per-device cost tables ------------------------------------

GPU_DIR = Path(__file__).resolve().parents[1] / "tables" / "efficiency" / "gpu" / "h200-2026-11-26"


def _prof(device: str, steps: int, s: float, compile: bool = False, key: str = "k1") -> dict:
    return {"device": device, "precision": "fp32" if device.startswith("CPU") else "bf16 autocast",
            "compile": compile, "fused_optim": compile, "timed_steps": steps, "s_per_image": s, "recipe": "mae",
            "img_size": 224, "date": "d", "cost_key": key}


def test_profiles_keyed_by_device_and_a_quick_run_keeps_the_better_one(tmp_path):
    from repro.profile.projection import load_profiles, profile_set, store_profiles

    path = tmp_path / "profiles.json"
    cpu = _prof("CPU (x86_64, 2 threads)", 5, 1.0)
    path.write_text(json.dumps({"k1": cpu}))  # the first format: cost key -> profile, read as its set
    assert load_profiles(path) == {profile_set(cpu): {"k1": cpu}}
    logs: list[str] = []
    store_profiles({"k1": _prof("NVIDIA H200", 5, 0.01)}, path, log=logs.append)
    store_profiles({"k1": _prof("NVIDIA H200", 5, 0.005, compile=True)}, path, log=logs.append)
    sets = load_profiles(path)
    assert sorted(sets) == ["CPU (x86_64, 2 threads) | fp32 | eager", "NVIDIA H200 | bf16 autocast | compiled + "
                            "fused AdamW", "NVIDIA H200 | bf16 autocast | eager"]
    assert sets["CPU (x86_64, 2 threads) | fp32 | eager"]["k1"]["s_per_image"] == 1.0  # a GPU run replaced nothing
    store_profiles({"k1": _prof("CPU (x86_64, 2 threads)", 1, 2.0)}, path, log=logs.append)  # a quick run
    assert load_profiles(path)["CPU (x86_64, 2 threads) | fp32 | eager"]["k1"]["s_per_image"] == 1.0
    assert len(logs) == 1 and "--store" in logs[0] and "5 timed steps" in logs[0]
    store_profiles({"k1": _prof("CPU (x86_64, 2 threads)", 1, 2.0)}, path, replace=True, log=logs.append)
    assert load_profiles(path)["CPU (x86_64, 2 threads) | fp32 | eager"]["k1"]["s_per_image"] == 2.0


def test_a_cuda_graphs_run_is_a_profile_set_of_its_own(tmp_path):
    """A profile measured under ``train.compile_mode=reduce-overhead`` never replaces the default mode's: the
    engine's default runs without CUDA graphs, so its projection must not read their speed."""
    from repro.profile.projection import load_profiles, store_profiles

    path = tmp_path / "profiles.json"
    store_profiles({"k1": _prof("NVIDIA H200", 5, 0.010, compile=True)}, path)
    store_profiles({"k1": {**_prof("NVIDIA H200", 5, 0.006, compile=True), "compile_mode": "reduce-overhead"}}, path,
                   replace=True)
    store_profiles({"k1": {**_prof("NVIDIA H200", 5, 0.009, compile=True), "compile_mode": "default"}}, path)
    sets = load_profiles(path)
    assert sets["NVIDIA H200 | bf16 autocast | compiled + fused AdamW"]["k1"]["s_per_image"] == 0.009  # "default"
    assert sets["NVIDIA H200 | bf16 autocast | compiled + CUDA graphs + fused AdamW"]["k1"]["s_per_image"] == 0.006
    assert len(sets) == 2


def test_projection_uses_one_device_and_refuses_to_mix(tmp_path, monkeypatch, capsys):
    from repro.config import ConfigError
    from repro.profile.projection import choose_set, projector, store_profiles

    cfg = resolve("mae", "paper", MICRO + MICRO_DEC, kind="pretrain")
    other = resolve("mae", "paper", MICRO + MICRO_DEC + ["data.img_size=448"], kind="pretrain")
    k, k2 = bench.cost_key(cfg), bench.cost_key(other)
    path = tmp_path / "profiles.json"
    store_profiles({k: _prof("CPU (x86_64, 2 threads)", 3, 1.0, key=k),
                    k2: _prof("CPU (x86_64, 2 threads)", 3, 2.0, key=k2)}, path)
    store_profiles({k: _prof("NVIDIA H200", 3, 0.01, key=k)}, path)
    store_profiles({k: _prof("NVIDIA H100 80GB HBM3", 3, 0.02, compile=True, key=k)}, path)
    proj, sets = projector([cfg, other], None, path)
    assert proj.set_name.startswith("CPU")  # covers both stages
    assert proj(cfg) == pytest.approx(1.0 * 1_281_167 * 800 / 3600) and "CPU" in proj.describe(sets)
    h200, _ = projector([cfg, other], "h200", path)
    assert h200(cfg) == pytest.approx(0.01 * 1_281_167 * 800 / 3600) and h200(other) is None  # never the CPU's
    with pytest.raises(ConfigError, match="several devices"):
        choose_set({n: {} for n in sets}, [], "NVIDIA")
    with pytest.raises(ConfigError, match="no stored profiles"):
        projector([cfg], "A100", path)
    monkeypatch.setenv("REPRO_PROFILES", str(path))
    from repro.cli import main

    assert main(["plan", "lomar/t2", "--scale", "paper", "--device", "H100"]) == 0
    out = capsys.readouterr().out
    assert "projection device: NVIDIA H100 80GB HBM3 | bf16 autocast | compiled + fused AdamW" in out
    assert main(["plan", "lomar/t2", "--scale", "paper", "--device", "NVIDIA"]) == 2  # two GPUs: refused


def test_side_by_side_from_the_committed_h200_job(tmp_path):
    """The committed H200 files give one row per paper configuration; every ratio is ours / the official code's
    images/s from those files; files of two devices are refused."""
    import pandas as pd

    from repro.config import ConfigError
    from repro.profile.sidebyside import CONFIGS, side_by_side, write_side_by_side

    df, env = side_by_side(GPU_DIR)
    assert env["device"] == "NVIDIA H200" and "989 TFLOP/s" in env["mfu_peak"] and list(df["config"]) == [
        c[0] for c in CONFIGS]
    official = {r["config"]: r for r in json.loads((GPU_DIR / "official.json").read_text())["runs"]}
    on = json.loads((GPU_DIR / "repro-on.json").read_text())["pretrain/mae"]
    mae = df.set_index("config").loc["MAE 224"]
    assert mae["official_img_per_s"] == pytest.approx(128 / official["mae-224"]["s_per_step"])
    assert mae["compiled_fused_over_official"] == pytest.approx(on["images_per_s"] / mae["official_img_per_s"])
    assert mae["compiled_recompiles"] == 0 and not pd.isna(mae["eager_fused_img_per_s"])
    assert df["compiled_fused_img_per_s"].notna().all() and df["eager_img_per_s"].notna().all()
    md, csv_path, *_ = write_side_by_side(GPU_DIR, tmp_path)
    assert md.name == "side-by-side-nvidia-h200-h200-2026-11-26.md" and "| MAE 224 | 128 |" in md.read_text()
    assert len(pd.read_csv(csv_path)) == len(CONFIGS)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("official.json", "repro-on.json"):
        (mixed / f).write_text((GPU_DIR / f).read_text())
    (mixed / "repro-x.json").write_text(json.dumps({"pretrain/mae": {**on, "device": "NVIDIA H100"}}))
    with pytest.raises(ConfigError, match="2 devices"):
        side_by_side(mixed)


def test_cost_table_rows_carry_the_jpeg_loader_figures(tmp_path):
    """A measured row carries the loader's three figures into the CSV, the markdown and a derived profile."""
    prof = {"batch": 2, "step_time_s": 0.5, "images_per_s": 4.0, "s_per_image": 0.25, "mfu": None, "compile": False,
            "recompiles": None, "flops_per_image": None, "analytic_flops_per_image": None,
            "loader_images_per_s": 11.0, "loader_jpeg_cpu_images_per_s": 22.0, "loader_jpeg_device_images_per_s": None}

    class _Stub:
        opts: dict = {}

        def get(self, cfg, log):
            return prof

    row = run._measure_row(CostRow("MAE", "mae", {}, 10.0), _Stub(), lambda _m: None)
    assert (row["loader_jpeg_cpu_images_per_s"], row["loader_jpeg_device_images_per_s"]) == (22.0, None)
    assert {"loader_jpeg_cpu_images_per_s", "loader_jpeg_device_images_per_s"} <= set(run.CSV_FIELDS)
    meta = {"table": "t", "date": "d", "device": "CPU", "precision": "fp32", "attention": "a", "torch": "2",
            "warmup": 0, "steps": 1, "batch_rule": "b", "command": "c", "source": "s", "unit": "h", "per_epoch": False,
            "calibration": {"row": "MAE", "table": "t", "paper": 1.0, "hardware": "hw", "factor": None,
                            "measured_row": "MAE"}}
    clean = {k: v for k, v in row.items() if not k.startswith("_")}
    md = run.render_markdown(meta, [clean], [])
    assert "| JPEG loader img/s, CPU path | JPEG loader img/s, device path |" in md
    assert "| 11.0 | 22.0 | — |" in md
    table = {"t/x": {"meta": {**meta, "table": "t/x", "device": "NVIDIA H200", "precision": "bf16 autocast"},
                     "rows": [{**clean, "recipe": "mae", "overrides": ""}]}}
    (tmp_path / "repro-t.json").write_text(json.dumps(table))
    (derived,) = [p for s in projection.profiles_from_json([tmp_path]).values() for p in s.values()]
    assert derived["loader_jpeg_cpu_images_per_s"] == 22.0 and derived["loader_images_per_s"] == 11.0


def test_cost_tables_per_device_named_in_the_efficiency_section(tmp_path):
    from repro.profile.report import cost_table_suffixes, efficiency_section

    assert cost_suffix("CPU (x86_64, 2 threads)") == "" and cost_suffix("NVIDIA H200") == ".nvidia-h200"
    d = tmp_path / "tables" / "lomar"
    d.mkdir(parents=True)
    row = {"row": "LoMaR", "reference": "MAE", "measured_speedup": 1.5, "paper_speedup": 2.5, "status": "measured"}
    for suffix, device in (("", "CPU (x86_64, 2 threads)"), (".nvidia-h200", "NVIDIA H200")):
        meta = {"device": device, "attention": "sdpa", "precision": "p", "date": "d", "unit": "h", "compile": False}
        (d / f"t1-cost{suffix}.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    assert cost_table_suffixes(tmp_path, "lomar/t1") == ["", ".nvidia-h200"]
    sec = efficiency_section(tmp_path)
    assert "### lomar/t1 on CPU (x86_64, 2 threads)" in sec and "### lomar/t1 on NVIDIA H200" in sec
    assert "tables/lomar/t1-cost.nvidia-h200.md" in sec


# -- host-side costs of the step: block-wise masks and LoMaR's window table on the device ---------------------------


@pytest.mark.parametrize("geom", [(64, 14, 14, 75, 16, None, 0.3), (96, 8, 8, 24, 5, None, 0.3),
                                  (64, 4, 4, 6, 1, None, 0.3), (64, 14, 14, 75, 16, 40, 0.3),
                                  (32, 14, 14, 9, 9, None, 1.0)])
def test_blockwise_mask_batched_equals_the_per_image_loop(geom):
    """The batched masking (all images at once, the device path) makes exactly the masks of the per-image loop from
    the same draws: same blocks, same count per image, same generator state afterwards."""
    from repro.models.mim import blockwise_mask

    torch.set_num_threads(1)
    n, h, w, num, lo, hi, aspect = geom
    for seed in range(3):
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        a = blockwise_mask(n, h, w, num, ga, lo, hi, aspect, batched=False)
        b = blockwise_mask(n, h, w, num, gb, lo, hi, aspect, batched=True)
        assert torch.equal(a, b)
        assert torch.equal(torch.rand(3, generator=ga), torch.rand(3, generator=gb))
        assert a.sum(1).max() <= num and a.sum(1).float().mean() >= num - 2


def test_lomar_window_assignment_built_once_per_shape():
    from repro.methods.lomar import cached_window_assignment, window_assignment

    cpu = torch.device("cpu")
    a = cached_window_assignment(6, 4, 6, cpu)
    assert a is cached_window_assignment(6, 4, 6, cpu) and torch.equal(a, window_assignment(6, 4, 6))
    with torch.inference_mode():
        b = cached_window_assignment(7, 4, 7, cpu)
    assert not b.is_inference()  # usable as a gather index in training steps later
    assert cached_window_assignment(3, 4, None, cpu).tolist() == [[0, 1, 2, 3]] * 3
