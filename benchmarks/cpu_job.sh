#!/usr/bin/env bash
# The official code and `repro profile` side by side on THIS CPU (issue 13: reported, not a target), in one folder
# that `repro profile --side-by-side` reads: the official MAE, LoMaR and ExtreMA steps (.bench/bench_official.py,
# fp32, their CPU batches: 8 at 224, 4 at 384 / 448) and ours for the same recipes (the CPU's default mode: eager,
# fp32, the same batches), one after the other so that neither competes with the other for the cores.
# Usage: bash benchmarks/cpu_job.sh OUTDIR   (env: PY (.venv/bin/python), CONFIGS (the official names), STEPS (3),
#   WARMUP (1)); then `repro profile --side-by-side OUTDIR` (OUTDIR under tables/efficiency/cpu/ keeps the job
#   beside the others of this device).
set -eu
OUT=${1:?usage: cpu_job.sh OUTDIR}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}; STEPS=${STEPS:-3}; WARMUP=${WARMUP:-1}
CONFIGS=${CONFIGS:-mae-224,mae-448,lomar-224,lomar-448,extrema-x1,extrema-x5}
declare -A RECIPE=([mae-224]=mae [mae-384]=mae_384 [mae-448]=mae_448 [lomar-224]=lomar [lomar-384]=lomar_384
                   [lomar-448]=lomar_448 [extrema-x1]=extrema_1mask [extrema-x2]=extrema_2mask [extrema-x5]=extrema)
targets=()
for c in ${CONFIGS//,/ }; do targets+=("pretrain/${RECIPE[$c]}"); done
export PYTHONUNBUFFERED=1 REPRO_PROFILES=$OUT/profiles-scratch.json  # the stored profiles stay as they are
{
echo "### env"; lscpu | grep -E "Model name|^CPU\(s\)"; git log -1 --format='commit %H %s'
echo "### official: start :: $CONFIGS"
$PY .bench/bench_official.py .bench/export --device cpu --configs "$CONFIGS" --modes default --warmup "$WARMUP" \
  --steps "$STEPS" --json "$OUT/official.json"
echo "### ours: start :: ${targets[*]}"
$PY -m repro profile --warmup "$WARMUP" --steps "$STEPS" --no-loader --json "$OUT/repro-cpu.json" "${targets[@]}"
echo "### done"
} 2>&1 | tee "$OUT/log.txt"
rm -f "$OUT/profiles-scratch.json"
