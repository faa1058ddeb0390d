#!/usr/bin/env bash
# The engine's whole pretraining stage under CUDA graphs (issue 13), the check before
# train.compile_mode=reduce-overhead can become a CUDA default: MAE at tiny scale on the GPU with its blocks
# compiled, a kNN pass after every epoch (eval-mode forwards between training steps), stopped by SIGINT once its
# first epoch checkpoint exists and resumed to the end; beside it the same stage in inductor's plain mode, run
# without a stop. Then (ACCUM=1) both modes again with four micro-batches per optimizer step (gradient accumulation:
# the later micro-batches add into grads the engine copies out of the graphs' buffers). Prints each per-epoch
# history (loss, kNN top-1) and the largest loss difference per pair: they should agree up to float rounding
# (H200 job d: 8e-5 at a loss of 0.5), and the resumed run must finish every epoch.
# Usage: bash benchmarks/gpu_engine_check.sh OUTDIR   (env: PY (python3), EPOCHS (4), PLAIN (1; 0: no plain run of
#   the first pair, for a second call that compares with an earlier call's plain history), ACCUM (1; 0: skip the
#   accumulation pair)). On a CPU it runs the same plumbing (reduce-overhead compiles without CUDA graphs there).
set -u
OUT=${1:?usage: gpu_engine_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PY:-python3}; EPOCHS=${EPOCHS:-4}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} REPRO_CACHE=/tmp/engine-cache \
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
ARGS=(mae --scale tiny train.compile=true train.knn_every=1)

compare() {  # compare RUNS_A RUNS_B: both per-epoch histories and the largest loss difference
  $PY - "$1" "$2" <<'PY'
import glob
import json
import sys

def history(root: str) -> list[dict]:
    path = glob.glob(f"{root}/tiny/pretrain/mae-*/result.json")
    return json.load(open(path[0]))["accounting"]["history"] if path else []

a, b = (history(r) for r in sys.argv[1:3])
for name, h in zip(sys.argv[1:3], (a, b)):
    print(name, [(r["epoch"], round(r["loss"], 6), r.get("knn_top1_k20")) for r in h])
diff = max((abs(x["loss"] - y["loss"]) for x, y in zip(a, b)), default=None)
print("epochs", len(a), len(b), "largest loss difference", diff)
PY
}

rm -rf /tmp/engine-graphs /tmp/engine-accum-default /tmp/engine-accum-reduce-overhead  # fresh stages, not resumed ones
[ "${PLAIN:-1}" = 1 ] && rm -rf /tmp/engine-plain
{
if [ "${PLAIN:-1}" = 1 ]; then
  echo "### plain: start"
  $PY -m repro pretrain "${ARGS[@]}" "optim.epochs=$EPOCHS" train.compile_mode=default --runs-dir /tmp/engine-plain
  echo "### plain: rc=$?"
fi
echo "### graphs: start"
$PY -m repro pretrain "${ARGS[@]}" "optim.epochs=$EPOCHS" train.compile_mode=reduce-overhead \
  --runs-dir /tmp/engine-graphs &
pid=$!
for _ in $(seq 600); do  # the first epoch's checkpoint, then SIGINT (the stage checkpoints and stops)
  ls /tmp/engine-graphs/tiny/pretrain/mae-*/checkpoints/last.pth >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.5
done
kill -INT $pid 2>/dev/null
wait $pid
echo "### graphs, stopped: rc=$?"
$PY -m repro pretrain "${ARGS[@]}" "optim.epochs=$EPOCHS" train.compile_mode=reduce-overhead \
  --runs-dir /tmp/engine-graphs
echo "### graphs, resumed: rc=$?"
compare /tmp/engine-plain /tmp/engine-graphs

if [ "${ACCUM:-1}" = 1 ]; then  # four micro-batches per step (the tiny recipe's batch 128 as 4 x 32), two epochs
  for mode in default reduce-overhead; do
    echo "### accumulation, $mode: start"
    $PY -m repro pretrain "${ARGS[@]}" optim.epochs=2 train.batch_per_device=32 "train.compile_mode=$mode" \
      --runs-dir "/tmp/engine-accum-$mode"
    echo "### accumulation, $mode: rc=$?"
  done
  compare /tmp/engine-accum-default /tmp/engine-accum-reduce-overhead
fi
} 2>&1 | tee "$OUT/engine-log.txt"
