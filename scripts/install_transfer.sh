#!/usr/bin/env bash
# Installs the transfer frameworks into a venv: mmcv 2.1.0 with CPU ops (built from its sdist once, the wheel kept in
# a cache keyed by the mmcv, torch and Python versions), mmengine, mmsegmentation, mmdet, pycocotools, and
# detectron2 (PyPI's `sal-detectron2` packaging of upstream; see README "Transfer" for an upstream source install).
# Usage: scripts/install_transfer.sh [VENV]   (default .venv). Idempotent: a second run takes seconds.
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"
PIP=("$VENV/bin/pip" -q --disable-pip-version-check)
MMCV=2.1.0
CACHE="${REPRO_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/repro/wheels}"
tv="$("$PY" -c 'import sys, importlib.metadata as m; v = sys.version_info; print("torch" + m.version("torch").split("+")[0] + f"-cp{v[0]}{v[1]}")')"
dir="$CACHE/mmcv-$MMCV-$tv"

have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

if ! have mmcv "$MMCV"; then
  if ! ls "$dir"/mmcv-*.whl >/dev/null 2>&1; then
    echo "[transfer] building mmcv $MMCV with CPU ops for $tv (about 16 min on 2 cores; cached in $dir)"
    # setuptools<81 keeps pkg_resources, which mmcv's setup.py imports
    "${PIP[@]}" install wheel ninja "setuptools==80.9.0"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV" -d "$work"
    tar xzf "$work/mmcv-$MMCV.tar.gz" -C "$work"
    # torch 2.14's headers refuse C++14/17
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV/setup.py"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${PIP[@]}" wheel --no-build-isolation --no-deps "$work/mmcv-$MMCV" -w "$work/out"
    mkdir -p "$dir"
    tmp="$(mktemp -d "$CACHE/.tmp.XXXXXX")"
    cp "$work"/out/mmcv-*.whl "$tmp"/ && mv "$tmp"/mmcv-*.whl "$dir"/ && rmdir "$tmp"
  fi
  "${PIP[@]}" install --no-deps "$dir"/mmcv-*.whl
  "${PIP[@]}" install "mmcv==$MMCV" --no-build-isolation --find-links "$dir"  # mmcv's own dependencies
fi
"${PIP[@]}" install -e ".[transfer]"
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
