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
from typing import Dict, Optional

from .. import distributed as du
from ..checkpoint_io import atomic_torch_save, file_hash, load_checkpoint  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt_g(\d+)_e(\d+)_s(\d+)\.pt$")


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


def checkpoint_name(generation: int, epoch: int, subset: int) -> str:
    return f"ckpt_g{generation:02d}_e{epoch:03d}_s{subset:04d}.pt"


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest ``ckpt_g*_e*_s*.pt`` by (generation, epoch, subset), or None."""
    ckpt_dir = Path(ckpt_dir)
    best = None
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                pos = tuple(int(g) for g in m.groups())
                if best is None or pos > best[0]:
                    best = (pos, p)
    return best[1] if best else None


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
    """Delete the mid-epoch checkpoints that ``newest`` supersedes (same generation and epoch).

    Epoch-boundary checkpoints (subset 0) are kept: they are the per-epoch checkpoints users
    evaluate. DeepSpeed tags go with their checkpoint; of ``newest``'s own tags only
    ``keep_tag`` (the one it names) stays.
    """
    m = _NAME.match(Path(newest).name)
    if not m:
        return
    remove_deepspeed_tags(ckpt_dir, Path(newest).stem, keep=keep_tag)
    g, e, s = (int(x) for x in m.groups())
    for p in Path(ckpt_dir).iterdir():
        o = _NAME.match(p.name)
        if o:
            og, oe, os_ = (int(x) for x in o.groups())
            if (og, oe) == (g, e) and 0 < os_ < s:
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


