#!/usr/bin/env bash
# ONE short GPU job (issue 13), run from the project root on the GPU machine: the official code and `repro profile`
# side by side (bf16, one batch), then what holds the step back (torch.profiler traces, CUDA graphs), and the
# evaluation steps' profiles. Stages run in priority order, each bounded by `timeout`
# and by a global deadline (BUDGET seconds from the start): a hang in one stage still returns the others' files.
# Needs .bench/ (../shared/bench/README.md: bench_official.py + the official export in .bench/export, to which
# `benchmarks/official/export_extra.sh MIRRORS .bench/export` adds LocalMIM's, SimMIM's, BEiT's and GreenMIM's).
# Order: the official code (MAE 224/448; EXTRAS=1: then LocalMIM-Swin, BEiT, GreenMIM), then ours for the same
# configurations (EXTRAS=1: + MaskFeat, which has no official timing) and, in the plain mode, the recipes step 4 runs
# under CUDA graphs; the engine under CUDA graphs (with resume, and with gradient accumulation); CUDA graphs at batch
# 128; the evaluation steps (the last ones are the first to be skipped when the budget runs short). The other configurations' ratios stand from earlier jobs
# (tables/efficiency/side-by-side-nvidia-h200.md).
# Usage: bash benchmarks/gpu_job.sh OUTDIR   (everything is packed into OUTDIR/job.tgz at the end: the device tool
#   brings back only a few files per call, so the job writes into a work folder and ships one archive + the log)
#   env: B batch (128), BUDGET (540 s), PY (python3), DEVICE (cuda; `DEVICE=cpu B=2 COMPILE=off ...` is the CPU dry
#   run of the plumbing), COMPILE (on), STEPS (5), WARMUP (2), EXTRA_TIMEOUT (45: seconds per configuration of
#   bench_extra.py; raise it for a CPU dry run), EXTRA_CONFIGS (bench_extra.py's --configs), EXTRAS (0; 1: also
#   the official LocalMIM-Swin / BEiT / GreenMIM and ours for them, as job c), ONLY (comma-separated stage names:
#   run only those, e.g. a short second call), OFFICIAL_CONFIGS (mae-224,mae-448), GRAPH_RECIPES (the recipes of
#   repro-plain / repro-cudagraphs: MAE, LoMaR, LocalMIM ViT-B and Swin-B, GreenMIM, ExtreMA), PLAIN (1; 0:
#   gpu_engine_check.sh skips its plain-mode run), ACCUM (1; 0: it skips its accumulation pair), CAP_FACTOR (1: the
#   factor on every stage's time cap; raise it for a CPU dry run)
set -u
OUT_DIR=${1:?usage: gpu_job.sh OUTDIR}
O=$(mktemp -d /tmp/gpu-job.XXXXXX)
trap 'rm -rf "$O"' EXIT  # everything it keeps is in OUTDIR/job.tgz
mkdir -p "$OUT_DIR"
B=${B:-128}; BUDGET=${BUDGET:-540}; PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; COMPILE=${COMPILE:-on}
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export REPRO_CACHE=/tmp/rcache REPRO_RUNS=/tmp/rruns TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
# the profiles it measures go into the job's archive, never into the tree's stored profiles (a CPU dry run would
# add its batch-2 figures there): keep them with `repro profile --import OUT --store`
export REPRO_PROFILES=$O/profiles.json
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage NAME CAP CMD...: run CMD with timeout min(CAP, time left); log its wall time and exit status
stage() {
  local name=$1 cap=$(( $2 * ${CAP_FACTOR:-1} )); shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then echo "### $name: not in ONLY"; return; fi
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

# 1. the official code for this job's ratios: MAE 224 and 448, then (EXTRAS=1) LocalMIM-Swin, BEiT (with and without
#    its dVAE) and GreenMIM (about 10 s a configuration on an H200; a configuration whose export is missing is
#    recorded as failed)
stage official 60 $PY .bench/bench_official.py .bench/export --device "$DEVICE" --batch "$B" --warmup "$WARMUP" \
  --steps "$STEPS" --configs "${OFFICIAL_CONFIGS:-mae-224,mae-448}" --modes default --json "$O/official.json"
[ "${EXTRAS:-0}" = 1 ] && [ -d .bench/export/beit ] && stage official-extra 110 $PY benchmarks/official/bench_extra.py \
  .bench/export --device "$DEVICE" --batch "$B" --warmup "$WARMUP" --steps "$STEPS" \
  --configs "${EXTRA_CONFIGS:-localmim-swin-224,beit-224,beit-224-dvae,greenmim-swin-224}" \
  --timeout "${EXTRA_TIMEOUT:-45}" --json "$O/official-extra.json"

# 2. ours as the engine runs on CUDA (blocks compiled, fused AdamW, only the kept patches embedded), with a
#    profiler trace of each: the configurations measured against the official code above; then, in the plain mode,
#    the recipes that step 4 runs under CUDA graphs (the same call's on / off pair for each)
stage repro-on 110 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-on.json" pretrain/mae pretrain/mae_448
if [ "${EXTRAS:-0}" = 1 ]; then  # the configurations job c measured against the extras
  stage repro-others 90 $P --compile "$COMPILE" --json "$O/repro-others.json" pretrain/beit pretrain/maskfeat
  stage repro-swin 90 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-swin.json" \
    pretrain/localmim_swin_base pretrain/greenmim_swin_base
fi
GRAPHS=${GRAPH_RECIPES:-pretrain/mae pretrain/lomar pretrain/localmim pretrain/localmim_swin_base pretrain/greenmim_swin_base pretrain/extrema}
stage repro-plain 100 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-plain.json" \
  $(echo $GRAPHS | tr ' ' '\n' | grep -v '^pretrain/mae$')

# 3. the engine's whole stage under CUDA graphs (benchmarks/gpu_engine_check.sh: a compiled tiny MAE stage with a
#    kNN pass per epoch, stopped after its first checkpoint and resumed, beside the plain mode; then both modes with
#    gradient accumulation): what train.compile_mode=reduce-overhead needs before it can be the CUDA default (job d
#    ran the first pair: equal losses up to 8.4e-5, resume OK)
stage engine-cudagraphs 240 bash benchmarks/gpu_engine_check.sh "$O/engine"

# 4. CUDA graphs at the official batch for the recipes of step 2 (job d: MAE 224 1.03x -> 1.61x the official code on
#    a host-bound machine); batch 256 and compile_scope=all (MAE, LocalMIM-Swin) were measured by jobs c and d and
#    are not rerun
stage repro-cudagraphs 120 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-cudagraphs.json" $GRAPHS \
  train.compile_mode=reduce-overhead

# 4b. LocalMIM ViT-B with its glue after the encoder compiled as one graph (train.compile_scope=all): its device idled
#     40% of the plain step in job b (host-bound glue between compiled blocks); on the CPU the scope takes its host
#     calls per step from 652 to 332 (tables/efficiency/cpu/host-calls-2026-11-27)
stage repro-scope-all 60 $P --compile "$COMPILE" --trace "$O/traces" --json "$O/repro-scope-all.json" \
  pretrain/localmim train.compile_scope=all

# 5. the evaluation steps (fine-tuning, linear probe, kNN forward) whose stored profiles give `repro plan` and the
#    Slurm --time of ~170 evaluation stages a projection (the others are estimated from these by FLOPs)
stage repro-evals 90 $PY -m repro profile --warmup "$WARMUP" --steps "$STEPS" --no-loader --json "$O/repro-evals.json" \
  finetune/vit_base@mae finetune/extrema_vit_base@extrema linear/extrema@extrema_1mask finetune/scratch_swin_base \
  finetune/lomar_vit_base@lomar finetune/beit_vit_base@beit linear/mae@mae finetune/simmim_swin_large@simmim_swin_large \
  knn/default

tar -czf "$O/tables.tgz" tables plots 2>&1
echo "### done in $(( $(date +%s) - START ))s"
ls -la "$O" "$O/traces" 2>/dev/null
} 2>&1 | tee "$O/log.txt"
tar -czf "$OUT_DIR/job.tgz" -C "$O" . && cp "$O/log.txt" "$OUT_DIR/log.txt"
