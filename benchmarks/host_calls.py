"""Host calls per training step of the paper configurations, on the CPU (issue 13: the host-bound glue between
compiled blocks). A GPU step waits on the host when the host's calls take longer than the kernels they launch (job b:
LocalMIM ViT-B's device idled 40% of the compiled step); each call is a count that does not depend on the host's
speed, so a change to the glue can be checked here before a GPU measures its time.

For each recipe and compile mode: one step under torch.profiler (``repro.profile.bench.host_calls``: top-level
host events by kind: eager ops called from Python, autograd nodes, grad accumulations, compiled-graph calls and
their guards, the optimizer step), at the paper configuration with a small batch (the counts do not depend on it).
Inductor compiles for the CPU here, as it would for CUDA: the same graph breaks, the same glue.

Usage: python benchmarks/host_calls.py OUTDIR [recipe[:override,...] ...]
Writes OUTDIR/host-calls.json and OUTDIR/README.md (a table per mode).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from repro.io import atomic_write_text
from repro.profile.bench import device_name, profile_config
from repro.resolve import resolve

DEFAULT = ("pretrain/mae", "pretrain/lomar", "pretrain/localmim", "pretrain/localmim:train.compile_scope=all",
           "pretrain/extrema")
MODES = (("eager", False), ("compiled", True))


def measure(target: str, compile_: bool) -> dict:
    recipe, _, extra = target.partition(":")
    overrides = [o for o in extra.split(",") if o]
    cfg = resolve(recipe, "paper", overrides, kind="pretrain")
    with tempfile.TemporaryDirectory() as tmp:
        prof = profile_config(cfg, device=torch.device("cpu"), warmup=2, steps=1, batch=2, count_flops=False,
                              loader=False, compile=compile_, fused_optim=False, trace=Path(tmp))
    t = prof["trace"]
    return {"target": target, "mode": "compiled" if compile_ else "eager", "compile_scope": prof["compile_scope"],
            "graphs_compiled": prof["graphs_compiled"], "recompiles": prof["recompiles"],
            "host_calls_per_step": t["host_calls_per_step"], "host_calls_by_kind": t["host_calls_by_kind"]}


def render(rows: list[dict], device: str) -> str:
    kinds = sorted({k for r in rows for k in r["host_calls_by_kind"]})
    lines = ["# Host calls per training step (CPU count, paper configurations)", "",
             f"Measured on {device}, torch {torch.__version__}, by `python benchmarks/host_calls.py` (one step under "
             "torch.profiler after two warm-up steps, batch 2; `repro.profile.bench.host_calls`). Top-level host "
             "events per step by kind; a count, not a time. Compiled: Inductor (for the CPU here), "
             "`train.compile_scope` as listed.", "",
             "| recipe | mode | scope | graphs | recompiles | host calls / step | " + " | ".join(kinds) + " |",
             "|" + "---|" * (6 + len(kinds))]
    for r in rows:
        lines.append("| " + " | ".join([r["target"], r["mode"], str(r["compile_scope"] or "—"),
                                         str(r["graphs_compiled"]), str(r["recompiles"]),
                                         f"{r['host_calls_per_step']:g}"]
                                        + [f"{r['host_calls_by_kind'].get(k, 0):g}" for k in kinds]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    targets = argv[1:] or list(DEFAULT)
    rows = []
    for target in targets:
        for mode, compile_ in MODES:
            if not compile_ and ":" in target:  # an override of the compiled mode only
                continue
            r = measure(target, compile_)
            print(f"{target} {mode}: {r['host_calls_per_step']:g} host calls per step {r['host_calls_by_kind']}",
                  flush=True)
            rows.append(r)
    out.mkdir(parents=True, exist_ok=True)
    dev = device_name(torch.device("cpu"))
    atomic_write_text(out / "host-calls.json", json.dumps({"device": dev, "torch": torch.__version__,
                                                           "rows": rows}, indent=1) + "\n")
    atomic_write_text(out / "README.md", render(rows, dev))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
