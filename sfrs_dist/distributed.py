"""The one distributed module: process-group set-up, rank helpers and small collectives.

Every helper works before ``init_distributed`` (or without torchrun at all): a single
process behaves as rank 0 of a world of size 1, and collectives become identities.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """What ``init_distributed`` set up."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    backend: Optional[str]
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's global rank from torchrun's environment; usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


def default_backend() -> str:
    """NCCL where CUDA is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0,
                     device: Optional[torch.device] = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Without ``WORLD_SIZE`` in the environment (plain ``python``), nothing is initialised and
    a single-process ``DistInfo`` is returned. ``timeout_s`` bounds every collective so a
    failed rank makes the job fail instead of hanging. ``device`` (default
    ``default_device()``) decides the backend: NCCL for CUDA, gloo for the CPU.
    """
    device = default_device() if device is None else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not is_distributed():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        rank = int(os.environ["RANK"])
        dist.init_process_group(backend=backend, store=_job_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout)
        log.info("process group up: rank %d/%d backend %s", get_rank(), get_world_size(), backend)
    local_ws = get_local_world_size()
    return DistInfo(
        rank=get_rank(),
        world_size=get_world_size(),
        local_rank=get_local_rank(),
        local_world_size=local_ws,
        node_rank=int(os.environ.get("GROUP_RANK", get_rank() // max(local_ws, 1))),
        backend=dist.get_backend() if is_distributed() else None,
        device=device,
    )


def _job_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys scoped to this restart of the worker group.

    Under ``torchrun --max-restarts`` the restarted workers meet in the same TCP store as
    the failed ones; without a per-attempt prefix they can read the dead workers' addresses
    and hang while connecting. The prefix keeps every attempt's keys apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    global _store
    _store = dist.PrefixStore(f"sfrs/attempt_{attempt}", store)
    return _store


def destroy_distributed() -> None:
    global _control, _store
    if is_distributed():
        dist.destroy_process_group()
    _control = _store = None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Gather one picklable object from every rank (list indexed by rank)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send ``obj`` from ``src`` to every rank and return it everywhere."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


#: Device type declared by ``declare_collective_device`` (None: follow the backend).
_declared_device_type: Optional[str] = None


def backend_device(backend: Optional[str], local_rank: int = 0) -> torch.device:
    """The device whose tensors ``backend``'s collectives take: ``cuda:<local rank>`` for NCCL, CPU otherwise."""
    if backend == "nccl":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device("cuda", local_rank % count if count else local_rank)
    return torch.device("cpu")


def declare_collective_device(device_type: Optional[str]) -> None:
    """Declare the device type the tensor collectives must receive (None: the backend's own).

    With gloo the collectives accept CPU tensors only and NCCL CUDA tensors only; declaring
    ``"cuda"`` under gloo makes the helpers refuse CPU tensors as NCCL would, so code paths
    can be checked for the device of their collective tensors without a GPU.
    """
    global _declared_device_type
    _declared_device_type = None if device_type is None else torch.device(device_type).type


def collective_device() -> torch.device:
    """Where tensors handed to the collectives of this module must live."""
    return backend_device(dist.get_backend() if is_distributed() else None, get_local_rank())


def check_collective_tensor(t: torch.Tensor, what: str = "collective") -> None:
    """Raise ``ValueError`` if ``t`` is not on the device type the backend's collectives take.

    Checked while a process group is up, or always once a device type was declared with
    ``declare_collective_device``.
    """
    expected = _declared_device_type
    if expected is None:
        if not is_distributed():
            return
        expected = collective_device().type
    if t.device.type != expected:
        backend = dist.get_backend() if is_distributed() else "none"
        raise ValueError(f"{what}: tensor on {t.device}, but the collectives of this job take {expected} tensors "
                         f"(backend {backend}); create it with distributed.collective_tensor or move it with "
                         f".to(distributed.collective_device())")


def collective_tensor(values: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A tensor of ``values`` on ``collective_device()``."""
    return torch.as_tensor(values, dtype=dtype, device=collective_device())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity when not distributed).

    ``t`` must live on ``collective_device()`` (see ``check_collective_tensor``).
    """
    check_collective_tensor(t, "all_reduce_sum")
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place copy of rank ``src``'s ``t`` to every rank (identity when not distributed)."""
    check_collective_tensor(t, "broadcast_tensor")
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def gather_tensor(t: torch.Tensor, dst: int = 0) -> Optional[List[torch.Tensor]]:
    """Every rank's ``t`` (same shape and dtype everywhere), indexed by rank, on rank ``dst``; None elsewhere.

    Only ``dst`` receives. ``t`` must live on ``collective_device()``. ``[t]`` when not distributed.
    """
    check_collective_tensor(t, "gather_tensor")
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(get_world_size())] if get_rank() == dst else None
    dist.gather(t, out, dst=dst)
    return out


def all_reduce_int_sum(value: int) -> int:
    """Sum of an integer over all ranks, through a tensor on the collective device."""
    return int(all_reduce_sum(collective_tensor([int(value)], torch.int64)).cpu()[0])


def broadcast_array(arr: Optional[np.ndarray], src: int, dtype: Any = np.float32) -> np.ndarray:
    """Rank ``src``'s 2-d ``arr`` on every rank (other ranks pass ``None``): its shape first, then its rows.

    Both travel as tensors on ``collective_device()``: under NCCL the sender copies its rows to
    its GPU and the receivers receive straight into a buffer allocated on theirs. ``src`` gets
    its own array back, the others a new CPU array of ``dtype``. Identity when not distributed.
    A collective: every rank calls it with the same ``src``.
    """
    mine = get_rank() == src
    if mine:
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if arr.ndim != 2:
            raise ValueError(f"broadcast_array: expected a 2-d array, got shape {arr.shape}")
    if not is_distributed():
        return arr
    shape = collective_tensor(list(arr.shape) if mine else [0, 0], torch.int64)
    broadcast_tensor(shape, src)
    rows, cols = (int(v) for v in shape.cpu().tolist())
    if rows * cols == 0:
        return arr if mine else np.empty((rows, cols), dtype=dtype)
    device = collective_device()
    if mine:
        t = torch.from_numpy(arr).to(device)  # the same memory on CPU
    else:
        t = torch.empty((rows, cols), dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, device=device)
    broadcast_tensor(t, src)
    return arr if mine else t.cpu().numpy()


# ------------------------------------------------------------------ control plane
#: The job's rendezvous store (``init_distributed``), None without one.
_store: Optional[dist.Store] = None
#: A gloo group over every rank for host-side flags (created by ``control_group``).
_control: Any = None


def job_store() -> Optional[dist.Store]:
    """The key-value store every rank of this attempt shares (None when not distributed).

    Under torchrun it lives in the agent process, so it still answers when a rank hangs.
    """
    return _store if is_distributed() else None


def control_group() -> Any:
    """A process group over all ranks whose collectives take CPU tensors (gloo).

    The default group under gloo; under NCCL a gloo group of its own, so host-side flags
    (the stop request, monitored barriers) never wait on the device. Created on first call:
    a collective, so every rank makes that first call at the same point. None when not
    distributed.
    """
    global _control
    if not is_distributed():
        return None
    if _control is None:
        _control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank: one CPU all-reduce on ``control_group()``."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t[0])
