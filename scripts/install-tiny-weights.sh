#!/bin/sh
# Copies the exported models of the tiny training runs (docs/training.md) over the built-in
# profile's files in models/weights/tiny/ (names as in its profile.toml). Usage:
#   scripts/install-tiny-weights.sh [RUNS_DIR]      (default data/runs)
set -eu
runs=${1:-data/runs}
dest=$(dirname "$0")/../models/weights/tiny
for f in tiny-ae/vae/config.json tiny-ae/vae/diffusion_pytorch_model.safetensors \
         tiny-base/unet.safetensors tiny-base/unet.json \
         tiny-hop1/unet.safetensors tiny-hop1/unet.json \
         tiny-hop2/unet.safetensors tiny-hop2/unet.json; do
    [ -f "$runs/$f" ] || { echo "install-tiny-weights: $runs/$f is missing (has that run finished?)" >&2; exit 1; }
done
cp "$runs/tiny-ae/vae/config.json" "$runs/tiny-ae/vae/diffusion_pytorch_model.safetensors" "$dest/autoencoder/"
cp "$runs/tiny-base/unet.safetensors" "$dest/base.safetensors"
cp "$runs/tiny-base/unet.json" "$dest/base.json"
for hop in 1 2; do
    cp "$runs/tiny-hop$hop/unet.safetensors" "$dest/hop$hop.safetensors"
    cp "$runs/tiny-hop$hop/unet.json" "$dest/hop$hop.json"
done
du -cb "$dest"/*.safetensors "$dest"/autoencoder/*.safetensors | tail -1 | awk '{printf "install-tiny-weights: %.1f MB of weights in %s\n", $1 / 1e6, "'"$dest"'"}'
