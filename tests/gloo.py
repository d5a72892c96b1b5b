"""A gloo process group on CPU for the worker processes of the multi-process tests."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@contextmanager
def gloo_group(rank: int, world: int, *, port: Optional[int] = None, init_file: Optional[str] = None,
               faiss_threads: bool = False) -> Iterator[None]:
    """This process as ``rank`` of a gloo group of ``world`` processes, one thread each (torch, OpenMP,
    and faiss where ``faiss_threads``); the group is destroyed on exit.

    ``port``: torchrun's environment (MASTER_ADDR 127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE) and the ``env://`` init. ``init_file``: the ``file://`` init, no rank variables.
    """
    if (port is None) == (init_file is None):
        raise ValueError("gloo_group: give one of port and init_file")
    os.environ.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if faiss_threads:
        import faiss

        faiss.omp_set_num_threads(1)
    if port is not None:
        os.environ.update(MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
