"""Slurm executor without a cluster: profiles, resources, dry-run sbatch scripts, dependency wiring, sacct parsing,
and every refusal (one line, exit code 2, nothing submitted). The real-cluster tests are in test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from repro.cli import main
from repro.config import ConfigError
from repro.pipeline import slurm
from repro.pipeline.plan import chain
from repro.pipeline.stage import FAILED

MICRO = ["model.depth=1", "optim.epochs=2", "data.synthetic_train=320", "data.synthetic_val=64"]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))

    def no_submit(*a: object, **k: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("repro.pipeline.slurm_sched.sbatch", no_submit)
    return tmp_path


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2, out
    err = out.err.strip()
    assert err.startswith("repro: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_profiles_load_and_unknown_is_refused(tmp_path: Path) -> None:
    assert {"local", "gpu8"} <= set(slurm.list_profiles())
    gpu8 = slurm.load_profile("gpu8")
    assert (gpu8.gpus_per_node, gpu8.max_time_min, gpu8.signal_delay_s) == (8, 4320, 120)
    with pytest.raises(ConfigError, match="unknown cluster profile 'nope'; known: .*gpu8.*local"):
        slurm.load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitionn: gpu\n")
    with pytest.raises(ConfigError, match="unknown key.*partitionn"):
        slurm.load_profile(str(bad))
    bad.write_text("gpus_per_node: -1\n")
    with pytest.raises(ConfigError, match="gpus_per_node must be a non-negative integer"):
        slurm.load_profile(str(bad))


def test_paper_localmim_asks_for_the_papers_resources() -> None:
    """LocalMIM ViT-B: one node of 8 GPUs, one task per GPU (official `--nproc_per_node 8`, 256 x 8 = 2048)."""
    pre = chain("localmim", "paper")[0]
    res = slurm.stage_resources(pre)
    assert (res.nodes, res.gpus_per_node, res.tasks, res.cpus_per_task, res.world_size) == (1, 8, 8, 10, 8)
    prof = slurm.load_profile("gpu8")
    slurm.check_resources(res, prof, "localmim")
    p = slurm.slurm_params(res, prof, "x")
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (1, 8, 8, 10)
    assert p["mem"] == f"{40 * 8 * 1024}M" and p["time"] == 4320 and p["signal_delay_s"] == 120
    assert p["partition"] == "gpu" and p["additional_parameters"]["kill-on-invalid-dep"] == "yes"
    # a typed GPU request, and the per-recipe table: MAE pretraining is 8 nodes, MAE's linear probe is not
    assert slurm.slurm_params(res, slurm.Profile("t", gpu_type="a100", gpus_per_node=8), "x")["gpus_per_node"] \
        == "a100:8"
    mae = chain("mae", "paper")
    assert slurm.stage_resources(mae[0]).nodes == 8
    assert all(slurm.stage_resources(s).nodes == 1 for s in mae[1:])
    assert slurm.stage_resources(chain("mae", "tiny")[0]) == slurm.Resources(1, 0, 1, 1, 2, 30)


def test_limits_are_enforced() -> None:
    prof = slurm.load_profile("local")
    ok = slurm.Resources(1, 0, 2, 1, 2, 30)
    slurm.check_resources(ok, prof, "s")
    for res, needle in [(slurm.Resources(nodes=2), "2 nodes"), (slurm.Resources(gpus_per_node=4), "4 GPUs per node"),
                        (slurm.Resources(tasks_per_node=2, cpus_per_task=2), "4 CPUs per node"),
                        (slurm.Resources(mem_gb=64), "64 GB per node"), (slurm.Resources(time_min=61), "61 min")]:
        with pytest.raises(ConfigError, match=needle):
            slurm.check_resources(res, prof, "s")
    with pytest.raises(ConfigError, match="bad --res 'gpus=2'"):
        slurm.parse_res_overrides(["gpus=2"])
    assert slurm.parse_res_overrides(["tasks_per_node=2"]) == {"tasks_per_node": 2}


def test_dependency_wiring_and_sweep_arrays(tmp_path: Path) -> None:
    """Inputs' jobs become afterok; stages with the same resources and inputs form one array."""
    stages = chain("mae", "tiny", MICRO, baseline=True)
    ex = slurm.SlurmExecutor(slurm.load_profile("local"))
    groups, done = ex.groups(stages, tmp_path)
    assert not done and len(groups) == 2
    first, second = groups
    pre = stages[0]
    assert pre in first.stages and not first.deps and len(first.stages) == 4  # + 3 random-init evaluations
    assert second.deps == [pre] and len(second.stages) == 3 and all(s.deps["init"] is pre for s in second.stages)
    text = ex.render(stages, tmp_path)
    assert text.count("#!/bin/bash") == 2
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --array=0-2%2" in text  # profile array_parallelism: 2
    assert first.stages[0] is pre and "#SBATCH --dependency='afterok:$JOB_1_0'" in text  # on the array's task 0
    # a finished input is not waited for, and is not submitted again
    d = pre.dir(tmp_path)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"status": "done"}))
    groups, done = ex.groups(stages, tmp_path)
    assert done == [pre] and all(not g.deps for g in groups)


def test_dry_run_prints_scripts_and_submits_nothing(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = sandbox / "runs"
    rc = main(["chain", "localmim", "--scale", "paper", "--cluster", "gpu8", "--dry-run", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=327680M", "#SBATCH --signal=USR2@120",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4320", "afterok:$JOB_1", "-m repro.pipeline.slurm_job",
                 f"{runs}/slurm/logs/"):
        assert line in out, line
    assert not list(runs.rglob("stage.json")) and not (runs / "slurm" / "submissions.jsonl").exists()


def test_bad_input_refused_before_submission(sandbox: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["chain", "mae", "--scale", "tiny", *MICRO]
    _refused([*base, "--cluster", "nope"], capsys, "unknown cluster profile 'nope'", "local")
    _refused([*base, "--cluster", "local", "--dry-run", "--res", "gpus_per_node=3"], capsys,
             "asks for 3 GPUs per node", "'local'")
    _refused([*base, "--cluster", "local", "--dry-run", "--res", "time_min=100000"], capsys, "100000 min")
    _refused([*base, "--dry-run"], capsys, "--dry-run is for Slurm; it needs --cluster")
    _refused([*base, "--res", "nodes=2"], capsys, "--res is for Slurm")
    blocker = sandbox / "afile"
    blocker.write_text("")
    _refused([*base, "--cluster", "local", "--dry-run", "--runs-dir", str(blocker / "runs")], capsys,
             "run root", "cannot be created")
    # a partition the scheduler does not list
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: ["debug"])
    _refused([*base, "--cluster", "gpu8"], capsys, "partition 'gpu' does not exist here", "debug")
    assert not (sandbox / "runs").exists()


def test_sacct_reconciliation_sums_requeued_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '7|REQUEUED|100|billing=2,cpu=2,gres/gpu=2,mem=1G,node=1\\n"
                    "7|COMPLETED|260|billing=2,cpu=2,gres/gpu=2,mem=1G,node=1\\n"
                    "8|COMPLETED|3600|billing=4,cpu=4,mem=1G,node=1\\n9|RUNNING|5|cpu=1\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    gpu = slurm.sacct_usage("7")
    assert gpu["unit"] == "gpu" and gpu["runs"] == 2 and gpu["hours"] == pytest.approx(360 * 2 / 3600)
    cpu = slurm.sacct_usage("8")
    assert cpu["unit"] == "cpu" and cpu["hours"] == pytest.approx(4.0)
    assert slurm.sacct_usage("9") is None  # not ended: nothing to reconcile yet
    d = tmp_path / "stage"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"status": "done", "accounting": {"device_hours": 0.1}}))
    (d / slurm.SLURM_FILE).write_text(json.dumps({"job_id": "7"}))
    slurm.reconcile(d, retries=1)
    acct = json.loads((d / "result.json").read_text())["accounting"]
    assert acct["device_hours"] == 0.1 and acct["device_hours_sacct"] == pytest.approx(0.2)  # both kept
    assert acct["device_hours_sacct_unit"] == "gpu-hours" and acct["sacct"]["runs"] == 2


def test_preempted_worker_is_not_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal-triggered checkpoint exits with PREEMPTED_EXIT and writes no failed.json (the stage is requeued)."""
    from repro.engine.hooks import Preempted
    from repro.pipeline import worker

    def stopped(spec: object) -> None:
        raise Preempted("signal 12 at step 3")

    monkeypatch.setattr(worker, "run", stopped)
    spec = tmp_path / "stage.json"
    spec.write_text("{}")
    assert worker.main([str(spec)]) == worker.PREEMPTED_EXIT == slurm.PREEMPTED_EXIT
    assert not (tmp_path / FAILED).exists()

    def broken(spec: object) -> None:
        raise ValueError("real error")

    monkeypatch.setattr(worker, "run", broken)
    assert worker.main([str(spec)]) == 1
    assert "real error" in json.loads((tmp_path / FAILED).read_text())["error"]


def test_status_reads_result_files(tmp_path: Path) -> None:
    for name, files in {"a": {"result.json": {"status": "done", "accounting": {"device_hours": 0.5}}},
                        "b": {FAILED: {"error": "ValueError: boom", "log": "/logs/b.err"}}, "c": {}}.items():
        d = tmp_path / "tiny" / "pretrain" / name
        d.mkdir(parents=True)
        (d / "stage.json").write_text(json.dumps({"name": f"pretrain/{name}", "label": ""}))
        for f, content in files.items():
            (d / f).write_text(json.dumps(content))
    text = slurm.format_status(slurm.status_report(tmp_path))
    assert "done      pretrain/a  engine 0.5000 device-h" in text
    assert "failed    pretrain/b  ValueError: boom; log: /logs/b.err" in text
    assert "not run   pretrain/c" in text


def test_requeues_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job Slurm restarted more often than the profile's max_requeues fails with the reason in failed.json."""
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path), "SLURM_JOB_ID": "7",
                 "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                 "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": "6"}.items():
        monkeypatch.setenv(k, v)
    spec = tmp_path / "stage" / "stage.json"
    spec.parent.mkdir()
    spec.write_text("{}")
    with pytest.raises(RuntimeError, match="requeued 6 times"):
        slurm.StageJob(str(spec), max_requeues=5)()
    failed = json.loads((spec.parent / FAILED).read_text())
    assert "max_requeues=5" in failed["error"] and failed["log"].endswith("7_0_log.err")
    assert json.loads((spec.parent / slurm.SLURM_FILE).read_text())["restarts"] == 6
