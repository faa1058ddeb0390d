#!/usr/bin/env bash
# ONE short GPU job (issue 13), run from the project root on the GPU machine: the official code and `repro profile`
# side by side (bf16, one batch), then what holds the step back (torch.profiler traces, CUDA graphs, a larger batch),
# the other methods' MFU, and the JPEG loader's images/s. Stages run in priority order, each bounded by `timeout`
# and by a global deadline (BUDGET seconds from the start): a hang in one stage still returns the others' files.
# Needs .bench/ (../shared/bench/README.md: bench_official.py + the official export in .bench/export, to which
# `benchmarks/official/export_extra.sh MIRRORS .bench/export` adds LocalMIM's, SimMIM's, BEiT's and GreenMIM's).
# Order: the official code (MAE/LoMaR/ExtreMA, then the extras), then ours for the methods only the extras time
# (BEiT, GreenMIM, MaskFeat: their ratios land beside their official runs), then ours for the main table, CUDA
# graphs, the loader, batch 256 (the last ones are the first to be skipped when the budget runs short).
# Usage: bash benchmarks/gpu_job.sh OUTDIR   (everything is packed into OUTDIR/job.tgz at the end: the device tool
#   brings back only a few files per call, so the job writes into a work folder and ships one archive + the log)
#   env: B batch (128), BUDGET (510 s), PY (python3), DEVICE (cuda; `DEVICE=cpu B=2 COMPILE=off ...` is the CPU dry
#   run of the plumbing), COMPILE (on), STEPS (5), WARMUP (2), EXTRA_TIMEOUT (45: seconds per configuration of
#   bench_extra.py; raise it for a CPU dry run)
set -u
OUT_DIR=${1:?usage: gpu_job.sh OUTDIR}
O=$(mktemp -d /tmp/gpu-job.XXXXXX)
mkdir -p "$OUT_DIR"
B=${B:-128}; BUDGET=${BUDGET:-510}; PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; COMPILE=${COMPILE:-on}
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export REPRO_CACHE=/tmp/rcache REPRO_RUNS=/tmp/rruns TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage NAME CAP CMD...: run CMD with timeout min(CAP, time left); log its wall time and exit status
stage() {
  local name=$1 cap=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then echo "### $name: skipped ($(left) s left)"; return; fi
  echo "### $name: start (limit ${t}s, $(left) s left) :: $*"
  local t0; t0=$(date +%s)
  timeout -k 5 "$t" "$@"
  echo "### $name: rc=$? wall=$(( $(date +%s) - t0 ))s"
}
P="$PY -m repro profile --batch $B --warmup $WARMUP --steps $STEPS --fused-optim on --no-loader"

{
stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1;
  $PY -c 'import sys,torch,timm,torchvision;print(\"python\",sys.version.split()[0],\"torch\",torch.__version__,
\"timm\",timm.__version__,\"torchvision\",torchvision.__version__,\"cuda\",torch.version.cuda,
\"gpu\",torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  nproc; free -g | head -2; git log -1 --format='commit %H %s' 2>/dev/null" > "$O/env.txt" 2>&1
cat "$O/env.txt"

# 1. the official code at 224 (the ratios of this job), then LocalMIM's, SimMIM's, BEiT's and GreenMIM's (about
#    10 s a configuration on an H200; a configuration whose export is missing is recorded as failed)
stage official 75 $PY .bench/bench_official.py .bench/export --device "$DEVICE" --batch "$B" --warmup "$WARMUP" \
  --steps "$STEPS" --configs mae-224,lomar-224,extrema-x1 --modes default --json "$O/official.json"
[ -d .bench/export/localmim_vit ] && stage official-extra 120 $PY benchmarks/official/bench_extra.py \
  .bench/export --device "$DEVICE" --batch "$B" --warmup "$WARMUP" --steps "$STEPS" \
  --timeout "${EXTRA_TIMEOUT:-45}" --json "$O/official-extra.json"

# 1b. ours for the methods whose official code only the extras time (MFU; MaskFeat has no official timing)
stage repro-others 120 $P --compile "$COMPILE" --json "$O/repro-others.json" \
  pretrain/beit pretrain/greenmim_swin_base pretrain/maskfeat

# 2. ours as the engine runs on CUDA (blocks compiled, fused AdamW), with a profiler trace of each
stage repro-on 200 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-on.json" \
  pretrain/mae pretrain/lomar pretrain/localmim pretrain/localmim_swin_base pretrain/simmim pretrain/simmim_swin_base \
  extrema_1mask

# 3. CUDA graphs (compile mode reduce-overhead): the host's launch time off the step
stage repro-cudagraphs 80 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-cudagraphs.json" \
  pretrain/mae pretrain/lomar train.compile_mode=reduce-overhead

# 3b. the evaluation steps (fine-tuning, linear probe, kNN forward) whose stored profiles give `repro plan` and the
#     Slurm --time of ~170 evaluation stages a projection (the others are estimated from these by FLOPs)
stage repro-evals 90 $PY -m repro profile --warmup "$WARMUP" --steps "$STEPS" --no-loader --json "$O/repro-evals.json" \
  finetune/vit_base@mae finetune/extrema_vit_base@extrema linear/extrema@extrema_1mask finetune/scratch_swin_base \
  finetune/lomar_vit_base@lomar finetune/beit_vit_base@beit linear/mae@mae finetune/simmim_swin_large@simmim_swin_large \
  knn/default

# 4. the input pipeline on real JPEG files: PIL in 12 workers vs nvJPEG + batched transforms on the device
stage loader 60 $PY -m repro profile --batch "$B" --warmup 1 --steps 1 --compile off --loader-workers 12 \
  --json "$O/repro-loader.json" pretrain/mae

# 5. a larger per-GPU batch (the paper's effective batch kept by fewer GPUs / accumulation)
stage repro-b256 60 $PY -m repro profile --batch 256 --warmup "$WARMUP" --steps "$STEPS" --fused-optim on \
  --no-loader --compile "$COMPILE" --json "$O/repro-b256.json" pretrain/mae pretrain/lomar

tar -czf "$O/tables.tgz" tables plots 2>&1
echo "### done in $(( $(date +%s) - START ))s"
ls -la "$O" "$O/traces" 2>/dev/null
} 2>&1 | tee "$O/log.txt"
tar -czf "$OUT_DIR/job.tgz" -C "$O" . && cp "$O/log.txt" "$OUT_DIR/log.txt"
