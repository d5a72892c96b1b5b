"""``auto`` precision: reduced precision where the hardware computes it natively, fp32 elsewhere.

Four settings accept ``auto`` (their default): ``train.precision``, ``eval.bf16``,
``mining.bf16_search`` and ``eval.bf16_search``. A job resolves them once at start (``resolve_config``): explicit
values are kept; ``auto`` takes the value a resumed run started with (its saved
``config.yaml``), otherwise what ``choose`` decides from the hardware ``probe``:

- ``train.precision``: ``bf16`` on a CUDA device of compute capability 8.0 or newer
  (Ampere+) or on a CPU whose flags report ``amx_bf16`` or ``avx512_bf16``; ``fp32``
  elsewhere. ``fp16`` is never chosen (it needs loss scaling; ask for it explicitly).
- ``eval.bf16`` (bf16 extraction autocast): on when the extraction device computes bf16
  natively.
- ``eval.bf16_search`` and ``mining.bf16_search`` (the bf16 candidate searches of evaluation
  and of the mining kNN graph, torch matmuls on the rank's device): on when that device
  computes bf16 natively and faiss has no GPU (with GPUs the exact faiss GPU search is kept).

A CUDA device with a faiss that sees no GPU (faiss-cpu installed on a GPU node) is warned
about: exact searches and the mining kNN then run on the CPU.

``choose`` is pure (device type, CPU flags, CUDA capability, faiss GPU count in; the
choice out); ``probe`` reads them from the machine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

Flag = Union[bool, str]


@dataclass(frozen=True)
class Hardware:
    """What ``choose`` decides from."""

    device_type: str
    cpu_flags: Tuple[str, ...] = ()
    cuda_capability: Optional[Tuple[int, int]] = None
    faiss_gpus: int = 0

    def describe(self) -> str:
        cpu = ",".join(f for f in CPU_BF16_FLAGS if f in self.cpu_flags) or "no bf16 flags"
        out = f"{self.device_type}; cpu {cpu}"
        if self.cuda_capability is not None:
            out += f"; cuda capability {self.cuda_capability[0]}.{self.cuda_capability[1]}"
        return out + f"; faiss gpus {self.faiss_gpus}"


@dataclass(frozen=True)
class PrecisionChoice:
    """Resolved settings and where each came from (``explicit``, ``hardware`` or ``resumed run``)."""

    train: str
    eval_bf16: bool
    search_bf16: bool
    sources: Tuple[str, ...]
    hardware: str
    eval_search_bf16: bool = False

    def params(self) -> Dict[str, str]:
        """MLflow params of the choice."""
        return {"precision.train": self.train, "precision.eval_bf16": str(self.eval_bf16),
                "precision.search_bf16": str(self.search_bf16),
                "precision.eval_search_bf16": str(self.eval_search_bf16), "precision.sources": ",".join(self.sources),
                "precision.hardware": self.hardware}

    def describe(self) -> str:
        out = (f"train.precision {self.train} ({self.sources[0]}), eval.bf16 {self.eval_bf16} ({self.sources[1]}), "
               f"mining.bf16_search {self.search_bf16} ({self.sources[2]})")
        if len(self.sources) > 3:
            out += f", eval.bf16_search {self.eval_search_bf16} ({self.sources[3]})"
        return out + f"; hardware: {self.hardware}"


def cpu_native_bf16(cpu_flags: Iterable[str]) -> bool:
    return any(f in set(cpu_flags) for f in CPU_BF16_FLAGS)


def device_native_bf16(hw: Hardware) -> bool:
    if hw.device_type == "cuda":
        return hw.cuda_capability is not None and hw.cuda_capability[0] >= 8
    return cpu_native_bf16(hw.cpu_flags)


def choose(train: str, eval_bf16: Flag, search_bf16: Flag, hw: Hardware,
           eval_search_bf16: Flag = AUTO) -> PrecisionChoice:
    """Resolve the ``auto`` settings among the four for hardware ``hw`` (explicit values win)."""
    device_search = device_native_bf16(hw) and hw.faiss_gpus == 0  # on the rank's device
    auto_train = "bf16" if device_native_bf16(hw) else "fp32"
    values = (auto_train if train == AUTO else train,
              device_native_bf16(hw) if eval_bf16 == AUTO else bool(eval_bf16),
              device_search if search_bf16 == AUTO else bool(search_bf16),
              device_search if eval_search_bf16 == AUTO else bool(eval_search_bf16))
    sources = tuple("hardware" if v == AUTO else "explicit" for v in (train, eval_bf16, search_bf16, eval_search_bf16))
    return PrecisionChoice(values[0], values[1], values[2], sources, hw.describe(), values[3])


def read_cpu_flags(path: str = "/proc/cpuinfo") -> Tuple[str, ...]:
    """The ``flags`` of the first processor in ``path`` (empty where there is no such file)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags") and ":" in line:
                return tuple(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ()


def probe(device: torch.device) -> Hardware:
    """The hardware facts ``choose`` needs, read from this machine."""
    device = torch.device(device)
    cap = None
    if device.type == "cuda" and torch.cuda.is_available():
        cap = tuple(torch.cuda.get_device_capability(device))
    try:
        import faiss

        gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        gpus = 0
    return Hardware(device.type, read_cpu_flags(), cap, gpus)


def _adopt(value, saved_value):
    """An ``auto`` value takes the resumed run's resolved value."""
    if value == AUTO and saved_value is not None and saved_value != AUTO:
        return saved_value, True
    return value, False


def resolve_config(cfg, device: torch.device, saved=None, hardware: Optional[Hardware] = None):
    """``cfg`` with its ``auto`` precision settings resolved, and the ``PrecisionChoice``.

    ``saved``: the config a resumed run started with; its resolved values win over ``auto``
    so a run keeps its precision across restarts. ``hardware`` defaults to ``probe(device)``.
    """
    requested = (cfg.train.precision, cfg.eval.bf16, cfg.mining.bf16_search, cfg.eval.bf16_search)
    old = ((saved.train.precision, saved.eval.bf16, saved.mining.bf16_search, saved.eval.bf16_search)
           if saved is not None else (None,) * 4)
    adopted = [_adopt(v, o) for v, o in zip(requested, old)]
    hw = hardware if hardware is not None else probe(device)
    if hw.device_type == "cuda" and hw.faiss_gpus == 0:
        log.warning("the device is CUDA but faiss sees no GPU (faiss-cpu installed on a GPU node?): exact "
                    "searches and the mining kNN run on the CPU; install faiss-gpu with SFRS_GPU=1 source launch/env.sh")
    v = [a for a, _ in adopted]
    choice = choose(v[0], v[1], v[2], hw, v[3])
    sources = tuple("resumed run" if a else s for (_, a), s in zip(adopted, choice.sources))
    choice = dataclasses.replace(choice, sources=sources)
    return apply_choice(cfg, choice), choice


def apply_choice(cfg, choice: PrecisionChoice):
    """``cfg`` with the three settings of ``choice``."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=choice.train),
                               eval=dataclasses.replace(cfg.eval, bf16=choice.eval_bf16,
                                                        bf16_search=choice.eval_search_bf16),
                               mining=dataclasses.replace(cfg.mining, bf16_search=choice.search_bf16))


def saved_run_config(cfg, run_dir, has_checkpoints: bool):
    """The config a run resumed by ``run.resume: auto`` started with (as ``check_resume`` reads it), or None."""
    from .config import load_config

    path = Path(run_dir) / "config.yaml"
    if cfg.run.resume != "auto" or not has_checkpoints or not path.is_file():
        return None
    return load_config(path)


@functools.lru_cache(maxsize=None)
def _cpu_hardware() -> Hardware:
    return probe(torch.device("cpu"))


def search_bf16(value: Flag) -> bool:
    """``mining.bf16_search`` as a bool, ``auto`` decided for this machine (for callers given an unresolved config)."""
    return choose("fp32", False, value, _cpu_hardware()).search_bf16 if value == AUTO else bool(value)


def is_resolved(cfg) -> bool:
    return AUTO not in (cfg.train.precision, cfg.eval.bf16, cfg.mining.bf16_search, cfg.eval.bf16_search)


def log_choice(choice: PrecisionChoice) -> None:
    log.info("precision: %s", choice.describe())
