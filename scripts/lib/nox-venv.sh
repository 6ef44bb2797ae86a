# Sourced by scripts/test and scripts/demo: puts nox in the project's own virtual environment (.venv),
# created with the first python3 on PATH, and never installs anything into that Python itself (on a
# stock Debian 12 the system python3 is externally managed, PEP 668). Debian's python3 needs the
# python3-venv package for `python3 -m venv`: installed here, as root, when missing. Idempotent: a
# second run only checks that nox answers.
# After sourcing, run nox as: "$FORGEQMP_NOX_PYTHON" -m nox ...

forgeqmp_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv"

_nox_log() { printf 'nox-venv: %s\n' "$*" >&2; }

_ensure_venv_module() {
    python3 -c 'import ensurepip, venv' 2>/dev/null && return 0
    if [ "$(id -u)" != 0 ]; then
        _nox_log "python3 cannot create virtual environments; install python3-venv (as root) and retry"
        return 1
    fi
    _nox_log "installing python3-venv (Debian's python3 needs it for 'python3 -m venv')"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -c 'import ensurepip, venv' || { _nox_log "python3 -m venv still unavailable"; return 1; }
}

if ! command -v python3 >/dev/null; then
    _nox_log "no python3 on PATH (Debian 12: apt-get install python3)"
    exit 1
fi
# A venv whose interpreter no longer runs (its base Python was removed or changed) is made anew.
if [ -e "$forgeqmp_venv" ] && ! "$forgeqmp_venv/bin/python" -c 'import sys' 2>/dev/null; then
    _nox_log "recreating $forgeqmp_venv (its Python no longer runs)"
    rm -rf "$forgeqmp_venv"
fi
if [ ! -x "$forgeqmp_venv/bin/python" ]; then
    _ensure_venv_module
    _nox_log "creating $forgeqmp_venv with $(command -v python3) ($(python3 --version 2>&1))"
    python3 -m venv "$forgeqmp_venv"
fi
if ! "$forgeqmp_venv/bin/python" -m nox --version >/dev/null 2>&1; then
    "$forgeqmp_venv/bin/python" -m pip install --quiet --disable-pip-version-check 'nox>=2024.4.15'
fi
FORGEQMP_NOX_PYTHON="$forgeqmp_venv/bin/python"
export FORGEQMP_NOX_PYTHON
