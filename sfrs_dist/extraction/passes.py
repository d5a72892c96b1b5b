"""Distributed passes over a shard group: every rank extracts its part, all ranks get all
(``extract_group``), or each rank keeps its own part (``extract_group_local``, the mining).

Used by mining refreshes, the teacher pass and evaluation.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from .. import distributed as du
from ..config import DataConfig
from ..data.manifest import Manifest
from ..data.streaming import expected_count, make_pass_loader
from ..data.transforms import make_transform
from .descriptors import extract_descriptors, gather_descriptors

log = logging.getLogger(__name__)


def transform_kind(dataset_name: str, aspect_preserving: list, role: str) -> str:
    """Test transform, or the aspect-preserving one for queries of the listed datasets."""
    return "tokyo" if role == "q" and dataset_name in aspect_preserving else "test"


def pass_loader(manifest: Manifest, sid: str, role: str, data: DataConfig, kind: str = "test",
                num_workers: Optional[int] = None):
    """Streaming loader over one role of one split, split across ranks/workers.

    Image size, batch size and workers come from ``data`` (``num_workers`` overrides the
    latter); aspect-preserving (``tokyo``) batches hold one image, their sizes differ.
    """
    h, w = (int(v) for v in data.image_size)
    bs = 1 if kind == "tokyo" else data.extract_batch_size
    workers = data.num_workers if num_workers is None else num_workers
    return make_pass_loader(manifest, f"{sid}_{role}", make_transform(kind, h, w, data.aspect_resize), batch_size=bs,
                            num_workers=workers)


def extract_group(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    manifest: Manifest,
    sid: str,
    role: str,
    data: DataConfig,
    device: torch.device,
    kind: str = "test",
    bf16: bool = False,
) -> np.ndarray:
    """Descriptors of every sample of ``<sid>_<role>`` in manifest order, on every rank."""
    keys, descs = _extract_own_share(fn, dim, manifest, sid, role, data, device, kind, bf16)
    return gather_descriptors(keys, descs, manifest.group_keys(f"{sid}_{role}"))


def _extract_own_share(fn, dim: int, manifest: Manifest, sid: str, role: str, data: DataConfig,
                       device: torch.device, kind: str, bf16: bool):
    """``(keys, rows)`` this rank's streaming share of ``<sid>_<role>`` gives, in stream order."""
    group = f"{sid}_{role}"
    return extract_descriptors(
        fn, pass_loader(manifest, sid, role, data, kind), dim, device,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        total=expected_count(manifest, group, du.get_rank(), du.get_world_size()), desc=f"extract {group}",
    )


def extract_group_local(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    manifest: Manifest,
    sid: str,
    role: str,
    data: DataConfig,
    device: torch.device,
    kind: str = "test",
    bf16: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """This rank's descriptors of ``<sid>_<role>``, not gathered: ``(positions, rows)``.

    ``positions`` are the samples' indices in the group's manifest order
    (``manifest.group_keys``), sorted, with ``rows`` in that order. A collective: the ranks
    exchange their positions (integers only) and check that every sample of the group was
    extracted exactly once across them.
    """
    group = f"{sid}_{role}"
    keys, descs = _extract_own_share(fn, dim, manifest, sid, role, data, device, kind, bf16)
    ordered = manifest.group_keys(group)
    where = {k: i for i, k in enumerate(ordered)}
    known = np.array([k in where for k in keys], dtype=bool)
    if not known.all():
        log.info("ignoring %d extracted descriptors not in %s", int((~known).sum()), group)
    pos = np.array([where[k] for k, ok in zip(keys, known) if ok], dtype=np.int64)
    count = np.bincount(np.concatenate(du.all_gather_object(pos)), minlength=len(ordered))
    if (count != 1).any():
        missing = [ordered[i] for i in np.flatnonzero(count == 0)[:5]]
        twice = [ordered[i] for i in np.flatnonzero(count > 1)[:5]]
        raise ValueError(f"{group}: {int((count == 0).sum())} descriptor(s) missing (e.g. {missing}), "
                         f"{int((count > 1).sum())} extracted more than once (e.g. {twice})")
    order = np.argsort(pos, kind="stable")
    rows = descs[np.flatnonzero(known)[order]]  # one copy, in manifest order
    return pos[order], np.ascontiguousarray(rows.reshape(len(pos), dim), dtype=np.float32)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` in eval mode and restore its previous mode after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)

