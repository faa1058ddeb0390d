"""Run one stage in this process: ``python -m repro.pipeline.worker <stage_dir>/stage.json``.

Reads the stage spec the executor wrote, fills inputs from the stages it depends on, runs it, and writes
``result.json`` (atomically) with metrics, accounting and provenance. On an error it writes ``failed.json``; when a
signal stopped it after a checkpoint (``Preempted``) it writes neither and exits with ``PREEMPTED_EXIT``.
It holds the stage folder's lock while it runs: a second process started on the same stage exits at once with
``BUSY_EXIT``; a stage found done (by another run) is not run again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.io import atomic_write_json
from repro.kinds import get_kind
from repro.pipeline.stage import FAILED, LOG, RESULT, StageLock, is_done, lock_holder, remove_stale_tmp
from repro.record.provenance import provenance

PREEMPTED_EXIT = 75  # exit code after a signal (Slurm requeue / preemption / time limit) made the stage checkpoint
BUSY_EXIT = 73  # another process holds the stage's lock: nothing was done


@dataclass
class Outcome:
    """How a stage process ended: its exit code and, when a signal stopped it, which."""

    code: int
    signal: int | None = None


def _runner(kind: str) -> Any:
    """The registered runner of ``kind`` (repro.kinds), imported now."""
    return get_kind(kind).load_runner()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The stage's config with its inputs' paths filled in (``init`` from the pretraining stage's encoder, and the
    other files of the input's folder its kind reads: ``StageKind.input_files``)."""
    from repro.engine.pretrain import ENCODER_FILE, META_FILE

    cfg = dict(spec["cfg"])
    init_dir = spec.get("inputs", {}).get("init")
    if init_dir:
        cfg["init"] = str(Path(init_dir) / ENCODER_FILE)
        for key, name in get_kind(spec["kind"]).input_files.items():
            cfg[key] = str(Path(init_dir) / name)
        meta = json.loads((Path(init_dir) / META_FILE).read_text())
        if cfg.get("feature") == "auto":
            cfg["feature"] = meta["linear_feature"]
    elif cfg.get("feature") == "auto":
        cfg["feature"] = "cls"
    return cfg


def substitutes(kind: str, cfg: dict[str, Any]) -> list[str]:
    """What this stage uses in place of something the paper had (e.g. BEiT's tokenizer), for the reports."""
    if kind != "pretrain":
        return []
    from repro.methods.registry import get_spec

    return get_spec(cfg["method"]["name"]).substitutes(cfg["method"])


def run(spec_path: str | Path) -> dict[str, Any]:
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    cfg = prepare(spec)
    # Model initialisation draws from the global RNGs: seed them, or no two runs of a stage (and no resumed run and
    # its uninterrupted twin) start from the same weights. The engine reseeds per rank before training.
    seed_everything(int(cfg.get("seed", 0)))
    t0 = time.time()
    res = _runner(spec["kind"])(cfg, out_dir)
    acct = res["accounting"]
    acct.setdefault("precision", "fp32")  # the engine records its own; stages without it (kNN, analysis) run in fp32
    # device-seconds are summed over the process segments of a resumed stage (engine); else this process's wall
    acct["device_hours"] = acct.get("device_s", acct["wall_s"] * acct.get("world_size", 1)) / 3600.0
    result = {
        "status": "done" if acct.get("completed", True) else "partial",
        "stage": spec["name"], "key": spec["key"], "kind": spec["kind"], "label": spec.get("label", ""),
        "recipe": cfg.get("recipe"), "scale": cfg.get("scale"), "inputs": spec.get("inputs", {}),
        "metrics": res["metrics"], "accounting": acct, "artifacts": res.get("artifacts", {}),
        "provenance": provenance(spec["cfg"]), "config": cfg, "started": t0, "finished": time.time(),
        "substitutes": substitutes(spec["kind"], cfg),
    }
    if int(os.environ.get("RANK", "0")) == 0:  # one result per stage, whatever the number of processes
        atomic_write_json(out_dir / RESULT, finite(result))
    return result


def finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinity replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def execute(spec_path: str | Path) -> Outcome:
    """Run the stage of ``spec_path`` under its folder's lock; report how it ended (failures in failed.json)."""
    spec_path = Path(spec_path)
    out_dir = spec_path.parent
    from repro.engine.hooks import Preempted

    lock = StageLock(out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 holds the lock for the stage's processes
        if not lock.acquire():
            print(f"[{out_dir.name}] not started: another process runs this stage ({lock_holder(out_dir)})",
                  flush=True)
            return Outcome(BUSY_EXIT)
        if is_done(out_dir):
            print(f"[{out_dir.name}] done already (by another run); not run again", flush=True)
            lock.release()
            return Outcome(0)
        for p in remove_stale_tmp(out_dir):
            print(f"[{out_dir.name}] removed {p.name}, left by an interrupted write", flush=True)
    try:
        res = run(spec_path)
    except Preempted as e:  # checkpoint written: not a failure, the stage resumes when it is started again
        print(f"[{out_dir.name}] stopped: {e}; it resumes from there when restarted", flush=True)
        return Outcome(PREEMPTED_EXIT, e.signal)
    except Exception as e:  # noqa: BLE001 - reported to the executor through failed.json
        traceback.print_exc()
        atomic_write_json(out_dir / FAILED, {"error": f"{type(e).__name__}: {e}", "log": str(out_dir / LOG),
                                             "time": time.time()})
        return Outcome(1)
    finally:
        lock.release()
    if int(os.environ.get("RANK", "0")):
        return Outcome(0)
    print(f"[{res['stage']}] {res['status']}: " + ", ".join(f"{k}={v:.2f}" for k, v in res["metrics"].items()
                                                            if isinstance(v, float)), flush=True)
    return Outcome(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return execute(argv[0]).code
    except KeyboardInterrupt:  # a second Ctrl-C while the checkpoint was pending
        print(f"[{Path(argv[0]).parent.name}] interrupted", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
