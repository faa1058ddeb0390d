#!/usr/bin/env bash
# Export the official LocalMIM (ViT, Swin) and SimMIM model code from git mirrors into DEST, at run time (nothing of it
# is kept in this repository), with only the compatibility edits this venv (torch 2.x, timm 1.x, numpy 2) needs:
#   E1  np.float -> np.float64 in both LocalMIM util/pos_embed.py (numpy >= 1.24 removed the alias; same dtype)
#   E2  HOGLayer's out.scatter_(1, idx, norm) -> norm.to(out.dtype) in both LocalMIM models_mim.py: under autocast
#       the Sobel conv gives bf16/fp16 magnitudes and torch >= 1.12 refuses a scatter into the fp32 histogram from
#       another dtype (older torch converted silently, which is what the authors ran); the values are unchanged
# Nothing else is edited. timm 1.x still serves the deprecated timm.models.layers imports (with a warning), and
# timm's Block no longer takes qk_scale, which none of these files pass to it.
# Usage: export_localmim.sh MIRRORS_DIR DEST   (MIRRORS_DIR holds huawei-noah+Efficient-Computing/repo and
#        microsoft+SimMIM/repo, bare git mirrors as the search tool's fetch lays them out)
# Layout: DEST/localmim_vit/{models_mim.py,util/pos_embed.py}  DEST/localmim_swin/{models_mim.py,util/pos_embed.py}
#         DEST/simmim/{models/*.py,data/data_simmim.py}
set -eu
M=$1; OUT=$2; mkdir -p "$OUT"
exp() { # exp MIRROR SUBDIR NAME FILE...: git show MIRROR's HEAD:SUBDIR/FILE into OUT/NAME/FILE
  local r=$1 sub=$2 n=$3; shift 3
  for f in "$@"; do
    mkdir -p "$OUT/$n/$(dirname "$f")"
    git -C "$M/$r/repo" show "HEAD:$sub$f" > "$OUT/$n/$f"
  done
  git -C "$M/$r/repo" rev-parse HEAD > "$OUT/$n/COMMIT"
}
L=Self-supervised/LocalMIM
exp huawei-noah+Efficient-Computing "$L/ViT/"  localmim_vit  models_mim.py util/pos_embed.py
exp huawei-noah+Efficient-Computing "$L/Swin/" localmim_swin models_mim.py util/pos_embed.py
exp microsoft+SimMIM "" simmim models/__init__.py models/build.py models/simmim.py models/swin_transformer.py \
  models/vision_transformer.py data/data_simmim.py
sed -i 's/dtype=np\.float)/dtype=np.float64)/' "$OUT/localmim_vit/util/pos_embed.py" "$OUT/localmim_swin/util/pos_embed.py"  # E1
sed -i 's/^\( *out\.scatter_(1, phase_int\.floor()\.long() % self\.nbins, \)norm)$/\1norm.to(out.dtype))/' \
  "$OUT/localmim_vit/models_mim.py" "$OUT/localmim_swin/models_mim.py"                                           # E2
grep -q 'norm.to(out.dtype))' "$OUT/localmim_vit/models_mim.py" && grep -q 'norm.to(out.dtype))' "$OUT/localmim_swin/models_mim.py"
grep -q 'dtype=np.float64)' "$OUT/localmim_vit/util/pos_embed.py" && grep -q 'dtype=np.float64)' "$OUT/localmim_swin/util/pos_embed.py"
echo "exported into $OUT"
