"""The device a job runs on (``run.device``), with no silent fall-back to the CPU.

``auto`` takes the GPU of the local rank when torch can use one, and the CPU when the node
has no GPU at all. A node whose GPUs ``nvidia-smi`` lists (or faiss sees) while torch
cannot use them (typically a driver older than the CUDA of the torch wheel) is an error
naming the driver, torch's CUDA version and the fix, not a job that trains on the CPU for
days. ``cpu`` runs on the CPU on purpose; ``cuda`` requires a GPU.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .cuda_builds import INDEX_URL, build_for_driver, driver_major, min_driver_for_cuda, nvidia_smi

DEVICES = ("auto", "cuda", "cpu")


class DeviceUnusable(RuntimeError):
    """GPUs are present or required but torch cannot use them (the message names the fix)."""


def faiss_gpu_count() -> int:
    """GPUs faiss sees (0 with faiss-cpu)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def torch_cuda_count() -> int:
    """GPUs torch can use (0 when CUDA does not initialise)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unusable_message(smi: Optional[Tuple[List[str], str]], faiss_gpus: int) -> str:
    """One line: what sees GPUs, why torch does not, and what to do."""
    cuda = torch.version.cuda
    if smi is not None:
        seen = f"nvidia-smi lists {len(smi[0])} GPU(s), driver {smi[1]}"
    else:
        seen = f"faiss sees {faiss_gpus} GPU(s)"
    head = f"{seen}, but torch {torch.__version__} (CUDA {cuda or 'none: a CPU-only build'}) cannot use them"
    if cuda is None:
        why = "install a CUDA build of torch"
    else:
        why = "check CUDA_VISIBLE_DEVICES and `python -c 'import torch; torch.cuda.init()'`"
        need = min_driver_for_cuda(cuda)
        if smi is not None and need is not None:
            try:
                major = driver_major(smi[1])
            except ValueError:
                major = None
            if major is not None and major < need:
                why = f"CUDA {cuda} needs driver R{need} or newer"
                try:
                    build = build_for_driver(smi[1])
                    why += (f"; install the {build} build of torch for this driver: "
                            f"`TORCH_INDEX_URL={INDEX_URL.format(build=build)} source launch/env.sh` "
                            "(docs/cluster.md)")
                except ValueError as exc:
                    why += f"; {exc}"
    return f"{head}: {why}; or set run.device=cpu to run on the CPU on purpose"


_PROBE: Any = object()


def resolve_device(mode: str = "auto", local_rank: int = 0, smi: Any = _PROBE,
                   faiss_gpus: Optional[int] = None) -> torch.device:
    """The device of ``run.device`` for this process; ``DeviceUnusable`` when GPUs are present but unusable.

    ``smi`` (``(GPU lines, driver version)`` or None for no listing) and ``faiss_gpus``
    default to what ``nvidia-smi`` and faiss report here.
    """
    if mode not in DEVICES:
        raise ValueError(f"run.device must be one of {', '.join(DEVICES)}, got {mode!r}")
    if mode == "cpu":
        return torch.device("cpu")
    count = torch_cuda_count()
    if count:
        return torch.device("cuda", local_rank % count)
    smi = nvidia_smi() if smi is _PROBE else smi
    faiss_gpus = faiss_gpu_count() if faiss_gpus is None else faiss_gpus
    if smi is None and faiss_gpus == 0:
        if mode == "cuda":
            raise DeviceUnusable(f"run.device=cuda but this node has no GPU (no nvidia-smi listing, torch "
                                 f"{torch.__version__} sees none); use run.device=auto or cpu")
        return torch.device("cpu")
    raise DeviceUnusable(unusable_message(smi, faiss_gpus))
