# Sourced by the README commands: creates .venv under the repo on first use and activates it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SFRS_VENV:-$REPO_ROOT/.venv}"
STAMP="$VENV/.sfrs_installed"
if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/setup.cfg" -nt "$STAMP" ]; then
    echo "[sfrs_dist] installing into $VENV (first run: a few minutes; log in $VENV/install.log)" >&2
    python3 -m venv "$VENV"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel \
           && "$VENV/bin/python" -m pip install -e "$REPO_ROOT[dev]"; } >"$VENV/install.log" 2>&1; then
        tail -n 40 "$VENV/install.log" >&2
        echo "[sfrs_dist] installation failed; full log: $VENV/install.log" >&2
        exit 1
    fi
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO_ROOT"
export PYTHONUNBUFFERED=1
