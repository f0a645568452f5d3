#!/usr/bin/env bash
# Reproduce the three shipped models from scratch: train from synthetic data, then export to ONNX with metadata.
# The shipped files were trained with KERAS_BACKEND=jax on one GPU with 5 CPU workers per network and the
# step counts below; on a CPU (TensorFlow backend) the same commands run, only slower (see the model cards).
# Usage: bash training/reproduce.sh [OUT_DIR] [LABELMAPS (PAM50 folder or .npz)]
set -euo pipefail
OUT=${1:-runs/reproduce}
PAM50=${2:-../shared/data/labelmaps/PAM50}
WORKERS=${WORKERS:-5}
mkdir -p "$OUT"
python -m cordseg.training.train centerline --out "$OUT/centerline" --labelmaps "$PAM50" --workers "$WORKERS" --batch-size 32 --steps 1500 --max-minutes 11.3 --learning-rate 2e-3
python -m cordseg.training.train sc --out "$OUT/sc" --labelmaps "$PAM50" --workers "$WORKERS" --batch-size 8 --steps 3000 --max-minutes 11.3 --learning-rate 2e-3
python -m cordseg.training.train lesion --out "$OUT/lesion" --labelmaps "$PAM50" --workers "$WORKERS" --batch-size 8 --steps 3000 --max-minutes 11.3 --learning-rate 2e-3
last() { ls "$1"/ema_*.weights.h5 | tail -1; }
python -m cordseg.training.export centerline "$(last "$OUT/centerline")" "$OUT/cordseg_centerline.onnx" --contrast t1,t2,t2s,dwi --summary "CNN1 reproduced with training/reproduce.sh"
python -m cordseg.training.export sc "$(last "$OUT/sc")" "$OUT/cordseg_sc.onnx" --contrast t1,t2,t2s --summary "CNN2-SC reproduced with training/reproduce.sh"
python -m cordseg.training.export lesion "$(last "$OUT/lesion")" "$OUT/cordseg_lesion.onnx" --contrast t2,t2s --summary "CNN2-lesion reproduced with training/reproduce.sh"
