#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests (docs/deploy.md, "What is validated").
#
#   scripts/validate-k8s.sh [--out DIR]
#
# 1. renders every overlay under k8s/overlays with `kubectl kustomize`;
# 2. lints docker/Dockerfile.cpu and docker/Dockerfile.cuda with hadolint (they are not
#    built here: no Docker engine);
# 3. runs the validators' own tests (scripts/test_k8s_validate.py);
# 4. validates each render (scripts/k8s_validate.py): Kubernetes schemas (strict, for
#    each version in FMBOOST_K8S_VERSIONS), KEDA ScaledObjects against
#    k8s/schemas/keda-scaledobject-v1alpha1.schema.json, and consistency checks;
# 5. writes DIR/container-args.json (scripts/k8s_container_args.py): each container's
#    binary, expanded args, ports and probe ports, for the test that checks them against
#    the binaries' --help.
# DIR (default target/k8s-validate) also keeps the renders, DIR/<overlay>.yaml.
#
# Python packages (pinned in scripts/k8s-validate-requirements.txt) go into .venv-k8s/
# (git-ignored), created on first use; needs python3 and, the first time, PyPI.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/k8s-validate
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        *) echo "validate-k8s.sh: unknown argument $1 (usage: $0 [--out DIR])" >&2; exit 2 ;;
    esac
done
# Oldest Kubernetes we support (native gRPC probes are GA since 1.27) and the newest
# that kubernetes-validate knows.
read -r -a versions <<<"${FMBOOST_K8S_VERSIONS:-1.29 1.37}"

if ! command -v kubectl >/dev/null 2>&1; then
    echo "validate-k8s.sh: kubectl not found; it renders the overlays (kubectl kustomize)" >&2
    exit 1
fi

venv=.venv-k8s
requirements=scripts/k8s-validate-requirements.txt
# shellcheck source=lib/venv.sh
. scripts/lib/venv.sh
ensure_venv validate-k8s.sh "$venv" "$requirements"
py="$venv/bin/python"

mkdir -p "$out"
renders=()
for dir in k8s/overlays/*/; do
    overlay=$(basename "$dir")
    kubectl kustomize "$dir" >"$out/$overlay.yaml"
    renders+=("$overlay=$out/$overlay.yaml")
done
if [ ${#renders[@]} -eq 0 ]; then
    echo "validate-k8s.sh: no overlays under k8s/overlays" >&2
    exit 1
fi

# The images: no Docker engine here, so the Dockerfiles are linted, not built.
"$venv/bin/hadolint" docker/Dockerfile.cpu docker/Dockerfile.cuda
echo "validate-k8s.sh: hadolint passes docker/Dockerfile.cpu and docker/Dockerfile.cuda"

"$py" -m unittest discover --start-directory scripts --pattern 'test_k8s_*.py'

version_args=()
for v in "${versions[@]}"; do version_args+=(--k8s-version "$v"); done
"$py" scripts/k8s_validate.py \
    --keda-schema k8s/schemas/keda-scaledobject-v1alpha1.schema.json \
    "${version_args[@]}" "${renders[@]}"

"$py" scripts/k8s_container_args.py "${renders[@]}" >"$out/container-args.json"
echo "validate-k8s.sh: all overlays valid; container args in $out/container-args.json"
