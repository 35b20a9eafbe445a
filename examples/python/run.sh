#!/usr/bin/env bash
# Runs the Python example client (fmboost_client.py) from a venv of its own.
#
#   examples/python/run.sh --install-only           create the venv (pinned requirements.txt)
#   examples/python/run.sh --addr HOST:PORT --out OUT.png [--token-file F] [--profile NAME]
#
# The venv is target/venv-python-client (or $FMBOOST_PYTHON_VENV), made on first use and
# again when requirements.txt changes; it needs python3 and, that time, PyPI. Exits non-zero
# on any failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${FMBOOST_PYTHON_VENV:-$root/target/venv-python-client}"
requirements="$here/requirements.txt"
stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"

if [ ! -f "$stamp" ]; then
    echo "python client: installing $(grep -v '^#' "$requirements" | tr '\n' ' ')into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    if ! python3 -m venv --clear "$venv" 2>/dev/null; then
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        echo "python client: python3 -m venv failed, installing Debian's python3-venv" >&2
        if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv --clear "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    touch "$stamp"
fi
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
exec "$venv/bin/python" "$here/fmboost_client.py" --proto-dir "$root/proto/proto" "$@"
