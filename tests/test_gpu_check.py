"""bench/gpu_check.py on a machine without CUDA: every GPU item SKIPs and the exit status is 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
ITEMS = ["nccl", "faiss_gpu", "bf16_extraction", "train_ddp_fp32", "train_ddp_bf16", "train_ddp_fp16",
         "train_deepspeed_zero1_bf16", "teacher_pass", "loader_vs_step"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")


def test_without_cuda_every_item_skips_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert [line.split()[1].rstrip(":") for line in lines] == ITEMS
    assert all(line.startswith("SKIP ") and "no CUDA device" in line for line in lines)


def test_acceptance_items_skip_too_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--acceptance"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert [line.split()[1].rstrip(":") for line in lines] == ITEMS + [
        "ddp_two_generations", "deepspeed_zero2_bf16", "kill_and_resume", "rank_agreement", "real_size_slice"]
    assert all(line.startswith("SKIP ") for line in lines)


def test_asking_for_cuda_without_it_fails():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL cuda: --device cuda but torch sees no CUDA device")
