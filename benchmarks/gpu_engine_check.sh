#!/usr/bin/env bash
# The engine's whole pretraining stage under CUDA graphs (issue 13), the check before
# train.compile_mode=reduce-overhead can become a CUDA default: MAE at tiny scale on the GPU with its blocks
# compiled, a kNN pass after every epoch (eval-mode forwards between training steps), stopped by SIGINT once its
# first epoch checkpoint exists and resumed to the end; beside it the same stage in inductor's plain mode, run
# without a stop. Prints both per-epoch histories (loss, kNN top-1) and the largest loss difference: the two should
# agree up to float rounding, and the resumed run must finish every epoch.
# Usage: bash benchmarks/gpu_engine_check.sh OUTDIR   (env: PY (python3), EPOCHS (4), PLAIN (1; 0: no plain run,
#   for a second call that compares with an earlier call's plain history)). On a CPU it runs the same
#   plumbing (reduce-overhead compiles without CUDA graphs there).
set -u
OUT=${1:?usage: gpu_engine_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PY:-python3}; EPOCHS=${EPOCHS:-4}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} REPRO_CACHE=/tmp/engine-cache \
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
ARGS=(mae --scale tiny train.compile=true train.knn_every=1 "optim.epochs=$EPOCHS")
{
if [ "${PLAIN:-1}" = 1 ]; then
  echo "### plain: start"
  $PY -m repro pretrain "${ARGS[@]}" train.compile_mode=default --runs-dir /tmp/engine-plain
  echo "### plain: rc=$?"
fi
echo "### graphs: start"
$PY -m repro pretrain "${ARGS[@]}" train.compile_mode=reduce-overhead --runs-dir /tmp/engine-graphs &
pid=$!
for _ in $(seq 600); do  # the first epoch's checkpoint, then SIGINT (the stage checkpoints and stops)
  ls /tmp/engine-graphs/tiny/pretrain/mae-*/checkpoints/last.pth >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.5
done
kill -INT $pid 2>/dev/null
wait $pid
echo "### graphs, stopped: rc=$?"
$PY -m repro pretrain "${ARGS[@]}" train.compile_mode=reduce-overhead --runs-dir /tmp/engine-graphs
echo "### graphs, resumed: rc=$?"
$PY - <<'PY'
import glob
import json

def history(root: str) -> list[dict]:
    path = glob.glob(f"{root}/tiny/pretrain/mae-*/result.json")
    return json.load(open(path[0]))["accounting"]["history"] if path else []

plain, graphs = history("/tmp/engine-plain"), history("/tmp/engine-graphs")
for name, h in (("plain", plain), ("CUDA graphs, stopped + resumed", graphs)):
    print(name, [(r["epoch"], round(r["loss"], 6), r.get("knn_top1_k20")) for r in h])
diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(plain, graphs)), default=None)
print("epochs", len(plain), len(graphs), "largest loss difference", diff)
PY
} 2>&1 | tee "$OUT/engine-log.txt"
