"""Which torch CUDA build an NVIDIA driver runs, and what ``nvidia-smi`` reports.

Standard library only: ``launch/env.sh`` runs this file as a script with the system Python
before any virtual environment exists (``python3 sfrs_dist/cuda_builds.py``), printing
``<build> <index URL>`` for this node's driver (``-`` for the index when PyPI's own wheel is
that build), or ``cpu -`` without a GPU, and stops with a one-line message when the driver
is too old for every build.

PyTorch publishes one wheel index per CUDA version. A wheel built for CUDA 12.x runs on any
driver of the CUDA 12 family (R525 or newer: CUDA minor-version compatibility); CUDA 13
needs R580. The newest build the driver runs is chosen (docs/cluster.md has the table).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

#: (lowest driver major version, build tag), newest build first.
DRIVER_BUILDS: Tuple[Tuple[int, str], ...] = (
    (580, "cu130"),
    (570, "cu128"),
    (525, "cu126"),
)
INDEX_URL = "https://download.pytorch.org/whl/{build}"
#: The build of the torch wheel on PyPI (what ``pip install torch`` gets without an index).
PYPI_BUILD = "cu130"


class DriverTooOld(ValueError):
    """The driver runs none of the published CUDA builds."""


def driver_major(version: str) -> int:
    """``"550.54.15"`` -> 550; ``ValueError`` naming the text otherwise."""
    m = re.match(r"\s*(\d+)(\.\d+)*\s*$", version or "")
    if not m:
        raise ValueError(f"unrecognised NVIDIA driver version {version!r}")
    return int(m.group(1))


def build_for_driver(version: str) -> str:
    """The newest torch CUDA build (``cu130``, ``cu128``, ``cu126``) the driver ``version`` runs."""
    major = driver_major(version)
    for lowest, build in DRIVER_BUILDS:
        if major >= lowest:
            return build
    raise DriverTooOld(f"NVIDIA driver {version} is older than R{DRIVER_BUILDS[-1][0]}, the oldest any published "
                       "torch CUDA build runs: upgrade the driver, or set TORCH_INDEX_URL to a build it runs")


def min_driver_for_cuda(cuda: Optional[str]) -> Optional[int]:
    """Lowest driver major version for torch's CUDA version string (``"13.0"`` -> 580); None if unknown."""
    if not cuda:
        return None
    major = cuda.partition(".")[0]
    if major == "13":
        return 580
    if major == "12":
        return 525
    if major == "11":
        return 450
    return None


def nvidia_smi() -> Optional[Tuple[List[str], str]]:
    """(GPU lines of ``nvidia-smi -L``, driver version), or None when nvidia-smi is absent, fails or lists none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        gpus = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
        drv = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [s.strip() for s in gpus.stdout.splitlines() if s.strip().startswith("GPU ")]
    if gpus.returncode != 0 or not lines:
        return None
    versions = [s.strip() for s in drv.stdout.splitlines() if s.strip()] if drv.returncode == 0 else []
    return lines, (versions[0] if versions else "unknown")


def main() -> int:
    smi = nvidia_smi()
    if smi is None:
        print("cpu -")
        return 0
    try:
        build = build_for_driver(smi[1])
    except ValueError as exc:
        print(f"[sfrs_dist] {exc}", file=sys.stderr)
        return 1
    print(f"{build} {'-' if build == PYPI_BUILD else INDEX_URL.format(build=build)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
