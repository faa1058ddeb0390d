#!/usr/bin/env bash
# The official code and `repro profile` side by side on THIS CPU (issue 13: reported, not a target), in one folder
# that `repro profile --side-by-side` reads: the official steps (fp32; MAE, LoMaR and ExtreMA through
# .bench/bench_official.py at their CPU batches, 8 at 224 and 4 at 384 / 448; LocalMIM, SimMIM, BEiT and GreenMIM
# through benchmarks/official/bench_extra.py from .bench/export, MaskFeat from .bench-cpu/export, batch 8) and ours for
# the same recipes (the CPU's default mode: eager, fp32, the same batches), one after the other so that neither
# competes with the other for the cores; then the copied-weights parity of every case with an export
# (benchmarks/official/parity.py: the official and our loss and gradients on the same images, masks and weights).
# Usage: bash benchmarks/cpu_job.sh OUTDIR   (env: PY (.venv/bin/python), CONFIGS (bench_official.py's names),
#   EXTRA_CONFIGS (bench_extra.py's; "" skips them), STEPS (3), WARMUP (1)); then
#   `repro profile --side-by-side OUTDIR` (OUTDIR under tables/efficiency/cpu/ keeps the job beside the others of
#   this device). Exports: ../shared/bench/export_official.sh and benchmarks/official/export_extra.sh into
#   .bench/export, benchmarks/official/export_maskfeat.sh into .bench-cpu/export; a missing one skips its configs.
set -eu
OUT=${1:?usage: cpu_job.sh OUTDIR}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}; STEPS=${STEPS:-3}; WARMUP=${WARMUP:-1}
CONFIGS=${CONFIGS:-mae-224,mae-448,lomar-224,lomar-448,extrema-x1,extrema-x5}
EXTRA_CONFIGS=${EXTRA_CONFIGS-localmim-vit-224,localmim-swin-224,simmim-vit-224,simmim-swin-192,beit-224,greenmim-swin-224,maskfeat-224}
declare -A RECIPE=([mae-224]=mae [mae-384]=mae_384 [mae-448]=mae_448 [lomar-224]=lomar [lomar-384]=lomar_384
                   [lomar-448]=lomar_448 [extrema-x1]=extrema_1mask [extrema-x2]=extrema_2mask [extrema-x5]=extrema
                   [localmim-vit-224]=localmim [localmim-swin-224]=localmim_swin_base [simmim-vit-224]=simmim
                   [simmim-swin-192]=simmim_swin_base [beit-224]=beit [greenmim-swin-224]=greenmim_swin_base
                   [maskfeat-224]=maskfeat)
declare -A EXPORT=([localmim-vit-224]=.bench/export/localmim_vit [localmim-swin-224]=.bench/export/localmim_swin
                   [simmim-vit-224]=.bench/export/simmim [simmim-swin-192]=.bench/export/simmim
                   [beit-224]=.bench/export/beit [greenmim-swin-224]=.bench/export/greenmim
                   [maskfeat-224]=.bench-cpu/export/maskfeat)
targets=(); extras=(); maskfeat=0; parity=()
for c in mae:mae lomar:lomar extrema:extrema localmim-vit:localmim_vit localmim-swin:localmim_swin; do
  [ -d ".bench/export/${c#*:}" ] && parity+=("${c%%:*}")
done
[ -d .bench/export/simmim ] && parity+=(simmim-vit simmim-swin)
[ -d .bench/export/greenmim ] && parity+=(greenmim)
[ -d .bench/export/beit ] && parity+=(beit)
[ -d .bench-cpu/export/maskfeat ] && parity+=(maskfeat)
for c in ${CONFIGS//,/ }; do targets+=("pretrain/${RECIPE[$c]}"); done
for c in ${EXTRA_CONFIGS//,/ }; do
  if [ ! -d "${EXPORT[$c]:?unknown extra config $c}" ]; then echo "skipped $c: no export ${EXPORT[$c]}" >&2; continue; fi
  if [ "$c" = maskfeat-224 ]; then maskfeat=1; else extras+=("$c"); fi
  targets+=("pretrain/${RECIPE[$c]}")
done
export PYTHONUNBUFFERED=1 REPRO_PROFILES=$OUT/profiles-scratch.json  # the stored profiles stay as they are
joined() { local IFS=,; echo "$*"; }
{
echo "### env"; lscpu | grep -E "Model name|^CPU\(s\)"; git log -1 --format='commit %H %s'
echo "### official: start :: $CONFIGS"
$PY .bench/bench_official.py .bench/export --device cpu --configs "$CONFIGS" --modes default --warmup "$WARMUP" \
  --steps "$STEPS" --json "$OUT/official.json"
if [ ${#extras[@]} -gt 0 ]; then
  echo "### official-extra: start :: $(joined "${extras[@]}")"
  $PY benchmarks/official/bench_extra.py .bench/export --device cpu --configs "$(joined "${extras[@]}")" \
    --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/official-extra.json" || echo "### official-extra: some failed"
fi
if [ $maskfeat = 1 ]; then
  echo "### official-maskfeat: start"
  $PY benchmarks/official/bench_extra.py .bench-cpu/export --device cpu --configs maskfeat-224 --warmup "$WARMUP" \
    --steps "$STEPS" --json "$OUT/official-maskfeat.json" || echo "### official-maskfeat: failed"
fi
echo "### ours: start :: ${targets[*]}"
$PY -m repro profile --warmup "$WARMUP" --steps "$STEPS" --no-loader --json "$OUT/repro-cpu.json" "${targets[@]}"
if [ ${#parity[@]} -gt 0 ]; then
  echo "### parity: start :: ${parity[*]}"
  $PY benchmarks/official/parity.py "${parity[@]}" --json "$OUT/parity.json" || echo "### parity: some failed"
fi
echo "### done"
} 2>&1 | tee "$OUT/log.txt"
rm -f "$OUT/profiles-scratch.json"
