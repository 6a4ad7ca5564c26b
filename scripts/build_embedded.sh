#!/usr/bin/env bash
# Rebuild the embedded default shipped in src/lazydit/assets/ (docs/embedded.md says what each step gives):
# a small autoencoder, a latent DiT on its 4x14x14 latents, and LazyDiT gates for T = 10, 20, 40, 50 (+ look-ahead 50,
# forecast 10, 20, 50, every-step forecast 20, 50).
#   bash scripts/build_embedded.sh [RUN_DIR]                 everything; needs: apt-get install -y dataset-fashion-mnist
#   bash scripts/build_embedded.sh RUN_DIR gate 50 1e-2 0.48 lookahead     one stage only
# Steps are resumable: rerun the script after an interruption and each stage continues from its checkpoint.
set -euo pipefail
run=${1:-runs/embedded}
assets=src/lazydit/assets
mkdir -p "$run" "$assets"

# 1. the autoencoder: 28x28x1 <-> 14x14x4 latents (KL autoencoder, MSE + 1e-4 KL), ~9 minutes on the 2-core CPU
autoencoder() {
  lazydit train-autoencoder --out "$run/autoencoder" --width 48 --downsample 1 --iters 1500 --batch-size 128 \
    --lr 2e-3 --kl-weight 1e-4 --ckpt-every 250 $( [ -f "$run/autoencoder/checkpoint.pt" ] && echo --resume )
  cp "$run/autoencoder/autoencoder.safetensors" "$assets/fmnist_autoencoder.safetensors"
}

# 2. the base model: class-conditional latent DiT (DiT-FMNIST-Latent, patch 2 on the latents: 49 tokens), EMA,
#    on this CPU (stops after --max-minutes; the model file names fmnist_autoencoder.safetensors as its decoder)
base() {
  lazydit pretrain --model-name DiT-FMNIST-Latent --autoencoder "$assets/fmnist_autoencoder.safetensors" \
    --out "$run/pretrain" --iters 100000 --batch-size 64 --lr 3e-4 --ema-decay 0.999 --ckpt-every 500 \
    --max-minutes "${PRETRAIN_MINUTES:-55}" $( [ -f "$run/pretrain/checkpoint.pt" ] && echo --resume )
  cp "$run/pretrain/model.safetensors" "$assets/fmnist_dit.safetensors"
}

# 3. gates per T (reference recipe: AdamW lr 1e-4, wd 0, 500 steps), then a threshold calibrated to the ratio;
#    a kind adds the training options lazydit.assets.TRAIN_FLAGS gives it: lookahead, forecast (first-order forecast
#    reuse), or every-forecast (gates on every step, trained on their own skip chains of up to 3, with forecast reuse)
gate() {  # T rho target [kind]
  local name="gates_T$1${4:+_$4}" flags
  flags=$(python3 -c 'import sys; from lazydit.assets import TRAIN_FLAGS as f; k = sys.argv[1] or "reference"
sys.exit("unknown gate kind: " + k + " (kinds: " + " ".join(f) + ")") if k not in f else print(f[k])' "${4:-}")
  lazydit train-gates --model "$assets/fmnist_dit.safetensors" --steps "$1" --rho "$2" --iters 500 \
    --batch-size 64 --ckpt-every 50 --out "$run/$name" --target-ratio "$3" --cfg 2.0 $flags \
    $( [ -f "$run/$name/checkpoint.pt" ] && echo --resume )
  cp "$run/$name/gates.safetensors" "$assets/fmnist_$name.safetensors"
}

if [ $# -gt 1 ]; then shift; "$@"; exit; fi
autoencoder
base
gate 50 "${RHO_50:-1e-2}" 0.48
gate 20 "${RHO_20:-1e-2}" 0.45
gate 10 "${RHO_10:-1e-2}" 0.30
gate 40 "${RHO_40:-1e-2}" 0.48
gate 50 "${RHO_50:-1e-2}" 0.48 lookahead  # look-ahead gates (beyond the paper; the fast sampling path)
gate 20 "${RHO_20:-1e-2}" 0.50 forecast   # forecast reuse (beyond the paper; docs/beyond_paper_notes.md)
gate 10 "${RHO_10:-1e-2}" 0.30 forecast
gate 50 "${RHO_50:-1e-2}" 0.48 forecast
gate 20 "${RHO_20:-1e-2}" 0.70 every-forecast  # every step, chain-aware, forecast: past the parity's 50%
gate 50 "${RHO_50:-1e-2}" 0.70 every-forecast
python scripts/embedded_curves.py "$run"  # docs/images/embedded_training.png
ls -l "$assets"
