#!/usr/bin/env bash
# Reproduce the shipped models from scratch: one command per model runs every training stage the
# shipped file went through (training/recipes.py), then exports it to ONNX with its metadata.
#
# Most shipped stages were trained on one GPU with Keras 3 on JAX (KERAS_BACKEND=jax; 4-5 CPU workers per
# network, several networks at once); CNN1's stages 3-6 ran on two CPU cores with TensorFlow.
# On a CPU every command runs, only slower (the model cards give the speeds). Stages limited by time
# (--max-minutes in the recipe) do as many steps as the machine allows in that time; stages that a time
# limit stopped at a known step (stop_at in the recipe) stop at that step on any machine. A stopped command
# resumes where it stopped when run again with the same --out.
# Usage: bash training/reproduce.sh [OUT_DIR] [LABELMAPS (folder with PAM50/ and spinegeneric/)]
set -euo pipefail
OUT=${1:-runs/reproduce}
MAPS=${2:-../shared/data/labelmaps}
WORKERS=${WORKERS:-5}
mkdir -p "$OUT"
mkdir -p "$OUT/conus"
for stage in stage1 stage2; do  # the conus recipe begins with the cord recipe's stages: train them once
  [ -e "$OUT/conus/$stage" ] || ln -s "../sc/$stage" "$OUT/conus/$stage"
done
for task in centerline sc conus lesion; do
  cordseg train "$task" --recipe shipped --out "$OUT/$task" --labelmaps "$MAPS" --workers "$WORKERS" \
    --export "$OUT/cordseg_$task.onnx"
done
