#!/usr/bin/env bash
# Installs the transfer frameworks into a venv: mmcv 2.1.0 with its compiled ops (built from its sdist once, the
# wheel kept in a cache keyed by the mmcv, torch and Python versions and the ops' device), mmengine, mmsegmentation,
# mmdet, pycocotools, and detectron2 (PyPI's `sal-detectron2` packaging of upstream; see README "Transfer" for an
# upstream source install).
# Usage: scripts/install_transfer.sh [VENV]   (default .venv). Idempotent: a second run takes seconds.
# mmcv's ops are CPU ops unless torch sees a GPU (or FORCE_CUDA=1), as mmcv's own setup.py decides; a CUDA build
# needs the CUDA toolkit (nvcc, CUDA_HOME). CUDA_VISIBLE_DEVICES= builds CPU ops on a GPU machine.
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"
PIP=("$VENV/bin/pip" -q --disable-pip-version-check)
MMCV=2.1.0
CACHE="${REPRO_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/repro/wheels}"
fail() { echo "[transfer] $*" >&2; exit 1; }

tv="$("$PY" -c 'import sys, importlib.metadata as m; v = sys.version_info; print("torch" + m.version("torch").split("+")[0] + f"-cp{v[0]}{v[1]}")')" \
  || fail "no torch in $VENV: install the project first (make install)"
# the ops' device: mmcv compiles CUDA kernels when torch sees a GPU or FORCE_CUDA=1, CPU kernels otherwise. A CPU
# wheel on a GPU job fails in RoIAlign / NMS, a CUDA wheel does not load without the CUDA libraries: keyed apart
# (CPU wheels keep the key they always had).
ops="$("$PY" -c 'import os, torch; print("cu" + torch.version.cuda.replace(".", "") if torch.version.cuda and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1") else "cpu")')" \
  || fail "could not tell whether torch sees a GPU"
dir="$CACHE/mmcv-$MMCV-$tv"
[ "$ops" = cpu ] || dir="$dir-$ops"

have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

build_mmcv() {  # the sdist with the fixes ENVIRONMENT.md lists; the wheel lands in "$dir" by one rename
  command -v "${CXX:-c++}" >/dev/null || fail "no C++ compiler (${CXX:-c++}) to build mmcv's ops: apt-get install g++"
  "$PY" -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]; raise SystemExit(not os.path.isfile(os.path.join(p, "Python.h")))' \
    || fail "Python.h is missing for $PY (mmcv's ops are a C++ extension): install the Python headers (python3-dev)"
  if [ "$ops" != cpu ]; then
    "$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; import os, sys; sys.exit(not (CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))))' 2>/dev/null \
      || fail "torch sees a GPU (or FORCE_CUDA=1) but there is no nvcc: set CUDA_HOME to the CUDA toolkit of this torch ($ops), or build CPU-only ops with CUDA_VISIBLE_DEVICES= (mmdet's RoIAlign/NMS then fail on GPU tensors)"
    echo "[transfer] building mmcv $MMCV with CUDA ($ops) and CPU ops for $tv (an hour or more; cached in $dir)"
  else
    echo "[transfer] building mmcv $MMCV with CPU ops for $tv (about 16 min on 2 cores; cached in $dir)"
  fi
  # setuptools<81 keeps pkg_resources, which mmcv's setup.py imports
  "${PIP[@]}" install wheel ninja "setuptools==80.9.0"
  work="$(mktemp -d)"
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$CACHE/.tmp.XXXXXX")"  # beside "$dir": the final mv is a rename on one file system
  trap 'rm -rf "$work" "$tmp"' EXIT
  # no build isolation: the sdist's metadata step runs setup.py, which needs torch and pkg_resources from this venv
  "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV" -d "$work" \
    || fail "could not download the mmcv $MMCV sdist from PyPI"
  tar xzf "$work"/mmcv-"$MMCV".tar.gz -C "$work"
  src="$work/mmcv-$MMCV"
  # torch 2.14's headers refuse C++14/17: every -std flag of the sdist's setup.py goes to C++20
  grep -q -- '-std=c++17' "$src/setup.py" || fail "mmcv's setup.py has no -std=c++17 flag: the C++20 fix does not apply"
  sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$src/setup.py"
  FORCE_CUDA="$([ "$ops" = cpu ] && echo 0 || echo 1)" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps "$src" -w "$work/out" \
    || fail "building mmcv $MMCV failed (compiler output above); nothing was cached"
  mkdir -p "$dir"
  cp "$work"/out/mmcv-*.whl "$tmp"/
  mv "$tmp"/mmcv-*.whl "$dir"/
  rmdir "$tmp"
}

if ! have mmcv "$MMCV"; then
  ls "$dir"/mmcv-*.whl >/dev/null 2>&1 || build_mmcv
  "${PIP[@]}" install --no-deps "$dir"/mmcv-*.whl
  "${PIP[@]}" install "mmcv==$MMCV" --no-build-isolation --find-links "$dir"  # mmcv's own dependencies
fi
"${PIP[@]}" install -e ".[transfer]"
"$PY" -c 'from mmcv.ops import nms, RoIAlign' \
  || fail "mmcv $MMCV is installed but its compiled ops do not load (above); remove $dir, pip uninstall mmcv, rerun"
# detectron2's model_zoo imports pkg_resources, which setuptools>=81 no longer has
"${PIP[@]}" install "setuptools<81"
# detectron2: PyPI's sal-detectron2 is upstream detectron2 built only for cp310; its pure-Python part runs on 3.11
# (its compiled _C does not load; ViTDet's Mask R-CNN takes RoIAlign/NMS from torchvision). Cluster users with a
# compiler install upstream instead: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
if ! "$PY" -c "import detectron2" 2>/dev/null; then
  d2="$(mktemp -d)"
  "${PIP[@]}" download --no-deps --only-binary :all: --python-version 3.10 --platform linux_x86_64 -d "$d2" \
    sal-detectron2==0.7.2
  cp "$d2"/sal_detectron2-0.7.2-cp310-none-any.whl "$d2"/sal_detectron2-0.7.2-py3-none-any.whl  # pip refuses cp310 on 3.11
  "${PIP[@]}" install --no-deps "$d2"/sal_detectron2-0.7.2-py3-none-any.whl
  rm -rf "$d2"
fi
echo "[transfer] $("$PY" -c 'import mmcv, mmseg, mmdet, detectron2; print(f"mmcv {mmcv.__version__}, mmseg {mmseg.__version__}, mmdet {mmdet.__version__}, detectron2 {detectron2.__version__}")')"
