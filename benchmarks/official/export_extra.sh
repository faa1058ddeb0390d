#!/usr/bin/env bash
# Export the official LocalMIM (ViT, Swin), SimMIM, BEiT and GreenMIM model code from git mirrors into DEST, at run
# time (nothing of it is kept in this repository), with only the compatibility edits this venv / the GPU image
# (torch 2.x, timm 1.x, numpy 2) needs; bench_extra.py times it. Edits, each checked below:
#   E1  np.float -> np.float64 in LocalMIM's (both) and GreenMIM's util/pos_embed.py (numpy >= 1.24 removed the
#       alias; the same dtype)
#   E2  HOGLayer's out.scatter_(1, idx, norm) -> norm.to(out.dtype) in both LocalMIM models_mim.py: under autocast
#       the Sobel conv gives bf16/fp16 magnitudes and torch >= 1.12 refuses a scatter into the fp32 histogram from
#       another dtype (older torch converted silently, which is what the authors ran); the values are unchanged
#   E3  GreenMIM modeling/model_factory.py: the import of green_twins_models (Twins encoders) is dropped: that file
#       imports spconv (sparse_conv_spconv.py), which is not installed; only the Twins factory function uses it, and
#       green_twins_models.py / sparse_conv_*.py are not exported
#   E4  np.int -> int in BEiT's masking_generator.py (numpy >= 1.24 removed the alias, which was the builtin int)
# Nothing else is edited. timm 1.x still serves the deprecated timm.models.layers / timm.models.registry imports
# (with a warning; BEiT's modeling_finetune.py re-registers timm's own beit_* names, which timm only warns about),
# and timm's Block no longer takes qk_scale, which none of these files pass to it.
# BEiT's tokenizer: beit/dall_e (OpenAI's dVAE encoder, in the unilm repo) and modeling_discrete_vae.py are exported
# so that bench_extra.py can time the official step with its tokenizer forward (random dVAE weights: the released
# encoder.pkl is not obtainable here, and the cost does not depend on the values). They import attrs, requests and
# einops (on the GPU image; not in .venv: put them on PYTHONPATH for a CPU check).
# MaskFeat (facebookresearch/SlowFast) is exported by export_maskfeat.sh into another folder: its import chain needs
# packages the GPU image lacks (detectron2, PyAV, pytorchvideo, fvcore, iopath) and more than a device call carries,
# so it is a CPU-only export.
# Usage: export_extra.sh MIRRORS_DIR DEST   (MIRRORS_DIR holds huawei-noah+Efficient-Computing/repo,
#        microsoft+SimMIM/repo, microsoft+unilm/repo and LayneH+GreenMIM/repo, bare git mirrors as the search tool's
#        fetch lays them out; a missing mirror skips its code with a message, the others are still exported)
# Layout: DEST/localmim_vit/{models_mim.py,util/pos_embed.py}  DEST/localmim_swin/{models_mim.py,util/pos_embed.py}
#         DEST/simmim/{models/*.py,data/data_simmim.py}
#         DEST/beit/{modeling_pretrain.py,modeling_finetune.py,masking_generator.py,modeling_discrete_vae.py,
#                    dall_e/{__init__,encoder,decoder,utils}.py}
#         DEST/greenmim/{modeling/{__init__,model_factory,base_green_models,green_swin_models,
#                        group_window_attention}.py,util/pos_embed.py}
#         each with COMMIT (the mirror's HEAD)
set -eu
M=$1; OUT=$2; mkdir -p "$OUT"
have() { [ -d "$M/$1/repo" ] || { echo "skipped $2: no mirror $M/$1/repo" >&2; return 1; }; }
exp() { # exp MIRROR SUBDIR NAME FILE...: git show MIRROR's HEAD:SUBDIR/FILE into OUT/NAME/FILE
  local r=$1 sub=$2 n=$3; shift 3
  for f in "$@"; do
    mkdir -p "$OUT/$n/$(dirname "$f")"
    git -C "$M/$r/repo" show "HEAD:$sub$f" > "$OUT/$n/$f"
  done
  git -C "$M/$r/repo" rev-parse HEAD > "$OUT/$n/COMMIT"
}
if have huawei-noah+Efficient-Computing LocalMIM; then
  L=Self-supervised/LocalMIM
  exp huawei-noah+Efficient-Computing "$L/ViT/"  localmim_vit  models_mim.py util/pos_embed.py
  exp huawei-noah+Efficient-Computing "$L/Swin/" localmim_swin models_mim.py util/pos_embed.py
  for d in localmim_vit localmim_swin; do
    sed -i 's/dtype=np\.float)/dtype=np.float64)/' "$OUT/$d/util/pos_embed.py"                                  # E1
    sed -i 's/^\( *out\.scatter_(1, phase_int\.floor()\.long() % self\.nbins, \)norm)$/\1norm.to(out.dtype))/' \
      "$OUT/$d/models_mim.py"                                                                                    # E2
    grep -q 'norm.to(out.dtype))' "$OUT/$d/models_mim.py" && grep -q 'dtype=np.float64)' "$OUT/$d/util/pos_embed.py"
  done
fi
if have microsoft+SimMIM SimMIM; then
  exp microsoft+SimMIM "" simmim models/__init__.py models/build.py models/simmim.py models/swin_transformer.py \
    models/vision_transformer.py data/data_simmim.py
fi
if have microsoft+unilm BEiT; then
  exp microsoft+unilm beit/ beit modeling_pretrain.py modeling_finetune.py masking_generator.py \
    modeling_discrete_vae.py dall_e/__init__.py dall_e/encoder.py dall_e/decoder.py dall_e/utils.py
  sed -i 's/dtype=np\.int)/dtype=int)/' "$OUT/beit/masking_generator.py"                                        # E4
  grep -q 'dtype=int)' "$OUT/beit/masking_generator.py"
  if grep -q 'np\.int\b' "$OUT/beit/masking_generator.py"; then echo "export_extra.sh: BEiT edit E4 did not apply" >&2
    exit 1; fi
fi
if have LayneH+GreenMIM GreenMIM; then
  exp LayneH+GreenMIM "" greenmim modeling/__init__.py modeling/model_factory.py modeling/base_green_models.py \
    modeling/green_swin_models.py modeling/group_window_attention.py util/pos_embed.py
  sed -i 's/dtype=np\.float)/dtype=np.float64)/' "$OUT/greenmim/util/pos_embed.py"                               # E1
  G=$OUT/greenmim
  sed -i '/^from \.green_twins_models import ALTGVT as TwinsTransformer$/d' "$G/modeling/model_factory.py"        # E3
  grep -q 'dtype=np.float64)' "$G/util/pos_embed.py"
  if grep -q 'np\.float)\|green_twins_models' "$G/util/pos_embed.py" "$G/modeling/model_factory.py"
  then echo "export_extra.sh: GreenMIM edit E1/E3 did not apply" >&2; exit 1; fi
fi
echo "exported into $OUT"
