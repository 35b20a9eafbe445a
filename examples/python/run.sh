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
# shellcheck source=../../scripts/lib/venv.sh
. "$root/scripts/lib/venv.sh"
ensure_venv "python client" "$venv" "$requirements"
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
exec "$venv/bin/python" "$here/fmboost_client.py" --proto-dir "$root/proto/proto" "$@"
