"""The loss of one training batch, from the network's region descriptors of its tuples.

A batch stacks, per tuple, the images ``query, positive, negatives..., difficult positives...``
(``TupleImages``); the network gives each image's 9 region descriptors, row 0 the global one.

- generation 0: the hard loss (SARE-ind/joint or triplet) of the global descriptors;
- generation >= 1: ``sfrs_hard_loss`` (each negative's most similar region against the
  query) plus ``loss.soft_weight`` x ``sfrs_soft_loss``: the student's similarities between
  the query's global descriptor and each region of each difficult positive, against the
  teacher's same similarities (the soft labels).

The teacher's similarities come either from the cached teacher pass (``cached_soft_targets``:
un-augmented images, one pass per generation) or from the teacher network run on the very
tensors the student sees, under ``no_grad`` (``online_soft_targets``: the reference's way).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..config import LossConfig
from ..losses import sfrs_hard_loss, sfrs_soft_loss, tuple_loss
from ..models import global_region_similarity


def tuple_rows(tuples: Sequence[Dict]) -> List[Tuple[int, int, int]]:
    """Per tuple: (first row in the batch, number of negatives, number of difficult positives)."""
    out, off = [], 0
    for b in tuples:
        n, k = int(b["num_negatives"]), len(b["difficult"])
        out.append((off, n, k))
        off += 2 + n + k
    return out


def max_difficult(tuples: Sequence[Dict]) -> int:
    """The padded number of difficult positives per tuple (at least 1)."""
    return max([len(b["difficult"]) for b in tuples] + [1])


def query_difficult_similarities(q_global: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(k, 9) similarities of a query's global descriptor (D,) with k images' regions (k, 9, D)."""
    return global_region_similarity(q_global.unsqueeze(0), regions.unsqueeze(0))[0]


def cached_soft_targets(cache, tuples: Sequence[Dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Teacher similarities (B, k_max, 9) and mask (B, k_max) looked up in the teacher cache."""
    k_max = max_difficult(tuples)
    soft_t = np.zeros((len(tuples), k_max, 9), dtype=np.float32)
    mask = np.zeros((len(tuples), k_max), dtype=bool)
    for i, b in enumerate(tuples):
        k = len(b["difficult"])
        if k:
            soft_t[i, :k] = cache.lookup(b["query"], b["difficult"])
            mask[i, :k] = True
    return soft_t, mask


def online_soft_targets(teacher: nn.Module, images: torch.Tensor, tuples: Sequence[Dict],
                        autocast=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher similarities (B, k_max, 9) and mask (B, k_max) from the teacher network run, under
    ``no_grad``, on the batch's own (jittered) query and difficult-positive tensors.

    Only those rows are forwarded (negatives and the easiest positive carry no soft label).
    ``autocast`` is a context manager factory (the student's precision), or None.
    """
    k_max = max_difficult(tuples)
    rows, layout = [], []
    for start, n, k in tuple_rows(tuples):
        layout.append((len(rows), k))
        if k:
            rows.append(start)
            rows.extend(range(start + 2 + n, start + 2 + n + k))
    soft_t = images.new_zeros((len(tuples), k_max, 9), dtype=torch.float32)
    mask = torch.zeros((len(tuples), k_max), dtype=torch.bool, device=images.device)
    if not rows:
        return soft_t, mask
    index = torch.as_tensor(rows, device=images.device)
    with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
        regions = teacher(images.index_select(0, index), regions=True)
    regions = regions.float()
    for i, (at, k) in enumerate(layout):
        if k:
            soft_t[i, :k] = query_difficult_similarities(regions[at, 0], regions[at + 1:at + 1 + k])
            mask[i, :k] = True
    return soft_t, mask


def step_loss(regions: torch.Tensor, tuples: Sequence[Dict], gen: int, loss: LossConfig, tau0: float, tau: float,
              soft_targets: Tuple[torch.Tensor, torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The batch's loss and its parts (device tensors; nothing here waits for the device).

    ``regions`` (N, 9, D): the student's region descriptors of the batch's images in tuple
    order; ``soft_targets``: (teacher similarities (B, k_max, 9), mask (B, k_max)) on the
    device, needed from generation 1 on.
    """
    q, p, negs, nregs, soft_s = [], [], [], [], []
    k_max = max_difficult(tuples)
    for start, n, k in tuple_rows(tuples):
        r = regions[start:start + 2 + n + k]
        q.append(r[0, 0])
        p.append(r[1, 0])
        negs.append(r[2:2 + n, 0])
        nregs.append(r[2:2 + n])
        if gen >= 1:
            s = query_difficult_similarities(r[0, 0], r[2 + n:]) if k else r.new_zeros(0, 9)
            soft_s.append(torch.cat([s, s.new_zeros(k_max - k, 9)]))
    q, p = torch.stack(q), torch.stack(p)
    if gen == 0:
        hard = tuple_loss(q, p, torch.stack(negs), kind=loss.kind, temp=tau0, margin=loss.hinge_margin)
        return hard, {"loss_hard": hard.detach()}
    if soft_targets is None:
        raise ValueError(f"generation {gen} needs the teacher's soft targets")
    soft_t, mask = soft_targets
    hard = sfrs_hard_loss(q, p, torch.stack(nregs), temp=tau0, kind=loss.kind, margin=loss.hinge_margin)
    soft = sfrs_soft_loss(torch.stack(soft_s), soft_t, mask, tau0=tau0, tau_g=tau)
    total = hard + loss.soft_weight * soft
    return total, {"loss_hard": hard.detach(), "loss_soft": soft.detach()}
