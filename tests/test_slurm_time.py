"""Slurm time limits from the cost projection: each stage's ``--time`` is its projected wall time on the one profile
set chosen for the submission (x margin + start-up, capped by the cluster), else the stated time or the cluster cap;
the dry run names the rule and the device. Also: the paper's GPUs per stage, the profile's setup lines in the script,
and planning without torch. No scheduler is asked anything (the real-cluster tests are in test_slurm_cluster.py)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repro.cli import main
from repro.config import ConfigError
from repro.pipeline import slurm
from repro.pipeline.plan import chain
from repro.pipeline.slurm_resources import TimePlan, slurm_dir, wall_text
from repro.profile.projection import cost_key, store_profiles

LOMAR_IMAGES_EPOCHS = 1_281_167 * 400  # lomar: ImageNet-1K, 400 epochs


def _prof(device: str, s: float, key: str, device_type: str = "cuda") -> dict:
    return {"device": device, "device_type": device_type, "precision": "bf16 autocast", "compile": False,
            "fused_optim": False, "timed_steps": 5, "s_per_image": s, "recipe": "lomar", "img_size": 224,
            "date": "d", "cost_key": key}


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stored profiles of LoMaR's pretraining on an H200 (0.5 ms/image; 1 ms at 384 px), an H100 (1 ms) and a CPU
    (1 s; at 224, 384 and 448 px: the set with most profiles)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "profiles.json"
    monkeypatch.setenv("REPRO_PROFILES", str(path))
    k, k384, k448 = (cost_key(chain(r, "paper")[0].cfg) for r in ("lomar", "lomar_384", "lomar_448"))
    store_profiles({k: _prof("NVIDIA H200", 0.0005, k), k384: _prof("NVIDIA H200", 0.001, k384)}, path,
                   log=lambda _: None)
    store_profiles({k: _prof("NVIDIA H100 80GB HBM3", 0.001, k)}, path, log=lambda _: None)
    store_profiles({key: _prof("CPU (x86_64, 2 threads)", 1.0, key, "cpu") for key in (k, k384, k448)}, path,
                   log=lambda _: None)

    def no_submit(*a: object, **kw: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("repro.pipeline.slurm_sched.sbatch", no_submit)
    return path


def _minutes(s_per_image: float, gpus: int, margin: float = 1.25, startup: int = 15) -> int:
    return math.ceil(s_per_image * LOMAR_IMAGES_EPOCHS / 3600 / gpus * 60 * margin + startup)


def test_a_profile_at_a_larger_batch_than_the_stage_runs_gets_the_estimate_margin(
        profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LoMaR runs at most 64 images per GPU (its train.batch_per_device); a profile measured at 128 per GPU is a lower
    bound on its time: the projection says so, --time gets x 1.5 more, and train.batch_per_device=128 removes both."""
    path = profiles
    pre = chain("lomar", "paper")[0]
    assert pre.cfg["train"]["batch_per_device"] == 64
    store_profiles({cost_key(pre.cfg): {**_prof("NVIDIA H200", 0.0005, cost_key(pre.cfg)), "batch": 128}}, path,
                   replace=True, log=lambda _: None)
    gpu8 = slurm.load_profile("gpu8")
    res = slurm.stage_resources(pre, None, gpu8)
    lim = TimePlan.for_stages([pre], gpu8).limit(pre, res)
    assert lim.minutes == _minutes(0.0005, 4, margin=1.25 * 1.5)
    assert "x 1.25 x 1.5" in str(lim) and "profiled at batch 128 per device, the stage runs at most 64" in str(lim)
    assert main(["plan", "lomar/t2", "--scale", "paper", "--device", "H200"]) == 0
    out = capsys.readouterr().out
    assert "(profiled at batch 128 per device, the stage runs at most 64" in out
    assert "of them run a smaller batch per device than their profile did: their device-h are a lower bound" in out
    big = chain("lomar", "paper", ["train.batch_per_device=128"])[0]
    assert cost_key(big.cfg) == cost_key(pre.cfg)
    lim = TimePlan.for_stages([big], gpu8).limit(big, slurm.stage_resources(big, None, gpu8))
    assert lim.minutes == _minutes(0.0005, 4) and "profiled at batch" not in str(lim)


def test_time_is_the_projection_on_the_stages_gpus_with_a_margin(profiles: Path) -> None:
    stages = chain("lomar", "paper")
    gpu8 = slurm.load_profile("gpu8")
    plan = TimePlan.for_stages(stages, gpu8)
    assert plan.projector.set_name == "NVIDIA H200 | bf16 autocast | eager"  # GPU sets only, then most profiles
    pre, ft = stages[0], stages[1]
    res = slurm.stage_resources(pre, None, gpu8)
    assert res.gpus_per_node == 4 and res.time_min is None  # LoMaR's 4 GPUs; no stated time
    hours = 0.0005 * LOMAR_IMAGES_EPOCHS / 3600 / 4
    lim = plan.limit(pre, res)
    assert lim.minutes == _minutes(0.0005, 4) < gpu8.max_time_min
    assert str(lim) == (f"time {lim.minutes} min = projected {wall_text(hours)} on NVIDIA H200 x 4 GPUs x 1.25 "
                        "+ 15 min start-up")
    # more GPUs, less wall time
    assert plan.limit(pre, slurm.Resources(nodes=2, gpus_per_node=8)).minutes == _minutes(0.0005, 16)
    # no profile of a fine-tuning stage: the cluster's cap, said so
    cap = plan.limit(ft, slurm.stage_resources(ft, None, gpu8))
    assert str(cap) == "time 4320 min = cluster cap of 'gpu8' (no stored profile covers this stage)"
    # longer than the cap: capped (the stage requeues itself at the limit)
    slow = slurm.Profile("slow", gpus_per_node=8, max_time_min=60, time_margin=2.0, time_startup_min=0)
    lim = TimePlan.for_stages(stages, slow).limit(pre, res)
    assert lim.minutes == 60 and "cluster cap of 'slow'" in lim.rule and "x 2 + 0 min" in lim.rule
    assert f"= {_minutes(0.0005, 4, 2.0, 0)} min; the stage requeues itself" in lim.rule


def test_one_profile_set_per_submission(profiles: Path) -> None:
    stages = chain("lomar", "paper")
    gpu8 = slurm.load_profile("gpu8")
    pre, res = stages[0], slurm.stage_resources(stages[0], None, gpu8)
    h100 = TimePlan.for_stages(stages, gpu8, "h100")
    assert h100.projector.device == "NVIDIA H100 80GB HBM3"
    assert h100.limit(pre, res).minutes == _minutes(0.001, 4)
    assert "projection device: NVIDIA H100 80GB HBM3" in h100.describe()
    with pytest.raises(ConfigError, match="several devices"):
        TimePlan.for_stages(stages, gpu8, "NVIDIA")
    with pytest.raises(ConfigError, match="no stored profiles on a device matching 'A100'"):
        TimePlan.for_stages(stages, gpu8, "A100")
    # a CPU set, named: never a GPU stage's time
    cpu = TimePlan.for_stages(stages, gpu8, "CPU")
    assert str(cpu.limit(pre, res)) == ("time 4320 min = cluster cap of 'gpu8' (the projection's device CPU (x86_64, "
                                        "2 threads) is not a GPU)")
    # a cluster whose GPUs are not the projection's: said in the dry run's lines
    a100 = slurm.Profile("a100s", gpus_per_node=8, gpu_type="a100", max_time_min=4320)
    assert "asks for a100 GPUs; the projection is from NVIDIA H200" in TimePlan.for_stages(stages, a100).describe()
    # nothing stored: today's behaviour
    profiles.unlink()
    none = TimePlan.for_stages(stages, gpu8)
    assert none.limit(pre, res).minutes == 4320 and "no stored profiles" in none.limit(pre, res).rule


def test_explicit_and_stated_times_win(profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stages = chain("lomar", "paper")
    gpu8 = slurm.load_profile("gpu8")
    plan = TimePlan.for_stages(stages, gpu8)
    pre = stages[0]
    res = slurm.stage_resources(pre, {"time_min": 90}, gpu8)
    assert str(plan.limit(pre, res, {"time_min": 90})) == "time 90 min = --res time_min"
    # a recipe's own time (capped by the cluster); the scale's default only where nothing is projected
    own = tmp_path / "slurm"
    shutil.copytree(slurm_dir(), own, ignore=shutil.ignore_patterns("local"))
    text = (own / "resources.yaml").read_text()
    (own / "resources.yaml").write_text(text.replace("pretrain/lomar: {gpus_per_node: 4}",
                                                     "pretrain/lomar: {gpus_per_node: 4, time_min: 100}")
                                        .replace("  time_min: null\n  recipes:", "  time_min: 50\n  recipes:"))
    monkeypatch.setenv("REPRO_SLURM_DIR", str(own))
    res = slurm.stage_resources(pre, None, gpu8)
    assert str(plan.limit(pre, res)) == "time 100 min = slurm/resources.yaml pretrain/lomar"
    lomar448 = chain("lomar_448", "paper")[0]  # covered by no GPU profile: the paper default
    lim = plan.limit(lomar448, slurm.stage_resources(lomar448, None, gpu8))
    assert str(lim) == "time 50 min = slurm/resources.yaml paper default"
    ft = stages[1]
    assert plan.limit(ft, slurm.stage_resources(ft, None, gpu8)).minutes == 50


def test_dry_run_names_the_rule_and_the_device(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = profiles.parent / "runs"
    argv = ["chain", "lomar", "--scale", "paper", "--cluster", "gpu8", "--dry-run", "--runs-dir", str(runs)]
    assert main([*argv, "--device", "H100"]) == 0
    out = capsys.readouterr().out
    m = _minutes(0.001, 4)
    assert f"#SBATCH --time={m}\n" in out and "#SBATCH --time=4320\n" in out
    assert f"; time {m} min = projected " in out and "on NVIDIA H100 80GB HBM3 x 4 GPUs x 1.25" in out
    assert "# stage time = projected wall time x 1.25 + 15 min start-up, at most 4320 min (cluster 'gpu8')" in out
    assert "# projection device: NVIDIA H100 80GB HBM3 | bf16 autocast | eager" in out
    assert "time 4320 min = cluster cap of 'gpu8' (no stored profile covers this stage)" in out
    assert main([*argv, "--res", "time_min=77"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=77\n" in out and "--time=4320" not in out
    assert main([*argv, "--device", "NVIDIA"]) == 2
    assert "several devices" in capsys.readouterr().err
    assert main(["chain", "lomar", "--scale", "tiny", "--device", "H200"]) == 2
    assert "--device is for Slurm; it needs --cluster" in capsys.readouterr().err


def test_an_array_asks_for_its_longest_stage(profiles: Path) -> None:
    """Stages with the same resources and inputs stay one job array; its --time is the longest stage's."""
    stages = [*chain("lomar", "paper")[:1], *chain("lomar_384", "paper")[:1]]
    ex = slurm.SlurmExecutor(slurm.load_profile("gpu8"))
    groups, _ = ex.groups(stages, profiles.parent / "runs")
    assert len(groups) == 1 and len(groups[0].stages) == 2
    times = [ex.times[s.key].minutes for s in stages]
    assert times[0] < times[1] == groups[0].res.time_min
    assert times[1] == math.ceil(0.001 * 1_281_167 * 300 / 3600 / 4 * 60 * 1.25 + 15)  # lomar_384: 300 epochs


def test_paper_gpus_per_stage() -> None:
    """LoMaR's tables were timed on 4 A100s (its MAE baselines too); BEiT and SimMIM ran on 16 GPUs."""
    for recipe, gpus in [("lomar", 4), ("lomar_448", 4), ("lomar_inat_384", 4), ("lomar_vit_b8", 4),
                         ("mae_384", 4), ("mae_rpe", 4), ("beit", 16), ("simmim", 16), ("simmim_swin_base", 16),
                         ("extrema", 8), ("greenmim_swin_base", 8), ("localmim_swin_base", 8)]:
        res = slurm.stage_resources(chain(recipe, "paper")[0])
        assert res.nodes * res.gpus_per_node == res.world_size == gpus, recipe


def test_setup_lines_run_before_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REPRO_PROFILES", str(tmp_path / "none.json"))
    prof = tmp_path / "site.yaml"
    prof.write_text((slurm_dir() / "clusters" / "local.yaml").read_text().replace(
        "setup: []", "setup: ['module load cuda/12.4', 'source /opt/venv/bin/activate']"))
    runs = tmp_path / "runs"
    assert main(["chain", "mae", "--scale", "tiny", "--cluster", str(prof), "--dry-run", "--runs-dir", str(runs)]) == 0
    script = capsys.readouterr().out.split("#!/bin/bash")[1]
    setup = script.index("# setup\nmodule load cuda/12.4\nsource /opt/venv/bin/activate\n")
    assert script.index("#SBATCH") < setup < script.index("srun ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("time_margin: 0.5\n")
    with pytest.raises(ConfigError, match=r"time_margin must be a number in \[1, 100\]"):
        slurm.load_profile(str(bad))


def test_time_planning_imports_no_torch() -> None:
    code = ("import sys, repro.pipeline.slurm_resources, repro.profile.projection\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
