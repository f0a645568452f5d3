#!/usr/bin/env bash
# Reproduce the three shipped models from scratch: train from synthetic data, then export to ONNX with metadata.
#
# The shipped files were trained in stages (the model cards give each stage's steps and time):
#   - on one GPU, Keras 3 on JAX (KERAS_BACKEND=jax), 4-5 CPU workers per network, several networks at once;
#   - the lesion model's last stage on two CPU cores (TensorFlow).
# On a CPU the same commands run, only slower (see the model cards). A run stopped by --max-minutes resumes
# where it stopped when started again with the same --out.
# Usage: bash training/reproduce.sh [OUT_DIR] [LABELMAPS (folder with PAM50/ and spinegeneric/)]
set -euo pipefail
OUT=${1:-runs/reproduce}
MAPS=${2:-../shared/data/labelmaps}
WORKERS=${WORKERS:-5}
mkdir -p "$OUT"
T="python -m cordseg.training.train"
last() { ls "$1"/ema_*.weights.h5 | tail -1; }

# CNN1: PAM50 only, then with the spine-generic manual masks mixed in.
$T centerline --out "$OUT/centerline1" --labelmaps "$MAPS/PAM50" --workers "$WORKERS" --batch-size 32 \
   --steps 1500 --max-minutes 11.3 --learning-rate 2e-3
$T centerline --out "$OUT/centerline2" --labelmaps "$MAPS" --workers "$WORKERS" --batch-size 32 --steps 1100 \
   --learning-rate 1e-3 --init-weights "$(last "$OUT/centerline1")"

# CNN2-SC: PAM50 only (a continuation with the spine-generic masks scored lower on real images; not shipped).
$T sc --out "$OUT/sc" --labelmaps "$MAPS/PAM50" --workers "$WORKERS" --batch-size 8 --steps 3000 \
   --max-minutes 11.3 --learning-rate 2e-3

# CNN2-lesion: from scratch on 48^3 patches, then fine-tuned on 32^3 patches (two CPU cores).
$T lesion --out "$OUT/lesion1" --labelmaps "$MAPS" --workers "$WORKERS" --batch-size 8 --steps 4000 \
   --learning-rate 2e-3 --pos-weight 2 --seed 1
$T lesion --out "$OUT/lesion2" --labelmaps "$MAPS" --workers 1 --batch-size 4 --patch-shape 32x32x32 \
   --steps 1500 --max-minutes 60 --learning-rate 5e-4 --pos-weight 2 --seed 11 \
   --init-weights "$(last "$OUT/lesion1")"

E="python -m cordseg.training.export"
$E centerline "$(last "$OUT/centerline2")" "$OUT/cordseg_centerline.onnx" --contrast t1,t2,t2s,dwi \
   --summary "CNN1 reproduced with training/reproduce.sh"
$E sc "$(last "$OUT/sc")" "$OUT/cordseg_sc.onnx" --contrast t1,t2,t2s --summary "CNN2-SC reproduced with training/reproduce.sh"
$E lesion "$(last "$OUT/lesion2")" "$OUT/cordseg_lesion.onnx" --contrast t2,t2s \
   --summary "CNN2-lesion reproduced with training/reproduce.sh"
