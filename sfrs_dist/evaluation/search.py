"""Top-k nearest-neighbour search for evaluation (inner product on L2-normalised descriptors).

Two paths, both without a dense query x database matrix:

* exact: faiss flat inner-product search. On GPU (``faiss.get_num_gpus() > 0``) an
  ``IndexFlatIP`` on this process's GPU (the local rank's: the node's other GPUs belong to
  the other ranks), with one ``StandardGpuResources`` per process reused across searches;
  on CPU ``faiss.knn`` with the inner-product metric,
  the same blocked BLAS + per-query heap as ``IndexFlatIP.search`` but reading the caller's
  array instead of copying the database into an index. Memory stays at the database plus
  one block of scores.
* bf16 candidates + exact re-score: chunks of queries are scored against blocks of the
  database with torch matmuls on bfloat16 inputs (fp32 accumulation, bf16 output, as CPU
  autocast does for a matmul); the top ``k + margin`` candidates per query are kept across
  blocks, re-scored exactly in fp32 and re-sorted. The database is converted to bf16 one
  block at a time, so no full bf16 copy is held. The result equals the exact search except
  at near-ties: a database image whose exact score lies within the bf16 rounding error
  (about 2**-8 relative) of the k-th best score may be missed if more than ``margin`` other
  candidates crowd it out. The speed-up depends on the CPU's bf16 support (AVX512-BF16,
  AMX); without it the matmul can be slower than faiss in fp32.

Sharded database (``sharded_search_topk``): every rank holds only its own database rows
(with their global ids) and the full query matrix, searches its rows for every query by one
of the paths above, and the per-rank ``(Q, k)`` results are all-gathered and merged
(``merge_topk``: best score first, ties by the smaller global id), so no rank ever holds the
whole database.

Scores are inner products (cosine similarities for unit vectors), sorted best-first.
Missing results (``k`` larger than the database) get index -1 and score -inf.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import faiss
import numpy as np
import torch

from sfrs_dist.distributed import all_gather_object, get_local_rank

log = logging.getLogger(__name__)

#: faiss GPU flat search supports at most this many neighbours per query.
GPU_MAX_K = 2048


def num_faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 for the CPU-only build)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


_GPU_RESOURCES: Dict[int, Any] = {}


def local_gpu() -> int:
    """The GPU faiss searches on in this process: the local rank's, modulo the GPUs faiss sees."""
    return get_local_rank() % max(num_faiss_gpus(), 1)


def gpu_resources(device: Optional[int] = None) -> "faiss.StandardGpuResources":
    """One ``StandardGpuResources`` per GPU and process, made on first use and reused after."""
    device = local_gpu() if device is None else int(device)
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _resolve_gpu(use_gpu: Union[str, bool], k: int) -> bool:
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    n_gpu = num_faiss_gpus()
    if use_gpu is True and n_gpu == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    want = n_gpu > 0 if use_gpu == "auto" else bool(use_gpu)
    if want and k > GPU_MAX_K:
        if use_gpu is True:
            raise ValueError(f"k={k} exceeds the faiss GPU limit of {GPU_MAX_K}")
        log.info("k=%d exceeds the faiss GPU limit %d: searching on CPU", k, GPU_MAX_K)
        return False
    return want


def build_flat_index(db: np.ndarray, use_gpu: bool) -> "faiss.Index":
    """An exact inner-product index over ``db`` (G, D) float32, on this process's GPU or on CPU."""
    index = faiss.IndexFlatIP(db.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(gpu_resources(), local_gpu(), index)
    index.add(db)
    return index


def _pad(scores: np.ndarray, indices: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Mark faiss' missing results (-1) with score -inf and pad to k columns."""
    scores = scores.astype(np.float32, copy=False)
    indices = indices.astype(np.int64, copy=False)
    scores[indices < 0] = -np.inf
    if indices.shape[1] < k:
        extra = k - indices.shape[1]
        indices = np.pad(indices, ((0, 0), (0, extra)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf)
    return scores, indices


def _search_faiss(db: np.ndarray, queries: np.ndarray, k: int, use_gpu: bool,
                  chunk: int) -> Tuple[np.ndarray, np.ndarray]:
    if use_gpu:
        index = build_flat_index(db, use_gpu=True)
        search = index.search
    else:
        def search(xq: np.ndarray, kk: int):
            return faiss.knn(xq, db, kk, metric=faiss.METRIC_INNER_PRODUCT)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    for q0 in range(0, queries.shape[0], chunk):
        q1 = min(q0 + chunk, queries.shape[0])
        scores[q0:q1], indices[q0:q1] = search(queries[q0:q1], k)
    return scores, indices


def _bf16_candidates(db: np.ndarray, queries: np.ndarray, kc: int, chunk: int,
                     db_block: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(Q, kc) database indices with the best bf16 scores, database converted block by block.

    The matmuls run on ``device`` (default the CPU): the rank's GPU on a GPU node. Returns
    a CPU tensor.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    n_q = queries.shape[0]
    best_val = torch.full((n_q, kc), -float("inf"), dtype=torch.bfloat16, device=device)
    best_idx = torch.zeros((n_q, kc), dtype=torch.int64, device=device)
    q16 = torch.from_numpy(queries).to(device).to(torch.bfloat16)
    for g0 in range(0, db.shape[0], db_block):
        block_t = torch.from_numpy(db[g0:g0 + db_block]).to(device).to(torch.bfloat16).t()
        for q0 in range(0, n_q, chunk):
            q1 = min(q0 + chunk, n_q)
            approx = q16[q0:q1] @ block_t
            val, idx = approx.topk(min(kc, approx.shape[1]), dim=1, sorted=False)
            val = torch.cat([best_val[q0:q1], val], dim=1)
            idx = torch.cat([best_idx[q0:q1], idx + g0], dim=1)
            top = val.topk(kc, dim=1, sorted=False).indices
            best_val[q0:q1] = val.gather(1, top)
            best_idx[q0:q1] = idx.gather(1, top)
    return best_idx.cpu()


def _search_bf16(db: np.ndarray, queries: np.ndarray, k: int, margin: int, chunk: int,
                 db_block: int = 8192, rescore_chunk: int = 64,
                 device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    k_eff = min(k, db.shape[0])
    kc = min(k + margin, db.shape[0])
    with torch.no_grad():
        cand = _bf16_candidates(db, queries, kc, chunk, db_block, device).numpy()
    scores = np.empty((queries.shape[0], k_eff), dtype=np.float32)
    indices = np.empty((queries.shape[0], k_eff), dtype=np.int64)
    for r0 in range(0, queries.shape[0], rescore_chunk):
        r1 = min(r0 + rescore_chunk, queries.shape[0])
        c = cand[r0:r1]
        exact = np.matmul(db[c], queries[r0:r1, :, None])[:, :, 0]
        # Best score first; ties broken by the smaller database index.
        order = np.lexsort((c, -exact), axis=-1)[:, :k_eff]
        scores[r0:r1] = np.take_along_axis(exact, order, axis=1)
        indices[r0:r1] = np.take_along_axis(c, order, axis=1)
    return scores, indices


def search_topk(db: np.ndarray, queries: np.ndarray, k: int, use_gpu: Union[str, bool] = "auto",
                bf16: bool = False, chunk: int = 1024, margin: int | None = None,
                device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Best-first top-``k`` database images for every query by inner product.

    Args:
        db: (G, D) database descriptors, float32, expected L2-normalised.
        queries: (Q, D) query descriptors, same dimension.
        k: neighbours per query; columns beyond the database size hold index -1, score -inf.
        use_gpu: ``"auto"`` (GPU faiss when ``faiss.get_num_gpus() > 0``), True or False.
            Only used by the exact path.
        bf16: bf16 candidate search with exact fp32 re-scoring (see the module docstring:
            identical to exact search except at near-ties) instead of faiss.
        chunk: queries per search call (exact path) or per bf16 matmul (bf16 path, which also
            converts the database to bf16 in blocks of 8192 rows, so its extra memory is
            about ``8192 * (D + chunk) * 2`` bytes).
        margin: extra candidates kept by the bf16 path (default ``max(k, 32)``).
        device: where the bf16 path's matmuls run (default the CPU; the rank's GPU on a GPU node).

    Returns:
        (scores, indices): (Q, k) float32 and (Q, k) int64, best first.
    """
    db = _as_matrix(db, "db")
    queries = _as_matrix(queries, "queries")
    if db.shape[1] != queries.shape[1]:
        raise ValueError(f"dimension mismatch: db has {db.shape[1]}, queries have {queries.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if db.shape[0] == 0:
        raise ValueError("db is empty")
    if bf16:
        margin = max(k, 32) if margin is None else margin
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        scores, indices = _search_bf16(db, queries, k, margin, chunk, device=device)
    else:
        scores, indices = _search_faiss(db, queries, min(k, db.shape[0]), _resolve_gpu(use_gpu, k), chunk)
    return _pad(scores, indices, k)


# ------------------------------------------------------------------ sharded database


def sort_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` entries of highest score, ties by the smaller id; ``id < 0`` is padding.

    Padding (score -inf, id -1) sorts last; rows with fewer than ``k`` entries are padded.
    """
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32, copy=False)
    ids = np.where(ids < 0, -1, ids)
    # Key order: padding last, then score descending, then id ascending.
    order = np.lexsort((ids, -scores, ids < 0), axis=-1)[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return _pad(scores, ids, k)


def merge_topk(parts: Sequence[Tuple[np.ndarray, np.ndarray]], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, global ids)`` of the same queries into one best-first top-``k``.

    Ties are broken by the smaller global id, so the result does not depend on how the
    database is split; missing results (fewer than ``k`` items in all) are padded.
    """
    if not parts:
        raise ValueError("merge_topk: no shard results")
    rows = {p[0].shape[0] for p in parts}
    if len(rows) != 1:
        raise ValueError(f"merge_topk: shards answered different numbers of queries {sorted(rows)}")
    scores = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts], axis=1)
    return sort_topk(scores, ids, k)


def search_shard(db_rows: np.ndarray, global_ids: np.ndarray, queries: np.ndarray, k: int,
                 use_gpu: Union[str, bool] = "auto", bf16: bool = False,
                 chunk: int = 1024, device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``search_topk`` over one shard of the database, answered with global ids.

    ``db_rows[i]`` is database item ``global_ids[i]``. An empty shard answers padding only
    (scores -inf, ids -1).
    """
    global_ids = np.asarray(global_ids, dtype=np.int64).reshape(-1)
    queries = _as_matrix(queries, "queries")
    if global_ids.shape[0] != np.shape(db_rows)[0]:
        raise ValueError(f"{global_ids.shape[0]} global ids for {np.shape(db_rows)[0]} database rows")
    if global_ids.shape[0] == 0:
        return (np.full((queries.shape[0], k), -np.inf, dtype=np.float32),
                np.full((queries.shape[0], k), -1, dtype=np.int64))
    scores, local = search_topk(db_rows, queries, k, use_gpu=use_gpu, bf16=bf16, chunk=chunk, device=device)
    return scores, np.where(local >= 0, global_ids[np.maximum(local, 0)], -1)


def sharded_search_topk(db_rows: np.ndarray, global_ids: np.ndarray, queries: np.ndarray, k: int,
                        use_gpu: Union[str, bool] = "auto", bf16: bool = False,
                        chunk: int = 1024, device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of every query over a database whose rows are spread across the ranks.

    Each rank passes its own rows (``db_rows[i]`` is database item ``global_ids[i]``; the
    ranks' id sets are disjoint) and the same ``queries``; it searches its rows for every
    query (``search_shard``: this rank's GPU where faiss has GPUs, CPU otherwise, or the bf16
    path), the ``(Q, k)`` scores and global ids of all ranks are all-gathered and merged
    (``merge_topk``: ties by the smaller global id). Every rank returns the same
    ``(scores, ids)``. A collective: every rank calls it. Traffic: ``Q * k * 12`` bytes per
    rank; no rank holds more than its own database rows.
    """
    local = search_shard(db_rows, global_ids, queries, k, use_gpu=use_gpu, bf16=bf16, chunk=chunk, device=device)
    return merge_topk(all_gather_object(local), k)
