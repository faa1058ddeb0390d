"""`repro profile --side-by-side DIR` over several official*.json files (LocalMIM / SimMIM rows), from fabricated
measurements, and benchmarks/official/bench_localmim.py's record of a configuration that fails."""

import json
import subprocess
import sys
from pathlib import Path

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
    # every first-job row, then only the later rows this job measured (a failed official run counts)
    assert list(df["config"]) == [c[0] for c in CONFIGS] + ["LocalMIM 224", "LocalMIM Swin-B 224"]
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
    assert "official.json, official-localmim.json" in md and "bench_localmim.py" in md


def test_only_the_later_file_and_none(tmp_path):
    d = _job(tmp_path / "job", with_first=False)
    md, _ = write_side_by_side(d, tmp_path / "out")
    assert md.name == "side-by-side-nvidia-h200.md" and "| LocalMIM 224 | 128 |" in md.read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no official\*\.json"):
        write_side_by_side(empty, tmp_path / "out")


def test_bench_localmim_records_a_failing_config_and_goes_on(tmp_path):
    """Without an export the configuration fails in its child process; the parent records it under errors[]."""
    out = tmp_path / "o.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official" / "bench_localmim.py"),
                        str(tmp_path / "no-export"), "--configs", "localmim-vit-224", "--batch", "1", "--warmup", "0",
                        "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1, p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["runs"] == [] and data["agg"] == []
    assert [e["config"] for e in data["errors"]] == ["localmim-vit-224"] and "models_mim" in data["errors"][0]["error"]
