"""Reading weight files: a state dict, possibly under ``state_dict``, keys without ``module.``.

Shared by every backbone (``backbones``, ``efficientnet``) and the OpenIBL import.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections import OrderedDict
from typing import Callable, Dict, Optional

import numpy as np
import torch


def _numpy_scalar_constructor() -> Optional[Callable]:
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "scalar"):
            return module.scalar
    return None


def read_state_file(path: str, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` weight file: a state dict, possibly under ``state_dict``.

    Loads with ``weights_only=True``; numpy scalars (as stored in OpenIBL checkpoints next
    to the state dict) are allowed. A leading ``module.`` is stripped from every key.
    ``mmap``: map the tensors instead of reading them (cheap when only the keys are
    needed; files of the legacy, non-zip format are read in full).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    safe: list = [np.dtype, (np.dtype, "numpy.dtype")]
    for kind in (np.float64, np.float32, np.int64, np.int32):
        dtype_cls = type(np.dtype(kind))
        safe += [dtype_cls, (dtype_cls, f"numpy.dtypes.{dtype_cls.__name__}")]
    scalar = _numpy_scalar_constructor()
    if scalar is not None:
        # numpy 1.x pickles name it numpy.core..., numpy 2.x numpy._core...
        safe += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    try:
        with torch.serialization.safe_globals(safe):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"could not read weight file {path}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items())
