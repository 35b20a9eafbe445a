#!/usr/bin/env bash
# Compiles the workspace with `--features cuda` for compute capability 9.0 on a machine without
# a GPU, so the code behind the feature cannot rot (.ci/run calls it after the tests).
#
#   scripts/cuda-check.sh
#
# `cargo check --all-targets`, not a build: it runs every build script, so candle-kernels'
# CUDA sources are compiled by nvcc (PTX and its static kernel library) and cudarc's bindings
# are chosen for the toolkit, and it type-checks our crates, tests and examples with the
# feature on; it does not link, which would need the CUDA driver and libraries (cuBLAS,
# cuRAND, NVRTC) we do not install here. scripts/gpu-check.sh builds and runs on a GPU.
#
# nvcc: the one on PATH if any, else NVIDIA's CUDA 13.4 wheels from PyPI
# (scripts/cuda-toolkit-requirements.txt) in target/cuda-check/toolkit (about 350 MB; kept
# for reruns, rebuilt when the requirements change). The check's own target dir is
# target/cuda-check/cargo, apart from the main build's artifacts. Timing and sizes are printed.
set -euo pipefail
cd "$(dirname "$0")/.."

root=target/cuda-check
toolkit="$root/toolkit"
requirements=scripts/cuda-toolkit-requirements.txt
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle-kernels' build script compiles its .cu files on a share of the cores by default; on CI
# nothing else runs meanwhile, so it may use them all.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
started=$SECONDS
log() { echo "cuda-check: $*" >&2; }

if command -v nvcc >/dev/null 2>&1; then
    log "using $(command -v nvcc)"
else
    stamp="$toolkit/.installed-$(sha256sum "$requirements" | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        log "installing nvcc from PyPI ($(grep -v '^#' "$requirements" | tr '\n' ' ')) into $toolkit"
        if ! python3 -m pip --version >/dev/null 2>&1; then
            log "python3 -m pip missing, installing Debian's python3-pip"
            if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
        fi
        rm -rf "$toolkit"
        # --target installs plain files (no venv, no system site-packages touched).
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir --target "$toolkit" -r "$requirements"
        touch "$stamp"
        log "toolkit installed in $((SECONDS - started)) s ($(du -sh "$toolkit" | cut -f1))"
    fi
    cuda_home="$(pwd)/$toolkit/nvidia/cu13"
    # nvcc finds its headers and libraries beside itself (nvcc.profile); cudarc asks it its version.
    export PATH="$cuda_home/bin:$PATH"
fi
nvcc_version=$(nvcc --version | tail -2 | head -1)
log "$nvcc_version; compute capability $CUDA_COMPUTE_CAP"

check_start=$SECONDS
log "cargo check --workspace --all-targets --features cuda (target dir $root/cargo)"
CARGO_TARGET_DIR="$root/cargo" cargo check --locked --workspace --all-targets --features cuda
log "cargo check with CUDA ok in $((SECONDS - check_start)) s (total $((SECONDS - started)) s; $(du -sh "$root/cargo" | cut -f1) of check artifacts)"
ptx=$(find "$root/cargo" -path '*candle-kernels-*/out/*.ptx' | wc -l)
[ "$ptx" -gt 0 ] || { log "no PTX from candle-kernels under $root/cargo: nvcc did not run"; exit 1; }
log "nvcc compiled $ptx PTX files for sm_$CUDA_COMPUTE_CAP"
