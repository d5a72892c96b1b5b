"""No silent fall-back to the CPU: a stand-in ``nvidia-smi`` on PATH lists GPUs torch cannot use.

The stand-in reports a driver of the given version; this machine's torch (no CUDA device)
then stands for a CUDA 13 wheel on a node whose driver is too old for it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfrs_dist.cuda_builds import DriverTooOld, build_for_driver, min_driver_for_cuda
from sfrs_dist.device_check import DeviceUnusable, resolve_device

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="torch uses the GPUs here")


def fake_smi(folder: Path, driver: str, gpus: int = 2) -> dict:
    """An environment whose PATH starts with an ``nvidia-smi`` listing ``gpus`` GPUs on ``driver``."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "\\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})" for i in range(gpus))
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      f'case "$1" in\n  -L) printf "{listing}\\n" ;;\n'
                      f'  --query-gpu=driver_version) for i in $(seq {gpus}); do echo {driver}; done ;;\n'
                      '  *) exit 1 ;;\nesac\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("driver, build", [("535.183.01", "cu126"), ("550.54.15", "cu126"),
                                           ("570.86.10", "cu128"), ("580.65.06", "cu130"), ("590.1", "cu130")])
def test_driver_to_build_table(driver, build):
    assert build_for_driver(driver) == build
    assert min_driver_for_cuda("13.0") == 580 and min_driver_for_cuda("12.6") == 525


def test_too_old_or_unreadable_driver_is_named():
    with pytest.raises(DriverTooOld, match="470.256.02 is older than R525"):
        build_for_driver("470.256.02")
    with pytest.raises(ValueError, match="unrecognised NVIDIA driver version 'N/A'"):
        build_for_driver("N/A")


def test_resolve_device():
    smi = (["GPU 0: NVIDIA H100"], "550.54.15")
    assert resolve_device("auto", smi=None, faiss_gpus=0) == torch.device("cpu")  # a node without GPUs
    assert resolve_device("cpu", smi=smi, faiss_gpus=1) == torch.device("cpu")  # on purpose
    for mode in ("auto", "cuda"):
        with pytest.raises(DeviceUnusable) as exc:
            resolve_device(mode, smi=smi, faiss_gpus=0)
        msg = str(exc.value)
        assert "driver 550.54.15" in msg and f"CUDA {torch.version.cuda}" in msg and "run.device=cpu" in msg
        if torch.version.cuda and torch.version.cuda.startswith("13"):
            assert "needs driver R580" in msg and "whl/cu126" in msg
    with pytest.raises(DeviceUnusable, match="faiss sees 2 GPU"):  # faiss-gpu sees them, nvidia-smi lists none
        resolve_device("auto", smi=None, faiss_gpus=2)
    with pytest.raises(DeviceUnusable, match="run.device=cuda but this node has no GPU"):
        resolve_device("cuda", smi=None, faiss_gpus=0)
    with pytest.raises(ValueError, match="run.device must be one of"):
        resolve_device("gpu")


def test_train_and_evaluate_stop_before_any_work(tmp_path):
    env = fake_smi(tmp_path / "bin", "550.54.15")
    cfg = str(REPO / "configs" / "tiny.yaml")
    out = f"run.out_dir={tmp_path / 'run'}"
    for cmd in ([sys.executable, "launch/train.py", "--config", cfg, "--set", out],
                [sys.executable, "launch/evaluate.py", "--config", cfg, "--checkpoint", str(tmp_path / "none.pt"),
                 "--set", out]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("device error:")]
        assert len(lines) == 1, proc.stderr
        assert "nvidia-smi lists 2 GPU(s), driver 550.54.15" in lines[0] and "run.device=cpu" in lines[0]
        assert not (tmp_path / "run").exists()  # nothing written
        # run.device=cpu: past the device check, to the next check (no checkpoint / no shards here)
        proc = subprocess.run(cmd + ["--set", "run.device=cpu", "--set", f"data.shards={tmp_path / 'none'}"],
                              capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert proc.returncode == 2 and "device error" not in proc.stderr, proc.stderr
        assert "error:" in proc.stderr


def test_gpu_check_fails_instead_of_skipping(tmp_path):
    env = fake_smi(tmp_path / "bin", "550.54.15")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("FAIL device: nvidia-smi lists 2 GPU(s), driver 550.54.15"), proc.stdout
    assert "SKIP" not in proc.stdout


@pytest.mark.parametrize("driver, build, index", [
    ("535.183.01", "cu126", "https://download.pytorch.org/whl/cu126"),
    ("550.54.15", "cu126", "https://download.pytorch.org/whl/cu126"),
    ("570.86.10", "cu128", "https://download.pytorch.org/whl/cu128"),
    ("580.65.06", "cu130", ""),  # the PyPI wheel
])
def test_env_sh_picks_the_build_for_the_driver(tmp_path, driver, build, index):
    """env.sh's choice, with an installed environment stamped for it (nothing is installed)."""
    env = fake_smi(tmp_path / "bin", driver)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    wanted = "gpu" + (f" {build}" if index else "")
    (venv / ".sfrs_installed").write_text(wanted + "\n")
    env.update(SFRS_VENV=str(venv))
    env.pop("TORCH_INDEX_URL", None)
    env.pop("SFRS_GPU", None)
    script = 'source launch/env.sh && echo "$TORCH_BUILD|$TORCH_INDEX_URL|$WANTED"'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{build}|{index}|{wanted}"
    assert "installing" not in proc.stderr  # the stamp matched: no reinstall


def test_env_sh_stops_on_a_driver_too_old(tmp_path):
    env = fake_smi(tmp_path / "bin", "470.256.02")
    env.update(SFRS_VENV=str(tmp_path / "venv"))
    env.pop("TORCH_INDEX_URL", None)
    proc = subprocess.run(["bash", "-c", "source launch/env.sh"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=env)
    assert proc.returncode == 1
    assert "NVIDIA driver 470.256.02 is older than R525" in proc.stderr
    assert not (tmp_path / "venv").exists()
