"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from sparse kNN lists.

Items are the union of training queries and database images (N of them), each an
L2-normalised descriptor ``x_i``. Definitions, those of the reference implementation's
``re_ranking`` (which is fed squared Euclidean distances of unit descriptors and squares
them again), used here and by the dense reference:

- **base distance** ``d(i, j) = (2 - 2 <x_i, x_j>)^2``;
- **row-normalised distance** ``d'(i, j) = d(i, j) / m_i`` with ``m_i = max_j' d(i, j')``
  over all N items, i.e. ``m_i = (2 - 2 min_j' <x_i, x_j'>)^2``: the farthest item of each
  row, a top-1 search on negated descriptors (``knn.self_farthest``), no dense matrix;
- ``N(p, k)``: the first ``k + 1`` entries of ``p``'s neighbour list sorted by ascending
  distance with ties by smaller index (``p`` itself is normally the first); squaring and
  the per-row scale do not change that order, so it is the inner-product kNN list;
- ``R(p, k) = {j in N(p, k) : p in N(j, k)}`` (k-reciprocal set);
- ``R*(p) = R(p, k1)`` united with ``R(c, round(k1 / 2))`` for every ``c in R(p, k1)`` with
  ``|R(c, k1/2) & R(p, k1)| > 2/3 |R(c, k1/2)|`` (strictly more);
- ``V_p[j] = exp(-d'(p, j)) / sum_{j' in R*(p)} exp(-d'(p, j'))`` for ``j in R*(p)``, else 0;
- local query expansion: ``V_p <- mean(V_j for j in the first k2 entries of p's list)``
  (``k2 = 1`` leaves ``V`` unchanged);
- Jaccard distance ``dJ(p, g) = 1 - sum_j min(V_p, V_g) / sum_j max(V_p, V_g)``;
- re-ranked distance ``(1 - lambda) * dJ(p, g) + lambda * d'(p, g)``.

The sparse version needs each item's first ``k1 + 1`` neighbours with inner products
(e.g. from ``knn.self_topk``) and each item's smallest inner product (its farthest item);
distances of expansion members that fall outside ``p``'s list are computed exactly from
the descriptors of just those pairs (``pair_products`` of a descriptor store, so the
descriptors may be sharded across ranks). Only the vectors of the items named in the
requested pairs are built; nothing is N x N dense.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import scipy.sparse as sp

from sfrs_dist.mining.store import as_items


def half_k(k1: int) -> int:
    """The expansion neighbourhood size ``round(k1 / 2)`` (numpy rounding)."""
    return int(np.round(k1 / 2))


def _check_knn(knn_ids: np.ndarray, k: int) -> None:
    if knn_ids.ndim != 2 or knn_ids.shape[1] < k + 1:
        raise ValueError(f"knn_ids must have at least k1 + 1 = {k + 1} columns, got shape {knn_ids.shape}")
    if (knn_ids[:, : k + 1] < 0).any():
        raise ValueError("knn_ids holds padding (-1) among the first k1 + 1 neighbours")


def reciprocal_sets(knn_ids: np.ndarray, k: int) -> sp.csr_matrix:
    """Boolean ``(N, N)`` sparse matrix whose row ``p`` is ``R(p, k)``."""
    n = knn_ids.shape[0]
    cols = knn_ids[:, : k + 1].astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), cols.shape[1])
    a = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols.reshape(-1))), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1
    r = a.multiply(a.T).tocsr()
    r.eliminate_zeros()
    return r


def expanded_reciprocal_sets(knn_ids: np.ndarray, rows: np.ndarray, k1: int) -> sp.csr_matrix:
    """Boolean ``(len(rows), N)`` sparse matrix whose row ``i`` is ``R*(rows[i])``."""
    _check_knn(knn_ids, k1)
    n = knn_ids.shape[0]
    r_full = reciprocal_sets(knn_ids, k1)
    h = reciprocal_sets(knn_ids, half_k(k1))
    rp = r_full[rows]
    pi, c = rp.nonzero()
    hc = h[c]
    size = np.diff(hc.indptr)
    overlap = np.asarray(rp[pi].multiply(hc).sum(axis=1)).reshape(-1)
    accept = 3 * overlap > 2 * size
    sel = sp.csr_matrix((np.ones(int(accept.sum()), dtype=np.int32), (pi[accept], c[accept])),
                        shape=(len(rows), n))
    star = (rp.astype(np.int32) + sel @ h.astype(np.int32)).tocsr()
    star.data[:] = 1
    star.eliminate_zeros()
    star.sort_indices()
    return star


def base_distance(dots: np.ndarray) -> np.ndarray:
    """The reference's base distance ``(2 - 2 <x_i, x_j>)^2`` of unit descriptors (float64)."""
    return np.square(2.0 - 2.0 * np.asarray(dots, dtype=np.float64))


def row_maxima(min_dots: np.ndarray) -> np.ndarray:
    """``m_i = max_j d(i, j)`` from each item's smallest inner product; never 0."""
    return np.maximum(base_distance(min_dots), np.finfo(np.float64).tiny)


def _star_pairs(knn_ids: np.ndarray, rows: np.ndarray, k1: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` for every ``j in R*(rows[i])``, sorted by ``i`` then ``j``."""
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    star = expanded_reciprocal_sets(knn_ids, rows, k1)
    ri, j = star.nonzero()
    return ri.astype(np.int64), j.astype(np.int64)


def _listed_dots(knn_ids: np.ndarray, knn_scores: np.ndarray, p: np.ndarray, j: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Inner products of the pairs ``(p, j)`` found in ``p``'s neighbour list, and which were found."""
    n, width = knn_ids.shape
    dots = np.zeros(len(p), dtype=np.float64)
    if len(p) == 0:
        return dots, np.zeros(0, dtype=bool)
    keys = (np.repeat(np.arange(n, dtype=np.int64), width) * n + knn_ids.reshape(-1)).astype(np.int64)
    order = np.argsort(keys)
    keys, kscores = keys[order], knn_scores.reshape(-1)[order]
    want = p * n + j
    pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    found = keys[pos] == want
    dots[found] = kscores[pos[found]]
    return dots, found


def _kernel_vectors(ri: np.ndarray, j: np.ndarray, p: np.ndarray, dots: np.ndarray, row_max: np.ndarray,
                    n_rows: int, n: int) -> sp.csr_matrix:
    w = np.exp(-base_distance(dots) / row_max[p])
    v = sp.csr_matrix((w, (ri, j)), shape=(n_rows, n))
    sums = np.asarray(v.sum(axis=1)).reshape(-1)
    return sp.diags(1.0 / sums) @ v


def reciprocal_vectors(items, knn_ids: np.ndarray, knn_scores: np.ndarray,
                       rows: np.ndarray, k1: int, row_max: np.ndarray) -> sp.csr_matrix:
    """Gaussian-kernel vectors ``V_p`` (rows sum to 1) of ``rows`` as a ``(len(rows), N)`` CSR.

    ``items``: the descriptors, an ``(N, d)`` matrix or a store (``store.DenseItems``,
    ``store.ShardedItems``); inner products come from the neighbour lists where present,
    else from one ``pair_products`` call (made even when none is missing: a collective for
    the sharded store). ``row_max``: ``m_p`` of every item (``row_maxima``), the per-row
    scale of ``d'``.
    """
    items = as_items(items)
    rows = np.asarray(rows, dtype=np.int64)
    ri, j = _star_pairs(knn_ids, rows, k1)
    p = rows[ri]
    dots, found = _listed_dots(knn_ids, knn_scores, p, j)
    dots[~found] = items.pair_products(p[~found], j[~found])
    return _kernel_vectors(ri, j, p, dots, row_max, len(rows), knn_ids.shape[0])


def query_expansion(v_rows: sp.csr_matrix, row_pos: dict, knn_ids: np.ndarray, rows: np.ndarray,
                    k2: int) -> sp.csr_matrix:
    """``V_p <- mean(V_j, j in the first k2 neighbours of p)`` for each p in ``rows``."""
    if k2 == 1:
        return v_rows[[row_pos[int(r)] for r in rows]]
    nb = knn_ids[rows, :k2]
    idx = np.array([row_pos[int(j)] for j in nb.reshape(-1)], dtype=np.int64)
    gather = sp.csr_matrix((np.full(idx.size, 1.0 / k2), (np.repeat(np.arange(len(rows)), k2), idx)),
                           shape=(len(rows), v_rows.shape[0]))
    return (gather @ v_rows).tocsr()


def jaccard_rows(va: sp.csr_matrix, vb: sp.csr_matrix) -> np.ndarray:
    """Row-wise Jaccard distance ``1 - sum min / sum max`` of two equally shaped sparse matrices."""
    mins = np.asarray(va.minimum(vb).sum(axis=1)).reshape(-1)
    sa = np.asarray(va.sum(axis=1)).reshape(-1)
    sb = np.asarray(vb.sum(axis=1)).reshape(-1)
    return 1.0 - mins / (sa + sb - mins)


def rerank_pair_distances(items, knn_ids: np.ndarray, knn_scores: np.ndarray,
                          min_dots: np.ndarray, a: np.ndarray, b: np.ndarray, k1: int = 20, k2: int = 1,
                          lam: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Re-ranked and original distances of the item pairs ``(a[i], b[i])``.

    Args:
        items: ``(N, d)`` L2-normalised descriptors of all items, or a store of them
            (``store.DenseItems``, ``store.ShardedItems``). Exactly one ``pair_products``
            call is made (the pairs ``(a, b)`` and the expansion pairs missing from the
            lists), also when there are no pairs: with the sharded store every rank calls
            this function, each with its own pairs.
        knn_ids, knn_scores: every item's neighbour list, ``(N, K)`` with ``K >= max(k1 + 1,
            k2)``, sorted by descending inner product (ties by smaller id), self included.
        min_dots: ``(N,)`` every item's smallest inner product over all N items (its
            farthest item, ``knn.self_farthest``); gives the row maxima ``m_i``.
        a, b: item indices of the pairs wanted.

    Returns:
        ``(final, original)``: re-ranked distances and the row-normalised base distances
        ``d'(a, b)``, float64 arrays of ``len(a)``.
    """
    items = as_items(items)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if knn_ids.shape != knn_scores.shape or knn_ids.shape[0] != len(items):
        raise ValueError(f"knn_ids {knn_ids.shape}, knn_scores {knn_scores.shape} and the "
                         f"{len(items)} items do not describe the same items")
    if k2 < 1 or knn_ids.shape[1] < k2:
        raise ValueError(f"k2 must lie in [1, {knn_ids.shape[1]}], got {k2}")
    _check_knn(knn_ids, k1)
    min_dots = np.asarray(min_dots, dtype=np.float64).reshape(-1)
    if min_dots.shape[0] != len(items):
        raise ValueError(f"min_dots has {min_dots.shape[0]} entries for {len(items)} items")
    row_max = row_maxima(min_dots)
    rows = np.unique(np.concatenate([a, b]))
    v_items = rows if k2 == 1 else np.unique(np.concatenate([rows, knn_ids[rows, :k2].reshape(-1)]))
    ri, j = _star_pairs(knn_ids, v_items, k1)
    p = v_items[ri]
    dots, found = _listed_dots(knn_ids, knn_scores, p, j)
    miss = ~found
    vals = items.pair_products(np.concatenate([a, p[miss]]), np.concatenate([b, j[miss]]))
    original = base_distance(vals[: len(a)]) / row_max[a]
    if len(a) == 0:
        return original, original
    dots[miss] = vals[len(a):]
    v = _kernel_vectors(ri, j, p, dots, row_max, len(v_items), knn_ids.shape[0])
    row_pos = {int(r): i for i, r in enumerate(v_items)}
    vq = query_expansion(v, row_pos, knn_ids, rows, k2)
    ia = np.searchsorted(rows, a)
    ib = np.searchsorted(rows, b)
    jac = jaccard_rows(vq[ia], vq[ib])
    return (1.0 - lam) * jac + lam * original, original


def rerank_dense_reference(all_feats: np.ndarray, k1: int = 20, k2: int = 1, lam: float = 0.1) -> np.ndarray:
    """The classic full-matrix re-ranking over all N items; returns the ``(N, N)`` distances.

    The reference's definition (module docstring): dense ``N x N`` base distances
    ``(2 - 2 cos)^2``, each row divided by its maximum, full argsort, a Python loop building
    each k-reciprocal expansion, dense ``V`` and an inverted-index Jaccard pass. Used by
    tests and the benchmark as the reference; memory and time grow as ``N^2``.
    """
    x = np.ascontiguousarray(all_feats, dtype=np.float32)
    n = x.shape[0]
    dots = x @ x.T
    dist = np.square(2.0 - 2.0 * dots.astype(np.float64))
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    # neighbour lists by descending inner product, ties by smaller index (the order of d')
    rank = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -dots), axis=-1)[:, : k1 + 1].astype(np.int32)
    kh = half_k(k1)
    v = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        r = forward[np.any(backward == i, axis=1)]
        expansion = r
        for c in r:
            c_forward = rank[c, : kh + 1]
            c_backward = rank[c_forward, : kh + 1]
            c_r = c_forward[np.any(c_backward == c, axis=1)]
            if 3 * len(np.intersect1d(c_r, r)) > 2 * len(c_r):
                expansion = np.append(expansion, c_r)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = v[rank[i, :k2]].mean(axis=0)
        v = v_qe
    nz_rows, nz_cols = np.nonzero(v)
    by_col = np.argsort(nz_cols, kind="stable")
    col_starts = np.searchsorted(nz_cols[by_col], np.arange(n + 1))
    inv_index = [nz_rows[by_col[col_starts[j]:col_starts[j + 1]]] for j in range(n)]
    jaccard = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        temp_min = np.zeros(n, dtype=np.float64)
        for j in np.nonzero(v[i])[0]:
            imgs = inv_index[j]
            temp_min[imgs] += np.minimum(v[i, j], v[imgs, j])
        jaccard[i] = 1.0 - temp_min / (2.0 - temp_min)
    return (1.0 - lam) * jaccard + lam * dist
