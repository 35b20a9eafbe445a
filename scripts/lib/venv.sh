# Sourced by scripts that need a Python venv of pinned requirements (not run on its own).
#
#   ensure_venv LABEL VENV REQUIREMENTS
#
# Makes VENV and installs REQUIREMENTS into it, once per content of the requirements file (a
# stamp file named after its hash), so a changed pin reinstalls. Needs python3 and, that time,
# PyPI; Debian's python3 lacks ensurepip until python3-venv is installed, so that is installed
# when `python3 -m venv` fails. LABEL prefixes the messages on stderr.
ensure_venv() {
    local label="$1" venv="$2" requirements="$3"
    local stamp
    stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "$label: installing $(grep -v '^#' "$requirements" | tr '\n' ' ')into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    if ! python3 -m venv --clear "$venv" 2>/dev/null; then
        echo "$label: python3 -m venv failed, installing Debian's python3-venv" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv --clear "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    touch "$stamp"
}
