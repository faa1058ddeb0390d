"""`repro profile --side-by-side DIR` over several official*.json files (LocalMIM / SimMIM rows), from fabricated
measurements, and benchmarks/official/bench_extra.py's record of a configuration that fails."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from repro.config import ConfigError
from repro.profile.bench import cost_key
from repro.profile.sidebyside import CONFIGS, LATER_CONFIGS, official_files, render, side_by_side, write_side_by_side
from repro.profile.tables import resolve_row

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H200"


def _official_run(config: str, batch: int, s: float) -> dict:
    return {"config": config, "mode": "default", "batch": batch, "s_per_step": s, "imgs_per_s": batch / s,
            "step_times_s": [s], "losses": [1.0], "peak_cuda_MiB": 2048.0, "device": GPU, "torch": "2.11",
            "timm": "1.0.29", "amp": "bf16", "warmup": 2, "steps": 5}


def _ours(recipe: str, img_per_s: float) -> dict:
    return {"recipe": recipe, "cost_key": cost_key(resolve_row(recipe, {})), "device": GPU,
            "precision": "bf16 autocast", "compile": True, "fused_optim": True, "batch": 128,
            "images_per_s": img_per_s, "step_time_s": 128 / img_per_s, "s_per_image": 1 / img_per_s, "mfu": 0.3,
            "mfu_peak": "989 TFLOP/s", "date": "2026-11-26", "warmup_steps": 3, "timed_steps": 10,
            "graphs_compiled": 1, "recompiles": 0, "first_step_s": 5.0, "torch": "2.11", "attention": "sdpa"}


def _job(d: Path, with_first: bool = True) -> Path:
    d.mkdir()
    if with_first:
        (d / "official.json").write_text(json.dumps({
            "runs": [_official_run("mae-224", 128, 0.05)],
            "agg": [{"config": "mae-224", "mode": "default", "s_per_step": 0.05, "batch": 128}]}))
    (d / "official-localmim.json").write_text(json.dumps({
        "runs": [_official_run("localmim-vit-224", 128, 0.1)],
        "agg": [{"config": "localmim-vit-224", "mode": "default", "s_per_step": 0.1, "batch": 128}],
        "errors": [{"config": "localmim-swin-224", "batch": 128, "error": "rc=1: boom"}]}))
    (d / "repro-on.json").write_text(json.dumps({"pretrain/localmim": _ours("localmim", 1600.0),
                                                  "pretrain/mae": _ours("mae", 2500.0)}))
    return d


def test_rows_from_several_official_files(tmp_path):
    d = _job(tmp_path / "job")
    assert [p.name for p in official_files(d)] == ["official.json", "official-localmim.json"]
    df, env = side_by_side(d)
    # the rows this job measured, in the tables' order (a failed official run counts)
    assert list(df["config"]) == ["MAE 224", "LocalMIM 224", "LocalMIM Swin-B 224"]
    assert CONFIGS[0][0] == "MAE 224"
    assert {c[0] for c in LATER_CONFIGS} >= {"LocalMIM 224", "SimMIM 224"}
    rows = df.set_index("config")
    vit = rows.loc["LocalMIM 224"]
    assert vit["official_img_per_s"] == pytest.approx(1280.0)
    assert vit["compiled_fused_over_official"] == pytest.approx(1600.0 / 1280.0)
    assert rows.loc["MAE 224", "compiled_fused_over_official"] == pytest.approx(2500.0 / 2560.0)
    assert rows.loc["LocalMIM Swin-B 224", "official_error"] == "rc=1: boom"
    assert env["device"] == GPU and env["official_files"] == ["official.json", "official-localmim.json"]
    md = render(df, env, "job")
    assert "| LocalMIM 224 | 128 | 0.1000 | 1280 | not measured | not measured | 1600 (1.25x) |" in md
    assert "| LocalMIM Swin-B 224 | — | — | failed |" in md and "config (ViT-B/16 unless named)" in md
    assert "official.json, official-localmim.json" in md and "bench_extra.py" in md


def test_only_the_later_file_and_none(tmp_path):
    d = _job(tmp_path / "job", with_first=False)
    md, _, index, _ = write_side_by_side(d, tmp_path / "out")
    assert md.name == "side-by-side-nvidia-h200-job.md" and "| LocalMIM 224 | 128 |" in md.read_text()
    assert index.name == "side-by-side-nvidia-h200.md" and "| LocalMIM 224 | [job](side-by-side-nvidia-h200-job.md)" \
        in index.read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no official\*\.json"):
        write_side_by_side(empty, tmp_path / "out")


def test_bench_extra_records_a_failing_config_and_goes_on(tmp_path):
    """Without an export the configuration fails in its child process; the parent records it under errors[]."""
    out = tmp_path / "o.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official" / "bench_extra.py"),
                        str(tmp_path / "no-export"), "--configs", "localmim-vit-224", "--batch", "1", "--warmup", "0",
                        "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1, p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["runs"] == [] and data["agg"] == []
    assert [e["config"] for e in data["errors"]] == ["localmim-vit-224"] and "models_mim" in data["errors"][0]["error"]


def test_beit_and_greenmim_rows_pair_with_our_recipes(tmp_path):
    """bench_extra.py's BEiT (ids given / + dVAE) and GreenMIM configurations pair with pretrain/beit and
    pretrain/greenmim_swin_base; MaskFeat, whose official step this job did not time, stays ours only and pairs once
    a job has it (CPU jobs); a BEiT official variant that the job did not measure adds no second row of ours."""
    d = tmp_path / "job"
    d.mkdir()
    (d / "official-extra.json").write_text(json.dumps({
        "runs": [{**_official_run("beit-224", 128, 0.08), "notes": "token ids given"},
                 _official_run("beit-224-dvae", 128, 0.1), _official_run("greenmim-swin-224", 128, 0.16)],
        "agg": []}))
    (d / "repro-others.json").write_text(json.dumps({"pretrain/beit": _ours("beit", 1920.0),
                                                      "pretrain/greenmim_swin_base": _ours("greenmim_swin_base", 960.0),
                                                      "pretrain/maskfeat": _ours("maskfeat", 2000.0)}))
    df, env = side_by_side(d)
    rows = df.set_index("config")
    assert list(df["config"]) == ["BEiT 224", "BEiT 224 (official + its dVAE)", "GreenMIM Swin-B 224", "MaskFeat 224"]
    assert rows.loc["BEiT 224", "official_img_per_s"] == pytest.approx(1600.0)
    assert rows.loc["BEiT 224", "compiled_fused_over_official"] == pytest.approx(1.2)
    assert rows.loc["BEiT 224 (official + its dVAE)", "compiled_fused_over_official"] == pytest.approx(1.5)
    assert rows.loc["GreenMIM Swin-B 224", "compiled_fused_over_official"] == pytest.approx(1.2)
    assert rows.loc["MaskFeat 224", "official_config"] == "maskfeat-224"
    assert pd.isna(rows.loc["MaskFeat 224"].get("official_img_per_s"))
    md = render(df, env, "job")
    assert "| MaskFeat 224 | — | — | CPU jobs only |" in md and "DALL-E dVAE" in md  # SlowFast: not on the GPU
    (d / "official-maskfeat.json").write_text(json.dumps({"runs": [_official_run("maskfeat-224", 128, 0.08)],
                                                           "agg": []}))
    rows = side_by_side(d)[0].set_index("config")
    assert rows.loc["MaskFeat 224", "compiled_fused_over_official"] == pytest.approx(1.25)
    (d / "official-maskfeat.json").unlink()
    (d / "official-extra.json").write_text(json.dumps({"runs": [_official_run("beit-224", 128, 0.08)], "agg": []}))
    assert list(side_by_side(d)[0]["config"]) == ["BEiT 224", "GreenMIM Swin-B 224", "MaskFeat 224"]


# -- modes, traces, logs, loaders, the per-device index ------------------------------------------------------------

def _trace(busy: float, cats: dict[str, float], wall: float) -> dict:
    return {"label": "t", "steps": 3, "wall_s_per_step": wall, "device_busy_s_per_step": busy,
            "device_idle_fraction": 1 - busy / wall, "device_s_per_step_by_category": cats,
            "table": "/root/out/traces/t.txt"}


def _modes_job(d: Path) -> Path:
    """MAE 224 at 0.05 s/step officially; ours compiled (traced), with CUDA graphs, at batch 256, and eager + fused
    with loader figures; ExtreMA x1 printed in the log only (its --json file is missing)."""
    d.mkdir()
    (d / "official.json").write_text(json.dumps({
        "runs": [_official_run("mae-224", 128, 0.05), _official_run("extrema-x1", 128, 0.1)], "agg": []}))
    compiled = {**_ours("mae", 3200.0), "trace": _trace(0.030, {"matmul": 0.012, "copy / fill": 0.006,
                                                                "attention": 0.004}, 0.048)}
    graphs = {**_ours("mae", 4000.0), "compile_mode": "reduce-overhead"}
    big = {**_ours("mae", 4800.0), "batch": 256, "step_time_s": 256 / 4800.0}
    eager = {**_ours("mae", 2800.0), "compile": False, "loader_images_per_s": 1000.0,
             "loader_jpeg_cpu_images_per_s": 1600.0, "loader_jpeg_device_images_per_s": 9600.0,
             "loader_jpeg": {"files": 64, "size": "500x375", "quality": 90, "mean_kb": 100.0, "workers": 12}}
    (d / "repro-a.json").write_text(json.dumps({"pretrain/mae": compiled}))
    (d / "repro-b256.json").write_text(json.dumps({"pretrain/mae": big}))
    (d / "repro-cg.json").write_text(json.dumps({"pretrain/mae": graphs}))
    (d / "repro-loader.json").write_text(json.dumps({"pretrain/mae": eager}))
    summary = {k: v for k, v in _ours("extrema_1mask", 1920.0).items() if k not in ("cost_key", "date")}
    (d / "log.txt").write_text("\n".join([
        "### repro-a: start (limit 9s) :: python3 -m repro profile --warmup 2 --steps 5 --json /root/out/repro-a.json",
        json.dumps(_ours("mae", 1.0), indent=2),  # its file came back: the file is the record
        "### repro-a: rc=0",
        "### repro-lost: start (limit 9s) :: python3 -m repro profile --warmup 2 --steps 5 --compile on "
        "--json /root/out/repro-lost.json extrema_1mask",
        "some warning", json.dumps(summary, indent=2), "### repro-lost: rc=0"]) + "\n")
    return d


def test_modes_are_columns_of_their_own_with_traces_and_loaders(tmp_path):
    d = _modes_job(tmp_path / "job")
    df, env = side_by_side(d)
    assert list(df["config"]) == ["MAE 224", "ExtreMA 80% x1"]
    assert env["modes"] == ["eager", "eager + fused AdamW", "compiled + fused AdamW",
                            "compiled + CUDA graphs + fused AdamW", "compiled + fused AdamW, batch 256"]
    mae = df.set_index("config").loc["MAE 224"]
    official = 128 / 0.05
    assert mae["compiled_fused_img_per_s"] == 3200.0  # batch 256 and CUDA graphs do not replace it
    assert mae["compiled_fused_over_official"] == pytest.approx(3200.0 / official)
    assert mae["compiled_cudagraphs_fused_over_official"] == pytest.approx(4000.0 / official)
    assert mae["compiled_fused_b256_img_per_s"] == 4800.0 and mae["compiled_fused_b256_batch"] == 256
    assert mae["eager_fused_img_per_s"] == 2800.0 and mae["eager_fused_from"] == "repro-loader.json"
    # idle of the timed step (128 / 3200 = 40 ms) from the traced kernels' 30 ms; the traced step's own idle kept
    assert mae["compiled_fused_device_idle_fraction"] == pytest.approx(1 - 0.030 / 0.040)
    assert mae["compiled_fused_device_idle_fraction_traced"] == pytest.approx(1 - 0.030 / 0.048)
    assert mae["compiled_fused_top_non_matmul"] == "copy / fill"
    assert mae["compiled_fused_top_non_matmul_ms"] == pytest.approx(6.0)
    ext = df.set_index("config").loc["ExtreMA 80% x1"]
    assert ext["compiled_fused_img_per_s"] == 1920.0 and ext["compiled_fused_over_official"] == pytest.approx(1.5)
    assert ext["compiled_fused_from"] == "log.txt (repro-lost.json did not come back)"
    md = render(df, env, "job")
    assert "| MAE 224 | 128 | 0.0500 | 2560 | not measured | 2800 (1.09x) | 3200 (1.25x) | 4000 (1.56x) | " \
           "4800 (1.88x) |" in md
    assert "| 1920 (1.50x)‡ |" in md and "25% | copy / fill: 6.0 |" in md
    assert "## Where the device time goes" in md and "t.txt |" in md
    loader = next(x for x in env["loaders"] if x["config"] == "MAE 224")
    assert loader["fastest"] == 4800.0 and loader["fastest_mode"] == "compiled + fused AdamW, batch 256"
    assert "| 1000 | 1600 | 9600 | 2800 | 4800 (compiled + fused AdamW, batch 256) | 0.33 | 2.00 |" in md


def test_index_takes_each_row_from_the_newest_job(tmp_path):
    old = _job(tmp_path / "a-old")
    new = _modes_job(tmp_path / "b-new")
    for f in new.glob("repro-*.json"):  # the newer job's profiles carry a later date
        data = json.loads(f.read_text())
        f.write_text(json.dumps({k: {**v, "date": "2026-11-27"} for k, v in data.items()}))
    out = write_side_by_side(old, tmp_path / "out")
    assert [p.name for p in out] == ["side-by-side-nvidia-h200-a-old.md", "side-by-side-nvidia-h200-a-old.csv",
                                     "side-by-side-nvidia-h200.md", "side-by-side-nvidia-h200.csv"]
    index = out[2].read_text()
    assert "| MAE 224 | [b-new](side-by-side-nvidia-h200-b-new.md) | 128 | 2560 | 3200 (1.25x) |" in index
    assert "| LocalMIM 224 | [a-old](side-by-side-nvidia-h200-a-old.md) | 128 | 1280 | 1600 (1.25x) |" in index
    assert "4800 (1.88x, compiled + fused AdamW, batch 256)" in index


GPU_B = ROOT / "tables" / "efficiency" / "gpu" / "h200-2026-11-26b"


def test_side_by_side_of_the_committed_second_h200_job():
    """The second H200 job: rows of both official files, ratios from the files, the modes apart, the log's ExtreMA
    summary, traces and the loader's figures."""
    df, env = side_by_side(GPU_B)
    rows = df.set_index("config")
    assert {"MAE 224", "LoMaR 224 (4 windows)", "ExtreMA 80% x1", "LocalMIM 224", "SimMIM Swin-B 192"} <= set(
        rows.index)
    official = {a["config"]: a for f in ("official.json", "official-localmim.json")
                for a in json.loads((GPU_B / f).read_text())["agg"]}
    on2 = json.loads((GPU_B / "repro-on2.json").read_text())
    b256 = json.loads((GPU_B / "repro-b256.json").read_text())
    cg = json.loads((GPU_B / "repro-cudagraphs.json").read_text())
    mae = rows.loc["MAE 224"]
    assert mae["official_img_per_s"] == pytest.approx(128 / official["mae-224"]["s_per_step"])
    assert mae["compiled_fused_over_official"] == pytest.approx(
        on2["pretrain/mae"]["images_per_s"] / mae["official_img_per_s"])
    assert mae["compiled_fused_b256_img_per_s"] == pytest.approx(b256["pretrain/mae"]["images_per_s"])
    assert mae["compiled_cudagraphs_fused_img_per_s"] == pytest.approx(cg["pretrain/mae"]["images_per_s"])
    assert mae["compiled_fused_device_idle_fraction"] == pytest.approx(
        1 - on2["pretrain/mae"]["trace"]["device_busy_s_per_step"] / on2["pretrain/mae"]["step_time_s"])
    vit = rows.loc["LocalMIM 224"]
    assert vit["compiled_fused_over_official"] == pytest.approx(
        on2["pretrain/localmim"]["images_per_s"] * official["localmim-vit-224"]["s_per_step"] / 128)
    assert rows.loc["ExtreMA 80% x1", "compiled_fused_from"].startswith("log.txt")
    loader = json.loads((GPU_B / "repro-loader.json").read_text())["pretrain/mae"]
    (x,) = env["loaders"]
    assert x["jpeg_cpu"] == loader["loader_jpeg_cpu_images_per_s"] and x["workers"] == 12
    md = render(df, env, "tables/efficiency/gpu/h200-2026-11-26b")
    assert "## Input pipeline vs the model" in md and "mae-224-b128-compiled-reduce-overhead.txt" in md


def test_a_cpu_job_compares_eager_steps_and_its_index_reads_them(tmp_path):
    """A CPU job: bench_official.py calls the device "cpu", ours names the CPU; the table says it is a CPU job with no
    target or MFU, and the device's index reads the CPU's default mode (eager) instead of the compiled one."""
    cpu = "CPU (x86_64, 2 threads)"
    d = tmp_path / "cpu-job"
    d.mkdir()
    run = {**_official_run("mae-224", 8, 2.0), "device": "cpu", "amp": "fp32", "peak_cuda_MiB": None}
    (d / "official.json").write_text(json.dumps({"runs": [run]}))
    ours = {**_ours("mae", 5.0), "device": cpu, "precision": "fp32", "compile": False, "fused_optim": False,
            "batch": 8, "mfu": None, "mfu_peak": None}
    (d / "repro-cpu.json").write_text(json.dumps({"pretrain/mae": ours}))
    df, env = side_by_side(d)
    assert env["device"] == cpu
    mae = df.set_index("config").loc["MAE 224"]
    assert mae["eager_over_official"] == pytest.approx(5.0 / 4.0)
    md = render(df, env, "cpu-job")
    assert "One CPU job" in md and "reported, not a target" in md and "no MFU" in md and "autocast" not in md
    out = write_side_by_side(d, tmp_path / "out")
    assert out[2].name.startswith("side-by-side-cpu") and out[2].suffix == ".md"
    index = out[2].read_text()
    assert "ours eager |" in index and "| MAE 224 | [cpu-job](" in index and "| 5 (1.25x) |" in index
    # bench_extra.py names the CPU as ours does: both namings in one job are still one device
    extra = {**_official_run("maskfeat-224", 8, 4.0), "device": cpu, "amp": "fp32", "peak_cuda_MiB": None}
    (d / "official-maskfeat.json").write_text(json.dumps({"runs": [extra]}))
    (d / "repro-cpu.json").write_text(json.dumps({"pretrain/mae": ours, "pretrain/maskfeat": {
        **ours, "recipe": "maskfeat", "cost_key": cost_key(resolve_row("maskfeat", {})), "images_per_s": 2.5}}))
    df, env = side_by_side(d)
    assert env["device"] == cpu
    assert df.set_index("config").loc["MaskFeat 224", "eager_over_official"] == pytest.approx(2.5 / 2.0)


def test_a_file_profile_keyed_before_a_cost_free_recipe_edit_still_beats_a_log_summary(tmp_path):
    """A recipe edit that leaves the step's cost alone (a cost-free key) re-keys the recipe; the job's file profile
    keeps its old key, and must still be the record over a log summary of the same recipe and mode."""
    d = _modes_job(tmp_path / "job")
    stale = {**json.loads((d / "repro-a.json").read_text())["pretrain/mae"], "cost_key": "0" * 16}
    (d / "repro-a.json").write_text(json.dumps({"pretrain/mae": stale}))
    log = (d / "log.txt").read_text()
    lost = {k: v for k, v in _ours("mae", 999.0).items() if k not in ("cost_key", "date")}
    (d / "log.txt").write_text(log + "\n".join([
        "### repro-gone: start (limit 9s) :: python3 -m repro profile --warmup 2 --steps 5 --compile on "
        "--json /root/out/repro-gone.json mae", json.dumps(lost, indent=2), "### repro-gone: rc=0"]) + "\n")
    mae = side_by_side(d)[0].set_index("config").loc["MAE 224"]
    assert mae["compiled_fused_img_per_s"] == 3200.0 and mae["compiled_fused_from"] == "repro-a.json"
