"""Descriptor extraction over a stream of samples, and gathering the shards of all ranks.

Each rank runs ``extract_descriptors`` over its own part of the data (the shard streaming
reader splits samples by node and worker), then ``gather_descriptors`` collects every rank's
(key, descriptor) pairs and returns them in a fixed key order, checking that every key was
processed exactly once across the ranks.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from sfrs_dist.distributed import all_gather_object, is_main_process
from sfrs_dist.progress import Progress

log = logging.getLogger(__name__)


def extract_descriptors(model_fn: Callable[[torch.Tensor], torch.Tensor],
                        loader: Iterable[Mapping], dim: int, device: torch.device,
                        autocast_dtype: Optional[torch.dtype] = None,
                        progress: bool = True, total: Optional[int] = None,
                        desc: str = "extract") -> Tuple[List[str], np.ndarray]:
    """Run ``model_fn`` over batches of ``{"key": [str, ...], "image": (B, 3, H, W)}``.

    Args:
        model_fn: maps a batch of images to (B, dim) descriptors.
        loader: iterable of batch dicts (e.g. the shard streaming reader behind a DataLoader).
        dim: expected descriptor dimension (checked).
        device: where images are moved before ``model_fn``.
        autocast_dtype: run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        progress: report progress on rank 0 (``sfrs_dist.progress``: a bar on a terminal,
            a log line every few seconds otherwise).
        total: images this rank will see (for the bar's total), if known.
        desc: name of the pass in the progress report.

    Returns:
        (keys, descriptors): the keys in the order seen and a (n, dim) float32 array.
    """
    device = torch.device(device)
    keys: List[str] = []
    parts: List[np.ndarray] = []
    report = Progress(total, desc, unit="img", enabled=progress and is_main_process())
    with report, torch.no_grad():
        for bi, batch in enumerate(loader):
            if "key" not in batch or "image" not in batch:
                raise KeyError(f"batch {bi} lacks 'key' or 'image' (has {sorted(batch)})")
            batch_keys = [batch["key"]] if isinstance(batch["key"], str) else list(batch["key"])
            images = batch["image"].to(device, non_blocking=True)
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    out = model_fn(images)
            else:
                out = model_fn(images)
            if out.ndim != 2 or out.shape[1] != dim or out.shape[0] != len(batch_keys):
                raise ValueError(f"batch {bi}: model gave shape {tuple(out.shape)} for "
                                 f"{len(batch_keys)} keys, expected ({len(batch_keys)}, {dim})")
            keys.extend(str(k) for k in batch_keys)
            parts.append(out.float().cpu().numpy())
            report.update(len(batch_keys))
    descs = np.concatenate(parts, axis=0) if parts else np.empty((0, dim), dtype=np.float32)
    return keys, descs


def _describe(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return f"{len(keys)} key(s): {shown}{', ...' if len(keys) > limit else ''}"


def order_descriptors(shards: Sequence[Tuple[Sequence[str], np.ndarray]],
                      ordered_keys: Sequence[str]) -> np.ndarray:
    """Stack per-rank (keys, descriptors) shards in the order of ``ordered_keys``.

    Keys present in the shards but not in ``ordered_keys`` are ignored; a key of
    ``ordered_keys`` that is missing or that appears more than once raises ``ValueError``.
    """
    if len(set(ordered_keys)) != len(ordered_keys):
        raise ValueError("ordered_keys contains duplicates")
    where: Dict[str, Tuple[int, int]] = {}
    duplicated: List[str] = []
    for s, (keys, descs) in enumerate(shards):
        if len(keys) != len(descs):
            raise ValueError(f"rank {s} sent {len(keys)} keys but {len(descs)} descriptors")
        for i, k in enumerate(keys):
            if k in where:
                duplicated.append(k)
            where[k] = (s, i)
    wanted = set(ordered_keys)
    dup_wanted = sorted(set(k for k in duplicated if k in wanted))
    if dup_wanted:
        raise ValueError(f"descriptors extracted more than once: {_describe(dup_wanted)}")
    missing = [k for k in ordered_keys if k not in where]
    if missing:
        raise ValueError(f"descriptors missing: {_describe(missing)}")
    extra = len(where) - len(ordered_keys)
    if extra:
        log.info("ignoring %d extracted descriptors not in the requested keys", extra)
    dims = {d.shape[1] for _, d in shards if len(d)}
    if len(dims) > 1:
        raise ValueError(f"ranks sent descriptors of different dimensions {sorted(dims)}")
    dim = dims.pop() if dims else 0
    out = np.empty((len(ordered_keys), dim), dtype=np.float32)
    for row, k in enumerate(ordered_keys):
        s, i = where[k]
        out[row] = shards[s][1][i]
    return out


def gather_descriptors(keys: Sequence[str], descs: np.ndarray, ordered_keys: Sequence[str]) -> np.ndarray:
    """All-gather every rank's (keys, descriptors) and return (len(ordered_keys), dim) in that order.

    A collective: every rank must call it. Works without a process group (one rank).
    """
    descs = np.ascontiguousarray(descs, dtype=np.float32)
    shards = all_gather_object((list(keys), descs))
    return order_descriptors(shards, ordered_keys)


def gather_rows(positions: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """All-gather every rank's ``(positions, rows)`` into one ``(n, dim)`` array, row ``p`` at ``p``.

    For the parts kept by ``extract_group_local`` (positions in manifest order); every
    position in ``[0, n)`` must come from exactly one rank. A collective: every rank calls it.
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != positions.shape[0]:
        raise ValueError(f"{positions.shape[0]} positions for rows of shape {rows.shape}")
    parts = all_gather_object((positions, rows))
    dims = {r.shape[1] for _, r in parts}
    if len(dims) > 1:
        raise ValueError(f"ranks sent rows of different dimensions {sorted(dims)}")
    allpos = np.concatenate([p for p, _ in parts])
    if allpos.size and (allpos.min() < 0 or allpos.max() >= n):
        raise ValueError(f"positions out of range [0, {n})")
    count = np.bincount(allpos, minlength=n)
    if (count != 1).any():
        raise ValueError(f"{int((count == 0).sum())} of {n} rows missing, {int((count > 1).sum())} sent twice")
    out = np.empty((n, dims.pop()), dtype=np.float32)
    for p, r in parts:
        out[p] = r
    return out
