#!/usr/bin/env bash
# Rebuild the embedded default shipped in src/lazydit/assets/ (docs/embedded.md says what each step gives).
#   bash scripts/build_embedded.sh [RUN_DIR]                 everything; needs: apt-get install -y dataset-fashion-mnist
#   bash scripts/build_embedded.sh RUN_DIR gate 50 1e-2 0.48 lookahead     one stage only
# Steps are resumable: rerun the script after an interruption and each stage continues from its checkpoint.
set -euo pipefail
run=${1:-runs/embedded}
assets=src/lazydit/assets
mkdir -p "$run" "$assets"

# 1. the base model: class-conditional pixel DiT (DiT-FMNIST), EMA, on this CPU (stops after --max-minutes)
base() {
  lazydit pretrain --out "$run/pretrain" --iters 100000 --batch-size 64 --lr 3e-4 --ema-decay 0.999 \
    --ckpt-every 500 --max-minutes "${PRETRAIN_MINUTES:-80}" --resume
  cp "$run/pretrain/model.safetensors" "$assets/fmnist_dit.safetensors"
}

# 2. gates per T (reference recipe: AdamW lr 1e-4, wd 0, 500 steps), then a threshold calibrated to the ratio
gate() {  # T rho target [lookahead]
  local name="gates_T$1${4:+_lookahead}"
  lazydit train-gates --model "$assets/fmnist_dit.safetensors" --steps "$1" --rho "$2" --iters 500 \
    --batch-size 64 --ckpt-every 50 --out "$run/$name" --target-ratio "$3" --cfg 2.0 ${4:+--lookahead} \
    $( [ -f "$run/$name/checkpoint.pt" ] && echo --resume )
  cp "$run/$name/gates.safetensors" "$assets/fmnist_$name.safetensors"
}

if [ $# -gt 1 ]; then shift; "$@"; exit; fi
base
gate 50 "${RHO_50:-1e-2}" 0.48
gate 20 "${RHO_20:-1e-2}" 0.45
gate 10 "${RHO_10:-1e-2}" 0.30
gate 40 "${RHO_40:-1e-2}" 0.48
gate 50 "${RHO_50:-1e-2}" 0.48 lookahead  # look-ahead gates (beyond the paper; the fast sampling path)
ls -l "$assets"
