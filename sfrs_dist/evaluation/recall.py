"""Recall@N for image localization, as pure functions over retrieved indices.

A query is correct at N if any of its top-N retrieved database images is among its
positives (database images within 25 m). Queries without any positive in the database count
as failures: the denominator is always the number of queries, as in the reference
evaluation (``correct / len(ground_truth)``). Tokyo 24/7 retrievals first pass
``spatial_nms`` (one image per panorama).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from sfrs_dist.evaluation.search import search_topk

DEFAULT_NS: Tuple[int, ...] = (1, 5, 10, 20)
#: Order in which light conditions are reported (others follow alphabetically).
CONDITION_ORDER: Tuple[str, ...] = ("day", "sunset", "night")
OVERALL = "all"


def hit_matrix(topk_indices: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean (Q, K): whether ``topk_indices[q, j]`` is one of query q's positives.

    Vectorised through one ``np.isin`` on (query, database index) pairs; entries of -1
    (missing results) are never hits.
    """
    topk = np.asarray(topk_indices)
    if topk.ndim != 2:
        raise ValueError(f"topk_indices must be 2-D (queries, k), got shape {topk.shape}")
    if len(positives) != topk.shape[0]:
        raise ValueError(f"{len(positives)} positive lists for {topk.shape[0]} queries")
    topk = topk.astype(np.int64, copy=False)
    pos = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positives]
    max_pos = max((int(p.max()) for p in pos if p.size), default=-1)
    stride = max(int(topk.max(initial=-1)), max_pos) + 1
    if stride <= 0:
        return np.zeros(topk.shape, dtype=bool)
    q_ids = np.arange(topk.shape[0], dtype=np.int64)
    ret_codes = q_ids[:, None] * stride + topk
    pos_codes = np.concatenate([q * stride + p for q, p in zip(q_ids, pos)] + [np.empty(0, np.int64)])
    return np.isin(ret_codes, pos_codes) & (topk >= 0)


def recall_at_n(topk_indices: np.ndarray, positives: Sequence[np.ndarray],
                ns: Sequence[int] = DEFAULT_NS) -> Dict[int, float]:
    """Fraction of queries with a positive among their top-N retrievals, for each N in ``ns``.

    Args:
        topk_indices: (Q, Kmax) retrieved database indices, best first; Kmax >= max(ns).
        positives: per query, the database indices of its positives (may be empty).
        ns: the N values.

    Returns:
        {N: recall in [0, 1]}; the denominator is Q (queries without positives fail).
    """
    topk = np.asarray(topk_indices)
    if not ns:
        raise ValueError("ns is empty")
    if topk.ndim != 2:
        raise ValueError(f"topk_indices must be 2-D (queries, k), got shape {topk.shape}")
    if min(ns) < 1:
        raise ValueError(f"every N must be >= 1, got {list(ns)}")
    if topk.shape[1] < max(ns):
        raise ValueError(f"topk_indices has {topk.shape[1]} columns, recall@{max(ns)} needs {max(ns)}")
    if topk.shape[0] == 0:
        raise ValueError("no queries")
    hits = hit_matrix(topk, positives)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {int(n): float(np.mean(first < n)) for n in ns}


def spatial_nms(indices: np.ndarray, panorama_ids: np.ndarray, n: int) -> np.ndarray:
    """Keep the best-ranked image of each panorama, then the first ``n`` (Tokyo 24/7).

    Args:
        indices: (Q, M) retrieved database indices, best first (typically M = 12 * n);
            -1 entries (missing results) are skipped.
        panorama_ids: (G,) integer panorama id of every database image.
        n: results to keep per query.

    Returns:
        (Q, n) int64 database indices, padded with -1 when fewer than n panoramas appear.
    """
    idx = np.asarray(indices, dtype=np.int64)
    pano = np.asarray(panorama_ids).reshape(-1)
    if not np.issubdtype(pano.dtype, np.integer):
        raise ValueError(f"panorama_ids must be integers, got dtype {pano.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"indices must be 2-D (queries, M), got shape {idx.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if idx.size and idx.max() >= pano.shape[0]:
        raise ValueError(f"index {int(idx.max())} out of range for {pano.shape[0]} panorama ids")
    valid = idx >= 0
    pids = np.where(valid, pano[np.where(valid, idx, 0)], 0)
    # First occurrence of each panorama id per row: stable sort by id, compare neighbours.
    order = np.argsort(np.where(valid, pids, np.iinfo(np.int64).max), axis=1, kind="stable")
    sorted_ids = np.take_along_axis(pids, order, axis=1)
    sorted_valid = np.take_along_axis(valid, order, axis=1)
    first_sorted = np.ones_like(sorted_valid)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = np.zeros_like(valid)
    np.put_along_axis(first, order, first_sorted & sorted_valid, axis=1)
    keep = first & (np.cumsum(first, axis=1) <= n)
    out = np.full((idx.shape[0], n), -1, dtype=np.int64)
    rows, cols = np.nonzero(keep)
    slot = np.cumsum(keep, axis=1)[rows, cols] - 1
    out[rows, slot] = idx[rows, cols]
    return out


def _condition_names(conditions: Sequence[str]) -> List[str]:
    present = set(conditions)
    known = [c for c in CONDITION_ORDER if c in present]
    return known + sorted(present - set(CONDITION_ORDER))


def recall_table(topk_indices: np.ndarray, positives: Sequence[np.ndarray],
                 conditions: Optional[Sequence[str]] = None,
                 ns: Sequence[int] = DEFAULT_NS) -> Dict[str, Dict[int, float]]:
    """Recall@N overall (key ``"all"``) and per light condition (``day``, ``sunset``, ``night``...).

    Args:
        topk_indices: (Q, Kmax) retrieved database indices, best first.
        positives: per query, its positive database indices.
        conditions: per query, a condition name; None gives the overall row only.
        ns: the N values.
    """
    topk = np.asarray(topk_indices)
    table = {OVERALL: recall_at_n(topk, positives, ns)}
    if conditions is None:
        return table
    conditions = [str(c) for c in conditions]
    if len(conditions) != topk.shape[0]:
        raise ValueError(f"{len(conditions)} conditions for {topk.shape[0]} queries")
    cond = np.asarray(conditions)
    for name in _condition_names(conditions):
        sel = np.flatnonzero(cond == name)
        table[name] = recall_at_n(topk[sel], [positives[i] for i in sel], ns)
    return table


def format_recall_table(table: Dict[str, Dict[int, float]], counts: Optional[Dict[str, int]] = None) -> str:
    """Plain-text table, one row per group, recalls in percent."""
    ns = sorted(next(iter(table.values())).keys())
    head = f"{'group':<10}" + "".join(f"{'R@' + str(n):>9}" for n in ns)
    if counts:
        head += f"{'queries':>9}"
    lines = [head]
    for name, rec in table.items():
        row = f"{name:<10}" + "".join(f"{100.0 * rec[n]:>9.2f}" for n in ns)
        if counts:
            row += f"{counts.get(name, 0):>9d}"
        lines.append(row)
    return "\n".join(lines)


def search_depth(ns: Sequence[int], spatial: bool = False) -> int:
    """Neighbours to retrieve per query: ``max(ns)``, or ``12 * max(ns)`` before spatial NMS."""
    if not ns:
        raise ValueError("ns is empty")
    return 12 * max(ns) if spatial else max(ns)


def recall_from_topk(topk_indices: np.ndarray, positives: Sequence[np.ndarray],
                     ns: Sequence[int] = DEFAULT_NS,
                     panorama_ids: Optional[np.ndarray] = None,
                     conditions: Optional[Sequence[str]] = None,
                     ) -> Dict[str, Dict[int, float]]:
    """Recall table from retrieved indices: optional spatial NMS, then ``recall_table``.

    Args:
        topk_indices: (Q, M) retrieved database indices, best first, with
            ``M >= search_depth(ns, panorama_ids is not None)``; only the first
            ``search_depth`` columns are used (so a deeper search gives the same table).
        positives, conditions, ns: as for ``recall_table``.
        panorama_ids: database panorama ids; when given, the ``12 * max(ns)`` retrieved
            images are reduced to one per panorama first (the Tokyo 24/7 protocol).
    """
    topk = np.asarray(topk_indices)
    depth = search_depth(ns, panorama_ids is not None)
    if topk.ndim != 2 or topk.shape[1] < depth:
        raise ValueError(f"topk_indices must be (queries, >= {depth}), got shape {topk.shape}")
    topk = topk[:, :depth]
    if panorama_ids is not None:
        topk = spatial_nms(topk, panorama_ids, max(ns))
    return recall_table(topk, positives, conditions, ns)


def evaluate_retrieval(db: np.ndarray, queries: np.ndarray, positives: Sequence[np.ndarray],
                       ns: Sequence[int] = DEFAULT_NS,
                       panorama_ids: Optional[np.ndarray] = None,
                       conditions: Optional[Sequence[str]] = None,
                       use_gpu: Union[str, bool] = "auto", bf16: bool = False,
                       ) -> Dict[str, Dict[int, float]]:
    """Search (``search_depth`` neighbours), then ``recall_from_topk``.

    With panorama ids, ``12 * max(ns)`` neighbours are retrieved and reduced to one image per
    panorama before computing recalls (the Tokyo 24/7 protocol).
    """
    k = search_depth(ns, panorama_ids is not None)
    _, topk = search_topk(db, queries, k, use_gpu=use_gpu, bf16=bf16)
    return recall_from_topk(topk, positives, ns, panorama_ids=panorama_ids, conditions=conditions)
