"""benchmarks/gpu_job.sh's plumbing on the CPU (its documented dry run), one stage: a device session is short, so a
broken stage must show here. The job writes only into its archive: the tree's stored profiles stay as they are."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "tables" / "efficiency" / "profiles.json"


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else ""


@pytest.mark.slow
def test_the_scope_all_stage_runs_and_ships_its_profile_and_trace(tmp_path):
    before = _digest(PROFILES)
    env = {**os.environ, "DEVICE": "cpu", "B": "2", "COMPILE": "off", "STEPS": "1", "WARMUP": "0",
           "PY": sys.executable, "ONLY": "repro-scope-all", "BUDGET": "500", "CAP_FACTOR": "8",
           "OMP_NUM_THREADS": "2"}
    env.pop("REPRO_PROFILES", None)
    out = tmp_path / "out"
    res = subprocess.run(["bash", "benchmarks/gpu_job.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "### repro-scope-all: rc=0" in log and "### repro-on: not in ONLY" in log
    with tarfile.open(out / "job.tgz") as tar:
        names = set(tar.getnames())
        prof = json.load(tar.extractfile("./repro-scope-all.json"))["pretrain/localmim"]
        assert "./profiles.json" in names  # the job's own stored profiles
    assert prof["batch"] == 2 and prof["compile"] is False
    trace = prof["trace"]
    assert trace["host_calls_per_step"] > 0 and f"./traces/{trace['label']}.txt" in names
    assert _digest(PROFILES) == before
