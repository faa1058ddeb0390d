#!/usr/bin/env bash
# Export the official MaskFeat code, facebookresearch/SlowFast's `slowfast` package and
# configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml, into DEST/maskfeat with NO edits (nothing of it is kept in this
# repository), and put the packages its import chain needs that .venv lacks into DEST/maskfeat/_deps:
#   pytorchvideo from its git mirror (SlowFast imports names, e.g. cat_all_gather, that its last PyPI release 0.1.5
#   lacks), and psutil, simplejson and PyAV (av) from PyPI, pinned.
# Importing slowfast.models.masked reaches, at import time, the video datasets (PyAV, OpenCV), fvcore / iopath,
# detectron2 (ROIAlign in head_helper), matplotlib, pandas and scipy; .venv has the others. The MaskFeat step uses
# none of them. CPU only: installed, PyAV alone is about 100 MB, more than a device call carries, and the GPU image
# has no detectron2, so MaskFeat has no official GPU timing. benchmarks/official/bench_extra.py times it
# (config maskfeat-224) and benchmarks/cpu_job.sh runs it beside ours.
# Usage: export_maskfeat.sh MIRRORS_DIR [DEST]   (MIRRORS_DIR holds facebookresearch+SlowFast/repo and
#        facebookresearch+pytorchvideo/repo as the search tool's fetch lays them out; DEST defaults to
#        .bench-cpu/export, outside the .bench/ folder that device calls carry)
set -eu
M=$1; OUT=${2:-.bench-cpu/export}; PY=${PY:-.venv/bin/python}
SF=$M/facebookresearch+SlowFast/repo; PV=$M/facebookresearch+pytorchvideo/repo
for r in "$SF" "$PV"; do [ -d "$r" ] || { echo "export_maskfeat.sh: no mirror $r" >&2; exit 1; }; done
D=$OUT/maskfeat
rm -rf "$D"; mkdir -p "$D/configs" "$D/_deps"
git -C "$SF" archive HEAD slowfast | tar -x -C "$D"
git -C "$SF" show HEAD:configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml > "$D/configs/in1k_VIT_B_MaskFeat_PT.yaml"
git -C "$SF" rev-parse HEAD > "$D/COMMIT"
want=$(git -C "$SF" ls-tree -r --name-only HEAD slowfast | wc -l)
got=$(find "$D/slowfast" -type f | wc -l)
[ "$want" = "$got" ] || { echo "export_maskfeat.sh: $got of $want slowfast files exported" >&2; exit 1; }
git -C "$PV" archive HEAD pytorchvideo | tar -x -C "$D/_deps"
git -C "$PV" rev-parse HEAD > "$D/_deps/PYTORCHVIDEO_COMMIT"
$PY -m pip install -q --no-deps --target "$D/_deps" psutil==7.2.2 simplejson==4.3.0 av==18.1.0
PYTHONPATH=$D:$D/_deps $PY -W ignore -c 'import slowfast.models.masked' \
  || { echo "export_maskfeat.sh: slowfast.models.masked does not import (above)" >&2; exit 1; }
echo "exported MaskFeat (SlowFast $(cut -c1-12 "$D/COMMIT")) into $D"
