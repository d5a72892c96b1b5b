"""Training state and atomic checkpoints.

A checkpoint holds the model, optimiser and scheduler state, the ``TrainState`` position
(generation, epoch, cache subset, optimiser steps), the mining state of the generation and
the tracker's run ids. Randomness is derived from (seed, generation, epoch, subset, rank),
so resuming at a subset boundary replays exactly the same batches.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import distributed as du
from ..checkpoint_io import atomic_torch_save, file_hash, load_checkpoint  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt_g(\d+)_e(\d+)_s(\d+)(?:_k(\d+))?\.pt$")


class NoLoadableCheckpoint(RuntimeError):
    """Every checkpoint a resume could use is unreadable."""


@dataclass
class TrainState:
    """Where training stands: the next unit of work to do."""

    generation: int = 0
    """Current generation."""
    epoch: int = 0
    """Epoch within the generation."""
    subset: int = 0
    """Next cache subset to train within the epoch."""
    step: int = 0
    """Optimiser steps taken in this generation."""
    epoch_step: int = 0
    """Optimiser steps taken in this epoch."""
    total_steps: int = 0
    """Optimiser steps taken in the whole job."""

    def state_dict(self) -> Dict[str, int]:
        return asdict(self)

    def load_state_dict(self, d: Dict[str, int]) -> None:
        for k, v in d.items():
            setattr(self, k, int(v))


def checkpoint_name(generation: int, epoch: int, subset: int, subset_step: int = 0) -> str:
    """``ckpt_g<gen>_e<epoch>_s<subset>.pt``; with ``subset_step`` > 0 (a stop inside the subset)
    ``..._s<subset>_k<step>.pt``."""
    step = f"_k{subset_step:05d}" if subset_step else ""
    return f"ckpt_g{generation:02d}_e{epoch:03d}_s{subset:04d}{step}.pt"


def _position(name: str) -> Optional[Tuple[int, int, int, int]]:
    m = _NAME.match(name)
    return tuple(int(g or 0) for g in m.groups()) if m else None  # type: ignore[return-value]


def checkpoints_newest_first(ckpt_dir: Path) -> List[Path]:
    """The ``ckpt_*.pt`` files of ``ckpt_dir``, newest position (generation, epoch, subset, step) first."""
    ckpt_dir = Path(ckpt_dir)
    found = [(_position(p.name), p) for p in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
    return [p for pos, p in sorted((f for f in found if f[0] is not None), reverse=True)]


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest ``ckpt_g*_e*_s*[_k*].pt`` by (generation, epoch, subset, step), or None."""
    found = checkpoints_newest_first(ckpt_dir)
    return found[0] if found else None


def optimizer_shard_path(checkpoint: Path, rank: int) -> Path:
    """Side file holding one rank's optimiser partition (checkpoints of earlier versions)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.optim_rank{rank:03d}.pt")


def deepspeed_dir(ckpt_dir: Path) -> Path:
    """Folder of the DeepSpeed engine checkpoints: one tag folder ``<checkpoint stem>.<nonce>`` each.

    The main checkpoint file names its tag (``deepspeed_tag``); a tag no main file names is
    an interrupted save and is never resumed.
    """
    return Path(ckpt_dir) / "deepspeed"


def remove_deepspeed_tags(ckpt_dir: Path, stem: str, keep: Optional[str] = None) -> None:
    """Delete the DeepSpeed tag folders saved for checkpoint ``stem``, except ``keep``."""
    root = deepspeed_dir(ckpt_dir)
    if not root.is_dir():
        return
    for d in root.glob(f"{stem}.*"):
        if d.name != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def prune_subset_checkpoints(ckpt_dir: Path, newest: Path, keep_tag: Optional[str] = None) -> None:
    """Delete the mid-epoch checkpoints that ``newest`` supersedes, keeping of each epoch the
    newest one older than ``newest``: in ``newest``'s own epoch the one just before it, the
    fall-back should ``newest`` turn out unreadable.

    Epoch-boundary checkpoints (subset 0, step 0) are kept: they are the per-epoch checkpoints
    users evaluate. DeepSpeed tags go with their checkpoint; of ``newest``'s own tags only
    ``keep_tag`` (the one it names) stays.
    """
    pos = _position(Path(newest).name)
    if pos is None:
        return
    remove_deepspeed_tags(ckpt_dir, Path(newest).stem, keep=keep_tag)
    groups: Dict[Tuple[int, int], List[Tuple[Tuple[int, ...], Path]]] = {}
    for p in Path(ckpt_dir).iterdir():
        o = _position(p.name)
        if o is not None and o[2:] != (0, 0) and o < pos:
            groups.setdefault(o[:2], []).append((o, p))
    for older in groups.values():  # of each epoch the newest older one stays
        for _, p in sorted(older)[:-1]:
            for side in p.parent.glob(f"{p.stem}.optim_rank*.pt"):
                side.unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            remove_deepspeed_tags(ckpt_dir, p.stem)


def resolve_resume(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """Decide on rank 0 which checkpoint to resume from and broadcast it to every rank."""
    path: Optional[str] = None
    if du.is_main_process():
        if resume == "auto":
            found = latest_checkpoint(ckpt_dir)
            path = str(found) if found else None
        elif resume not in ("none", ""):
            if not Path(resume).is_file():
                raise FileNotFoundError(f"run.resume: checkpoint not found: {resume}")
            path = resume
    path = du.broadcast_object(path)
    return Path(path) if path else None


def load_resume(resume: str, ckpt_dir: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint to resume from and its contents, on every rank; ``(None, None)`` for none.

    With ``resume: auto`` every rank reads the newest checkpoint; if any rank cannot (a file
    truncated by a node lost mid-write, where rename is not atomic), a warning names it and
    the previous one is tried. ``NoLoadableCheckpoint`` (one line) when none can be read.
    An explicit path is read as it is (``RuntimeError`` naming it if unreadable).
    """
    if resume != "auto":
        path = resolve_resume(resume, ckpt_dir)
        return (path, load_checkpoint(path)) if path else (None, None)
    names = du.broadcast_object([str(p) for p in checkpoints_newest_first(ckpt_dir)] if du.is_main_process()
                                else None)
    for name in names:
        try:
            ckpt, error = load_checkpoint(Path(name)), ""
        except RuntimeError as exc:
            ckpt, error = None, str(exc)
        errors = [e for e in du.all_gather_object(error) if e]
        if not errors:
            return Path(name), ckpt
        log.warning("checkpoint %s cannot be read (%s); trying the previous one", name, errors[0])
    if names:
        raise NoLoadableCheckpoint(f"run.resume=auto: none of the {len(names)} checkpoints in {ckpt_dir} can be read "
                                   f"(newest: {Path(names[0]).name}); move them away to start over")
    return None, None


