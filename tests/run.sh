#!/usr/bin/env bash
# The test command of the README (and of CI): installs into .venv if needed, lints, runs pytest.
source "$(dirname "${BASH_SOURCE[0]}")/../launch/env.sh"
ruff check sfrs_dist launch bench tests
exec python -m pytest -q "$@"
