"""Exact top-k inner-product search over a database sharded across ranks.

Layout: rank ``r`` of ``W`` holds the contiguous rows ``[start, end)`` of the global
database (``shard_range``) and builds a faiss inner-product index over them (a GPU flat
index on the rank's local GPU where faiss sees GPUs, ``IndexFlatIP`` on CPU otherwise).
**Every rank holds the full query matrix**: queries are small next to the database (7.8k
queries against 83k-91k database images on Pittsburgh 250k), so replicating them costs one
all-gather of descriptors and lets each rank search every query against its own shard with
no further traffic. The per-shard results (scores and *global* ids) are all-gathered and
merged, so every rank ends with the same ``(Q, k)`` answer.

Order: scores descending, ties broken by the smaller global id, everywhere (shard merge,
bf16 re-sort, self search), so results do not depend on the number of ranks.

bf16 option: a candidate search in bfloat16 (torch matmul in blocks) keeps ``k + margin``
candidates per query, then those candidates are re-scored exactly in float32 and re-sorted.
The CPU bf16 matmul also rounds its *output* to bf16 (about 4e-3 near 0.9, wider than the
gaps between neighbours in dense regions), so the kernel is run on two extra columns that
make it return ``score - offset``, with offsets estimating each row's selection cut, and
the offsets are added back in float32 (``_offset_scores``). The returned scores are always
float32 inner products, and the ids equal those of the exact search except at near-ties
(about 1e-4, the bf16 rounding of the inputs).

``self_topk`` answers the kNN graph of a set against itself (every item's neighbours
among all items, itself included), which the k-reciprocal re-ranking needs over the union
of training queries and database images. Its bf16 path computes each pair of row blocks
once (the score matrix is symmetric), halving the work, and splits the block pairs across
ranks.

When the items themselves are sharded across ranks (``store.ShardedItems``), each rank
searches its own items against one visiting block at a time (``block_candidates``: exact
faiss or bf16 candidates, a running cut estimate carried from block to block) and the
candidates are re-scored pair by pair (``pair_inner_products_between``: one faiss dot
product per pair, the same bits wherever the rows are held).
"""

from __future__ import annotations

import functools
import logging
from typing import List, Optional, Tuple

import faiss
import numpy as np
import torch

from sfrs_dist.distributed import all_gather_object, get_local_rank, get_rank, get_world_size
from sfrs_dist.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 8
_BF16_BLOCK_BYTES = 128 << 20
_MAX_BLOCK_ROWS = 8192
_GATHER_CHUNK_BYTES = 64 << 20


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` of ``n`` owned by ``rank`` (contiguous, sizes differ by <= 1)."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (n, d), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def sort_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` entries of highest score, ties by smaller id; ``id < 0`` is padding."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32, copy=False)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_topk(parts: List[Tuple[np.ndarray, np.ndarray]], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, global ids)`` lists of the same queries into one top-k."""
    parts = [p for p in parts if p[0].shape[1] > 0]
    if not parts:
        raise ValueError("merge_topk: every shard is empty")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64, copy=False)
    if scores.shape[1] < k:
        raise ValueError(f"merge_topk: asked for k={k} but the shards hold only {scores.shape[1]} items")
    return sort_topk(scores, ids, k)


def gather_inner_products(x: np.ndarray, base: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``out[i, j] = x[i] . base[ids[i, j]]`` in float32; ``ids < 0`` gives ``-inf``.

    Reads only the rows named in ``ids`` (faiss ``fvec_inner_products_by_idx``): no dense
    ``x @ base.T``.
    """
    x = _as_f32(x, "x")
    base = _as_f32(base, "base")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids must have shape ({x.shape[0]}, m), got {ids.shape}")
    if x.shape[1] != base.shape[1]:
        raise ValueError(f"dimension mismatch: x has {x.shape[1]}, base has {base.shape[1]}")
    if ids.size and ids.max() >= base.shape[0]:
        raise ValueError(f"ids reach {ids.max()} but base has {base.shape[0]} rows")
    out = np.empty(ids.shape, dtype=np.float32)
    if ids.size:
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(base),
                                         faiss.swig_ptr(ids), x.shape[1], ids.shape[0], ids.shape[1])
    return out


def pair_inner_products(feats: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``feats[a[i]] . feats[b[i]]`` for index pairs, reading only the rows involved.

    Pairs are grouped by ``a`` into padded id rows so each ``feats[a]`` row is read once.
    """
    return pair_inner_products_between(feats, feats, a, b)


def pair_inner_products_between(xa: np.ndarray, xb: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``xa[a[i]] . xb[b[i]]`` in float32, one faiss dot product per pair.

    Each value comes from the same kernel (``fvec_inner_product`` of the two rows, whatever
    else is computed with it), so a pair gives the same bits wherever the two rows are
    held; the mining relies on that to give identical results on any number of ranks.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d of equal length, got {a.shape} and {b.shape}")
    out = np.empty(len(a), dtype=np.float32)
    if len(a) == 0:
        return out
    order = np.argsort(a, kind="stable")
    sa, sb = a[order], b[order]
    rows, starts, counts = np.unique(sa, return_index=True, return_counts=True)
    slot = np.arange(len(sa)) - np.repeat(starts, counts)
    width = int(counts.max())
    chunk = max(1, _GATHER_CHUNK_BYTES // (4 * xa.shape[1]))
    res = np.empty(len(sa), dtype=np.float32)
    for r0 in range(0, len(rows), chunk):
        r1 = min(r0 + chunk, len(rows))
        p0, p1 = starts[r0], (starts[r1] if r1 < len(rows) else len(sa))
        ids = np.full((r1 - r0, width), -1, dtype=np.int64)
        local_row = np.repeat(np.arange(r1 - r0), counts[r0:r1])
        ids[local_row, slot[p0:p1]] = sb[p0:p1]
        ip = gather_inner_products(xa[rows[r0:r1]], xb, ids)
        res[p0:p1] = ip[local_row, slot[p0:p1]]
    out[order] = res
    return out


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One set of faiss GPU resources per process (a block pass builds many indexes)."""
    return faiss.StandardGpuResources()


_PROGRESS_PAIRS = 2 * 10**9
"""Inner products from which an exact search runs in query blocks and reports progress."""


class _FlatIndex:
    """A faiss flat inner-product index on the local GPU when faiss has GPUs, else on CPU."""

    def __init__(self, d: int) -> None:
        self.res = None
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if ngpu > 0:
            self.res = _gpu_resources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = get_local_rank() % ngpu
            self.index = faiss.GpuIndexFlatIP(self.res, d, cfg)
        else:
            self.index = faiss.IndexFlatIP(d)

    def search(self, db: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """faiss search of ``queries`` against ``db``; a large one (``_PROGRESS_PAIRS`` inner
        products and more) in query blocks, with progress lines on rank 0."""
        self.index.add(db)
        nq = queries.shape[0]
        if nq * db.shape[0] < _PROGRESS_PAIRS:
            scores, ids = self.index.search(queries, k)
        else:
            scores = np.empty((nq, k), np.float32)
            ids = np.empty((nq, k), np.int64)
            step = max(1024, nq // 50)
            with Progress(nq, f"kNN search ({db.shape[0]} database rows)", unit="query") as p:
                for a in range(0, nq, step):
                    scores[a : a + step], ids[a : a + step] = self.index.search(queries[a : a + step], k)
                    p.update(min(step, nq - a))
        self.index.reset()
        return scores, ids


def _local_exact(local_db: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the queries in the local shard (local ids), ties by smaller id.

    faiss keeps ``k + margin`` per query; a row whose k-th score still equals the last one
    returned may have more tied items than faiss kept, so that (rare) row is recomputed
    in full and sorted.
    """
    n = local_db.shape[0]
    k_loc = min(n, k)
    kk = min(n, k + DEFAULT_MARGIN)
    if kk == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    scores, ids = _FlatIndex(local_db.shape[1]).search(local_db, queries, kk)
    s, i = sort_topk(scores, ids, k_loc)
    if kk < n:
        for r in np.flatnonzero(scores[:, kk - 1] >= s[:, k_loc - 1]):
            row = local_db @ queries[r]
            order = np.lexsort((np.arange(n), -row))[:k_loc]
            s[r], i[r] = row[order], order
    return s, i


def _block_rows(d: int) -> int:
    return int(max(64, min(_MAX_BLOCK_ROWS, _BF16_BLOCK_BYTES // (2 * d))))


_PAD = 16  # extra bf16 columns holding the two offset slots (rounded up for alignment)


def _bf16_block(x: np.ndarray, device: Optional[torch.device] = None) -> torch.Tensor:
    """bf16 copy of the rows of ``x`` with ``_PAD`` extra columns for offsets, on ``device`` (default CPU)."""
    out = torch.zeros((x.shape[0], x.shape[1] + _PAD), dtype=torch.bfloat16, device=device)
    out[:, : x.shape[1]] = torch.from_numpy(np.ascontiguousarray(x)).to(out.device)
    return out


def _offset_scores(rows: torch.Tensor, a_rows: torch.Tensor, cols: torch.Tensor, a_cols: torch.Tensor,
                   d: int) -> torch.Tensor:
    """Approximate ``rows . cols`` (float32) from a bf16 matmul taken around offsets.

    A bf16 matmul rounds its output to 8 significant bits: about 2e-3 to 4e-3 for scores
    in [0.25, 1), coarser than the gaps between neighbours in dense regions. Two extra
    columns make the kernel return ``s - a_r - a_c`` instead, which is small near the
    selection cut when ``a`` estimates each row's cut score; the offsets (as stored in
    bf16) are added back in float32, so the rounding is relative to ``|s - a_r - a_c|``.
    """
    rows[:, d] = (-a_rows).to(torch.bfloat16)
    rows[:, d + 1] = 1
    cols[:, d] = 1
    cols[:, d + 1] = (-a_cols).to(torch.bfloat16)
    v = (rows @ cols.T).float()
    v -= rows[:, d].float()[:, None]
    v -= cols[:, d + 1].float()[None, :]
    return v


def _cut_estimate(best_s: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Current estimate of each row's selection cut (kk-th best so far), 0 where unknown."""
    est = torch.maximum(best_s[:, -1], floor)
    return torch.where(torch.isfinite(est), est, torch.zeros_like(est))


def _merge_running(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor,
                   kk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cs = torch.cat([best_s, s], 1)
    ci = torch.cat([best_i, i], 1)
    top_s, pos = torch.topk(cs, kk, dim=1)
    return top_s, torch.gather(ci, 1, pos)


def _bf16_candidates(local_db: np.ndarray, queries: np.ndarray, kk: int) -> np.ndarray:
    """Local ids of the ``kk`` best bf16 scores of every query in ``local_db`` (-1 pads)."""
    return _bf16_search(local_db, queries, kk)[1]


def _bf16_search(local_db: np.ndarray, queries: np.ndarray, kk: int,
                 floor: Optional[np.ndarray] = None,
                 device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Approximate scores and local ids of the ``kk`` best bf16 scores of every query (-1 pads).

    ``floor``: an estimate of each query's selection cut (e.g. from the blocks searched
    before); without it a first pass against the first database block estimates it. The
    full pass then computes every block around that (running) estimate. The matmuls run on
    ``device`` (default the CPU; the rank's GPU on a GPU node).
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    q_n, (n, d) = queries.shape[0], local_db.shape
    block = _block_rows(d)
    if floor is None:
        phases = (0, 1)
        cut = torch.full((q_n,), -float("inf"), device=dev)
    else:
        phases = (1,)
        cut = torch.from_numpy(np.asarray(floor, dtype=np.float32)).to(dev).clone()
    for phase in phases:
        best_s = torch.full((q_n, kk), -float("inf"), device=dev)
        best_i = torch.full((q_n, kk), -1, dtype=torch.int64, device=dev)
        report = bool(phase) and n * q_n >= _PROGRESS_PAIRS
        with Progress(n, f"kNN search bf16 ({q_n} queries)", unit="database row",
                      enabled=None if report else False) as p:
            for c0 in range(0, n if phase else min(n, block), block):
                c1 = min(n, c0 + block)
                db_b = _bf16_block(local_db[c0:c1], dev)
                zeros = torch.zeros(c1 - c0, device=dev)
                for q0 in range(0, q_n, block):
                    q1 = min(q_n, q0 + block)
                    a = _cut_estimate(best_s[q0:q1], cut[q0:q1]) if phase else torch.zeros(q1 - q0, device=dev)
                    s = _offset_scores(_bf16_block(queries[q0:q1], dev), a, db_b, zeros, d)
                    ts, ti = torch.topk(s, min(kk, c1 - c0), dim=1)
                    best_s[q0:q1], best_i[q0:q1] = _merge_running(best_s[q0:q1], best_i[q0:q1], ts, ti + c0, kk)
                p.update(c1 - c0)
        cut = best_s[:, -1].clone()
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def block_candidates(block: np.ndarray, queries: np.ndarray, kk: int, bf16: bool = False,
                     floor: Optional[np.ndarray] = None,
                     device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Candidate neighbours of every query among the rows of ``block`` (one visiting block).

    Exact: a faiss flat inner-product search (``_local_exact``: GPU where faiss has one,
    exact ties by smaller id). bf16: the candidate search of ``_bf16_search`` around
    ``floor``, each query's estimated cut (``None``: estimated from the block), on ``device``
    (default the CPU). Returns
    ``(scores, local ids)`` of shape ``(Q, min(kk, len(block)))``, scores approximate
    (the search's own), ``-1`` ids pad; callers re-score the candidates they keep with
    ``pair_inner_products_between``.
    """
    queries = _as_f32(queries, "queries")
    block = _as_f32(block, "block")
    kk = min(kk, block.shape[0])
    if kk == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    if bf16:
        return _bf16_search(block, queries, kk, floor, device)
    return _local_exact(block, queries, kk)


def _local_bf16(local_db: np.ndarray, queries: np.ndarray, k: int, margin: int) -> Tuple[np.ndarray, np.ndarray]:
    if local_db.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    cand = _bf16_candidates(local_db, queries, k + margin)
    exact = gather_inner_products(queries, local_db, cand)
    return sort_topk(exact, cand, min(k, local_db.shape[0]))


def sharded_topk(local_db: np.ndarray, db_offset: int, queries: np.ndarray, k: int,
                 bf16: bool = False, margin: int = DEFAULT_MARGIN) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of every query over the database sharded across ranks.

    Args:
        local_db: this rank's rows of the database, ``(n_local, d)``; may be empty.
        db_offset: global id of ``local_db[0]``.
        queries: the full query matrix ``(Q, d)``, identical on every rank.
        k: neighbours per query (at most the global database size).
        bf16: bf16 candidate search plus exact float32 re-scoring.
        margin: extra bf16 candidates kept per query before re-scoring.

    Returns:
        ``(scores, ids)``, both ``(Q, k)``: float32 inner products (descending, ties by
        smaller id) and int64 global database ids; identical on every rank.
    """
    queries = _as_f32(queries, "queries")
    local_db = _as_f32(local_db.reshape(-1, queries.shape[1]) if local_db.size == 0 else local_db, "local_db")
    if local_db.shape[1] != queries.shape[1]:
        raise ValueError(f"local_db has dimension {local_db.shape[1]}, queries {queries.shape[1]}")
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if bf16:
        s, i = _local_bf16(local_db, queries, k, margin)
    else:
        s, i = _local_exact(local_db, queries, k)
    part = (s, i + int(db_offset))
    return merge_topk(all_gather_object(part), k)


def _block_pairs(n: int, block: int) -> List[Tuple[int, int]]:
    nb = (n + block - 1) // block
    return [(i, j) for i in range(nb) for j in range(i, nb)]


def _self_bf16_candidates(feats: np.ndarray, kk: int, rank: int, world: int) -> Tuple[np.ndarray, np.ndarray]:
    """bf16 candidate lists (scores, ids) of every row from this rank's share of block pairs.

    Phase 1 (diagonal blocks, split across ranks, estimates all-gathered) estimates each
    row's cut score; phase 2 computes the rank's block pairs around half of the running
    estimate of each side (``s - a_r/2 - a_c/2`` is small for pairs near both cuts).
    """
    n, d = feats.shape
    block = _block_rows(d)
    nb = (n + block - 1) // block
    floor = torch.full((n,), -float("inf"))
    for bi in range(rank, nb, world):
        r0, r1 = bi * block, min(n, (bi + 1) * block)
        x = _bf16_block(feats[r0:r1])
        s = _offset_scores(x, torch.zeros(r1 - r0), x.clone(), torch.zeros(r1 - r0), d)
        floor[r0:r1] = torch.topk(s, min(kk, r1 - r0), dim=1).values[:, -1]
    floor = torch.stack(all_gather_object(floor)).max(0).values
    best_s = torch.full((n, kk), -float("inf"))
    best_i = torch.full((n, kk), -1, dtype=torch.int64)
    cache_i: Optional[int] = None
    xi: Optional[torch.Tensor] = None
    pairs = _block_pairs(n, block)[rank::world]
    with Progress(len(pairs), f"kNN graph bf16 ({n} items)", unit="block pair",
                  enabled=None if n * n >= world * _PROGRESS_PAIRS else False) as p:
        for bi, bj in pairs:
            r0, r1 = bi * block, min(n, (bi + 1) * block)
            c0, c1 = bj * block, min(n, (bj + 1) * block)
            if cache_i != bi:
                xi, cache_i = _bf16_block(feats[r0:r1]), bi
            xj = xi.clone() if bj == bi else _bf16_block(feats[c0:c1])
            a_r = _cut_estimate(best_s[r0:r1], floor[r0:r1]) / 2
            a_c = _cut_estimate(best_s[c0:c1], floor[c0:c1]) / 2
            s = _offset_scores(xi, a_r, xj, a_c, d)
            ts, ti = torch.topk(s, min(kk, c1 - c0), dim=1)
            best_s[r0:r1], best_i[r0:r1] = _merge_running(best_s[r0:r1], best_i[r0:r1], ts, ti + c0, kk)
            if bj != bi:
                ts, ti = torch.topk(s.T, min(kk, r1 - r0), dim=1)
                best_s[c0:c1], best_i[c0:c1] = _merge_running(best_s[c0:c1], best_i[c0:c1], ts, ti + r0, kk)
            p.update()
    return best_s.numpy(), best_i.numpy()


def _rescore_symmetric(feats: np.ndarray, cand: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Exact float32 scores of ``(row, cand[row, j])``; each unordered pair computed once.

    Pairs are split across ranks by their smaller index and the results all-gathered.
    """
    n, kk = cand.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), kk)
    cols = cand.reshape(-1)
    valid = cols >= 0
    lo = np.minimum(rows, cols)[valid]
    hi = np.maximum(rows, cols)[valid]
    keys = np.unique(lo * n + hi)
    start, end = shard_range(n, rank, world)
    mine = keys[(keys // n >= start) & (keys // n < end)]
    part = (mine, pair_inner_products(feats, mine // n, mine % n))
    gathered = all_gather_object(part)
    all_keys = np.concatenate([g[0] for g in gathered])
    all_vals = np.concatenate([g[1] for g in gathered])
    order = np.argsort(all_keys)
    all_keys, all_vals = all_keys[order], all_vals[order]
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    pos = np.searchsorted(all_keys, (np.minimum(rows, cols) * n + np.maximum(rows, cols))[valid])
    out[valid] = all_vals[pos]
    return out.reshape(n, kk)


def self_topk(feats: np.ndarray, k: int, bf16: bool = False,
              margin: int = DEFAULT_MARGIN) -> Tuple[np.ndarray, np.ndarray]:
    """kNN graph of ``feats`` against itself: every row's top-k inner products, itself included.

    ``feats`` is the full ``(N, d)`` matrix on every rank (the query side of
    ``sharded_topk``); the work is split across ranks (exact: rank r indexes its contiguous
    share of rows; bf16: rank r computes its share of the symmetric block pairs). Returns
    ``(scores, ids)`` of shape ``(N, k)``, identical on every rank.
    """
    feats = _as_f32(feats, "feats")
    n = feats.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must lie in [1, {n}] for {n} items, got {k}")
    rank, world = get_rank(), get_world_size()
    if not bf16:
        start, end = shard_range(n, rank, world)
        return sharded_topk(feats[start:end], start, feats, k)
    kk = min(n, k + margin)
    s, i = _self_bf16_candidates(feats, kk, rank, world)
    gathered = all_gather_object((s, i))
    _, cand = merge_topk(gathered, kk) if world > 1 else sort_topk(s, i, kk)
    exact = _rescore_symmetric(feats, cand, rank, world)
    return sort_topk(exact, cand, k)


def self_farthest(feats: np.ndarray, bf16: bool = False, margin: int = DEFAULT_MARGIN) -> np.ndarray:
    """Every row's smallest inner product over all rows of ``feats`` (its farthest item).

    A top-``1 + margin`` search of the negated descriptors through ``sharded_topk`` (each
    rank indexes its contiguous share of rows), the candidates re-scored one pair at a time
    (``pair_inner_products``) and the smallest kept; the re-ranking's per-row distance
    maximum (``rerank.row_maxima``) comes from it without an N x N matrix. Returns ``(N,)``
    float32, identical on every rank.
    """
    feats = _as_f32(feats, "feats")
    n = feats.shape[0]
    if n == 0:
        raise ValueError("self_farthest: no items")
    fm = min(n, 1 + margin)
    start, end = shard_range(n, get_rank(), get_world_size())
    _, cand = sharded_topk(feats[start:end], start, -feats, fm, bf16=bf16)
    exact = pair_inner_products(feats, np.repeat(np.arange(n, dtype=np.int64), fm), cand.reshape(-1))
    return exact.reshape(n, fm).min(axis=1)
