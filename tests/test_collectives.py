"""Collectives take tensors on the backend's device (NCCL: CUDA only), checked on CPU with gloo."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from sfrs_dist import distributed as du

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port=port):
        try:
            lines = [f"device {du.collective_device()}"]
            lines.append(f"sum {int(du.all_reduce_sum(du.collective_tensor([rank + 1], torch.int64))[0])}")
            lines.append(f"int {du.all_reduce_int_sum(10 * (rank + 1))}")
            du.declare_collective_device("cuda")  # what NCCL would take
            try:
                du.all_reduce_sum(torch.tensor([1.0]))
                lines.append("cpu tensor accepted")
            except ValueError as exc:
                lines.append(f"refused: {exc}")
            du.declare_collective_device(None)
            Path(out_dir, f"rank{rank}.txt").write_text("\n".join(lines))
        finally:
            du.declare_collective_device(None)


def test_gloo_helpers_sum_and_refuse_a_cpu_tensor_when_cuda_is_declared(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert lines[0] == "device cpu"
        assert lines[1] == "sum 3" and lines[2] == "int 30"
        assert lines[3].startswith("refused: all_reduce_sum: tensor on cpu, but the collectives of this job "
                                   "take cuda tensors (backend gloo)")


def test_declared_device_is_checked_without_a_process_group():
    du.declare_collective_device("cuda")
    try:
        with pytest.raises(ValueError, match="take cuda tensors"):
            du.all_reduce_sum(torch.zeros(1))
    finally:
        du.declare_collective_device(None)
    assert du.all_reduce_int_sum(7) == 7  # identity in one process, on the CPU


def test_backend_device():
    assert du.backend_device("gloo", 3) == torch.device("cpu")
    assert du.backend_device(None) == torch.device("cpu")
    assert du.backend_device("nccl", 1).type == "cuda"


_TENSOR_COLLECTIVE = re.compile(r"\bdist\.(all_reduce|broadcast|all_gather|all_gather_into_tensor|reduce|"
                                r"reduce_scatter|reduce_scatter_tensor|all_to_all|all_to_all_single|gather|"
                                r"scatter|send|recv|isend|irecv)\(")


def test_tensor_collectives_go_through_the_distributed_module():
    """In the job's code, only sfrs_dist/distributed.py calls torch.distributed tensor collectives;
    the tensors other modules hand to its helpers are made on the collective device.
    (bench/gpu_check.py calls the raw collectives on purpose, to check NCCL itself.)"""
    offenders = []
    for folder in ("sfrs_dist", "launch"):
        for f in sorted((REPO / folder).rglob("*.py")):
            if f == REPO / "sfrs_dist" / "distributed.py":
                continue
            text = f.read_text()
            for m in _TENSOR_COLLECTIVE.finditer(text):
                offenders.append(f"{f.relative_to(REPO)}: {m.group(0)}")
            for m in re.finditer(r"all_reduce_sum\(([^\n]*)", text):
                if "collective_tensor" not in m.group(1) and "collective_device" not in m.group(1):
                    offenders.append(f"{f.relative_to(REPO)}: all_reduce_sum({m.group(1)}")
    assert not offenders, offenders
