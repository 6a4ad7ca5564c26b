#!/usr/bin/env bash
# Rebuild the embedded default shipped in src/lazydit/assets/ (docs/embedded.md says what each step gives).
#   bash scripts/build_embedded.sh [RUN_DIR]        needs: apt-get install -y dataset-fashion-mnist
# Steps are resumable: rerun the script after an interruption and each stage continues from its checkpoint.
set -euo pipefail
run=${1:-runs/embedded}
assets=src/lazydit/assets
mkdir -p "$run" "$assets"

# 1. the base model: class-conditional pixel DiT (DiT-FMNIST), EMA, on this CPU (stops after --max-minutes)
lazydit pretrain --out "$run/pretrain" --iters 100000 --batch-size 64 --lr 3e-4 --ema-decay 0.999 \
  --ckpt-every 500 --max-minutes "${PRETRAIN_MINUTES:-80}" --resume
cp "$run/pretrain/model.safetensors" "$assets/fmnist_dit.safetensors"

# 2. gates per T (reference recipe: AdamW lr 1e-4, wd 0, 500 steps), then a threshold calibrated to the ratio
gate() {  # T rho target
  lazydit train-gates --model "$assets/fmnist_dit.safetensors" --steps "$1" --rho "$2" --iters 500 \
    --batch-size 64 --ckpt-every 50 --out "$run/gates_T$1" --target-ratio "$3" --cfg 2.0 \
    $( [ -f "$run/gates_T$1/checkpoint.pt" ] && echo --resume )
  cp "$run/gates_T$1/gates.safetensors" "$assets/fmnist_gates_T$1.safetensors"
}
gate 50 "${RHO_50:-1e-2}" 0.48
gate 20 "${RHO_20:-1e-2}" 0.45
gate 10 "${RHO_10:-1e-2}" 0.30
ls -l "$assets"
