"""Checkpoint files: atomic writes, reads with a clear error, content hashes.

Below every pipeline stage (evaluation, the teacher and training all read checkpoints);
what a checkpoint holds is the training stage's business (``training/checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name in the same folder, then ``os.replace``; on failure
    (a full disk) the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (short hex), used to key caches by the checkpoint they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """The object saved at ``path`` (on CPU); ``RuntimeError`` naming the file if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc})") from exc
