#!/usr/bin/env bash
# The project's test command (README "Tests"): installs what the tests need, then runs them.
# Works on a fresh Debian machine; CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests that need Redis start their own redis-server on a free loopback port; the Redis
# Cluster test (coordinator/src/cluster_tests.rs) also runs redis-cli, which Debian's
# redis-server package brings (redis-tools).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "test.sh: redis-server or redis-cli missing, installing Debian's package" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# The golden vectors live beside the checkout (shared/golden); tests read FMBOOST_GOLDEN_DIR.
export FMBOOST_GOLDEN_DIR="${FMBOOST_GOLDEN_DIR:-$(cd .. && pwd)/shared/golden}"
if [ ! -d "$FMBOOST_GOLDEN_DIR" ]; then
    echo "test.sh: golden vectors not found at $FMBOOST_GOLDEN_DIR (set FMBOOST_GOLDEN_DIR)" >&2
    exit 1
fi

# Kubernetes manifests: render every overlay, validate against Kubernetes and KEDA schemas,
# check container args against the binaries' flags (writes target/k8s-validate/).
./scripts/validate-k8s.sh

# The Python example client's venv (pinned grpcio, grpcio-tools, grpcio-reflection; no
# torch): coordinator/tests/python_client.rs runs the client against a local cluster.
./examples/python/run.sh --install-only

cargo build --workspace --bins
# The GPU check's CPU-only parts: every command it will run, validated here (docs/benchmarks.md).
./scripts/gpu-check.sh --dry-run
cargo test --workspace "$@"
