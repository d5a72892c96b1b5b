"""Where the descriptors of a mining refresh live: copied to every rank, or each rank its share.

Items are the N training queries and database images of a refresh, ``[queries; database]``:
training query ``i`` is item ``i``, database image ``j`` is item ``num_queries + j`` (manifest
order). The mining reads descriptors through four operations only, which both stores offer:

- ``pair_products(a, b)``: exact float32 inner products of item pairs, one faiss dot
  product per pair (``knn.pair_inner_products_between``), so a pair gives the same bits in
  either store and on any number of ranks;
- ``knn_graph(k, bf16)``: every item's ``k`` nearest items (self included; descending, ties
  by smaller id) and its farthest score (smallest inner product), the ``KnnGraph`` the
  re-ranking needs; candidates from a search (exact faiss, or bf16 candidates), then
  re-scored with ``pair_products`` and sorted, so the lists do not depend on how the
  search was split;
- ``mean_pair_similarity(rng)``: the collapse check over random pairs;
- ``assign(items)``: which of the given items this rank handles (the mining's split of a
  cache subset's queries).

``DenseItems(feats)`` holds the full ``(N, d)`` matrix (on every rank when distributed):
local pair products, the kNN graph from ``knn.self_topk``/``knn.self_farthest``.

``ShardedItems(ids, rows, n)`` holds only this rank's rows (the items it extracted).
Descriptors never leave their rank except as one block at a time: a *block pass* visits the
ranks in turn, ``t = 0 .. W-1``; rank ``t`` broadcasts its rows chunk by chunk
(``distributed.broadcast_array``: shape, then rows, on the backend's device) and every
rank computes what it needs against the chunk in flight, then drops it. Peak descriptor
memory per rank: its share, ``about N / W x d``, plus one chunk (``block_bytes``) and the
search's working copies of it.

- kNN graph: one pass over every rank's rows; each rank keeps, for its own items, the
  running top ``k + margin`` candidates and bottom ``1 + margin`` candidates (farthest)
  found in the visiting chunks (``knn.block_candidates``), then re-scores them exactly with
  one ``pair_products`` call and all-gathers the lists (``N x k`` ids and scores, ``N``
  farthest scores: small).
- ``pair_products``: a collective. A pair is answered by the rank owning its first item;
  pairs whose first item the caller owns stay local, the others (few, in the mining) are
  all-gathered, as are the sets of rows each rank needs from the others. Each rank ``t``
  then broadcasts only the rows of its share some other rank needs (chunk by chunk), and
  the answers to foreign pairs are all-gathered back. Every rank calls it the same number
  of times, each with its own pairs, possibly none.
"""

from __future__ import annotations

import logging
from typing import Iterator, List, NamedTuple, Optional, Protocol, Tuple, Union

import numpy as np
import torch

from sfrs_dist.distributed import all_gather_object, broadcast_array, get_rank, get_world_size
from sfrs_dist.mining.knn import (
    DEFAULT_MARGIN,
    block_candidates,
    pair_inner_products,
    pair_inner_products_between,
    self_farthest,
    self_topk,
    shard_range,
    sort_topk,
)

log = logging.getLogger(__name__)

#: Bytes of descriptors in one visiting chunk of a block pass.
BLOCK_BYTES = 128 << 20


class KnnGraph(NamedTuple):
    """What the re-ranking needs of all N items: kNN lists and each item's farthest score."""

    scores: np.ndarray
    """``(N, K)`` inner products of each item's K nearest items, descending, self included."""
    ids: np.ndarray
    """``(N, K)`` their item ids (ties by smaller id)."""
    farthest: np.ndarray
    """``(N,)`` each item's smallest inner product over all N items (the row maxima)."""


class ItemStore(Protocol):
    """The descriptor operations the mining uses (``DenseItems``, ``ShardedItems``)."""

    n: int
    dim: int

    def __len__(self) -> int: ...

    def assign(self, items: np.ndarray) -> np.ndarray: ...

    def pair_products(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...

    def knn_graph(self, k: int, bf16: bool = False, margin: int = DEFAULT_MARGIN) -> KnnGraph: ...

    def mean_pair_similarity(self, rng: np.random.Generator, pairs: int = 2000, lo: int = 0,
                             hi: Optional[int] = None) -> float: ...


def _check_pairs(a: np.ndarray, b: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pair_products: {len(a)} first items but {len(b)} second items")
    for name, v in (("a", a), ("b", b)):
        if len(v) and (v.min() < 0 or v.max() >= n):
            raise ValueError(f"pair_products: item ids of {name} fall outside [0, {n})")
    return a, b


def random_pairs(rng: np.random.Generator, lo: int, hi: int, pairs: int) -> Tuple[np.ndarray, np.ndarray]:
    """``pairs`` random pairs of distinct items of ``[lo, hi)`` (the draws of ``tuples.mean_pair_similarity``)."""
    n = hi - lo
    if n < 2:
        raise ValueError(f"mean_pair_similarity needs at least 2 descriptors, got {n}")
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n  # never equal to a
    return lo + a, lo + b


def _mean_similarity(store: "ItemStore", rng: np.random.Generator, pairs: int, lo: int,
                     hi: Optional[int]) -> float:
    hi = store.n if hi is None else hi
    if not 0 <= lo < hi <= store.n:
        raise ValueError(f"mean_pair_similarity: items [{lo}, {hi}) outside [0, {store.n})")
    a, b = random_pairs(rng, lo, hi, pairs)
    return float(store.pair_products(a, b).astype(np.float64).mean())


def _finish_graph(cand: np.ndarray, far_cand: np.ndarray, exact: np.ndarray, k: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` and the farthest score from exactly re-scored candidate lists."""
    kk = cand.shape[1]
    s, i = sort_topk(exact[:, :kk], cand, k)
    far = exact[:, kk:].min(axis=1) if far_cand.shape[1] else np.full(len(cand), np.inf, np.float32)
    return s, i, far


class DenseItems:
    """All N descriptors in one ``(N, d)`` matrix (the same on every rank when distributed)."""

    def __init__(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ValueError(f"DenseItems needs a non-empty (N, d) matrix, got shape {feats.shape}")
        self.feats = np.ascontiguousarray(feats, dtype=np.float32)
        self.n, self.dim = self.feats.shape

    def __len__(self) -> int:
        return self.n

    def assign(self, items: np.ndarray) -> np.ndarray:
        """A contiguous share of ``items`` (by position) for this rank."""
        mask = np.zeros(len(items), dtype=bool)
        start, end = shard_range(len(items), get_rank(), get_world_size())
        mask[start:end] = True
        return mask

    def pair_products(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``feats[a[i]] . feats[b[i]]``, float32, computed locally."""
        a, b = _check_pairs(a, b, self.n)
        return pair_inner_products(self.feats, a, b)

    def knn_graph(self, k: int, bf16: bool = False, margin: int = DEFAULT_MARGIN) -> KnnGraph:
        """``k + margin`` candidates from ``self_topk`` and the farthest from ``self_farthest``
        (work split across ranks), re-scored pair by pair and sorted to the top ``k``."""
        n = self.n
        if not 0 < k <= n:
            raise ValueError(f"k must lie in [1, {n}] for {n} items, got {k}")
        kk = min(n, k + margin)
        _, cand = self_topk(self.feats, kk, bf16=bf16)
        rows = np.repeat(np.arange(n, dtype=np.int64), kk)
        exact = pair_inner_products(self.feats, rows, cand.reshape(-1)).reshape(n, kk)
        scores, ids = sort_topk(exact, cand, k)
        return KnnGraph(scores, ids, self_farthest(self.feats, bf16=bf16, margin=margin))

    def mean_pair_similarity(self, rng: np.random.Generator, pairs: int = 2000, lo: int = 0,
                             hi: Optional[int] = None) -> float:
        """Mean inner product of ``pairs`` random pairs of distinct items of ``[lo, hi)``."""
        return _mean_similarity(self, rng, pairs, lo, hi)


class ShardedItems:
    """This rank's share of the N items: ``ids`` (sorted global ids) and their ``rows``.

    Constructing it is a collective: the ranks exchange their id lists (``N`` integers in
    all) and check that every item of ``[0, n)`` is held by exactly one rank. ``device``: where
    the bf16 candidate search of ``knn_graph`` runs (default the CPU; the rank's GPU).
    """

    def __init__(self, ids: np.ndarray, rows: np.ndarray, n: int, block_bytes: int = BLOCK_BYTES,
                 device: Optional[torch.device] = None) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != len(ids):
            raise ValueError(f"ShardedItems: {len(ids)} ids but rows of shape {rows.shape}")
        if len(ids) > 1 and (np.diff(ids) <= 0).any():
            order = np.argsort(ids, kind="stable")
            ids, rows = ids[order], rows[order]
        self.ids = ids
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.n = int(n)
        self.rank, self.world = get_rank(), get_world_size()
        parts = all_gather_object((ids, rows.shape[1] if len(ids) else -1))
        dims = sorted({d for _, d in parts if d >= 0})
        if len(dims) != 1:
            raise ValueError(f"ShardedItems: ranks hold descriptors of dimensions {dims or 'none'}")
        self.dim = dims[0]
        if not len(ids):
            self.rows = self.rows.reshape(0, self.dim)
        self.ids_of: List[np.ndarray] = [p[0] for p in parts]
        every = np.concatenate(self.ids_of)
        if len(every) and (every.min() < 0 or every.max() >= self.n):
            raise ValueError(f"ShardedItems: item ids outside [0, {self.n})")
        count = np.bincount(every, minlength=self.n)
        if (count != 1).any():
            missing, twice = np.flatnonzero(count == 0), np.flatnonzero(count > 1)
            raise ValueError(f"ShardedItems: {len(missing)} item(s) held by no rank (e.g. {missing[:5].tolist()}), "
                             f"{len(twice)} by more than one (e.g. {twice[:5].tolist()})")
        self.owner = np.empty(self.n, dtype=np.int32)
        self.pos = np.empty(self.n, dtype=np.int64)
        for r, rid in enumerate(self.ids_of):
            self.owner[rid] = r
            self.pos[rid] = np.arange(len(rid))
        self.chunk_rows = max(1, int(block_bytes) // (4 * self.dim))
        self.device = device

    def __len__(self) -> int:
        return self.n

    def assign(self, items: np.ndarray) -> np.ndarray:
        """The items this rank holds."""
        return self.owner[np.asarray(items, dtype=np.int64)] == self.rank

    # ------------------------------------------------------------ block pass
    def _visit(self, wanted: Optional[List[np.ndarray]] = None) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """Every rank's rows in turn, chunk by chunk, on every rank: ``(t, positions, rows)``.

        ``wanted[t]``: sorted positions in rank ``t``'s share to send (``None``: all of them);
        the same on every rank. The chunk in flight is the only foreign copy held.
        """
        for t in range(self.world):
            count = len(self.ids_of[t]) if wanted is None else len(wanted[t])
            for c0 in range(0, count, self.chunk_rows):
                c1 = min(count, c0 + self.chunk_rows)
                sel = np.arange(c0, c1) if wanted is None else wanted[t][c0:c1]
                src = None
                if t == self.rank:
                    src = self.rows[c0:c1] if wanted is None else self.rows[sel]
                yield t, sel, broadcast_array(src, src=t)

    def pair_products(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``x[a[i]] . x[b[i]]`` for this rank's pairs (float32). A collective: every rank calls it.

        Pairs are answered by the owner of ``a[i]`` with ``b[i]``'s row from a block pass that
        sends only the rows some other rank needs.
        """
        a, b = _check_pairs(a, b, self.n)
        me, world = self.rank, self.world
        local = self.owner[a] == me
        la, lb = a[local], b[local]
        need = np.unique(lb[self.owner[lb] != me])
        gathered = all_gather_object((a[~local], b[~local], need))
        # what every rank answers: its local pairs (known to it) and the foreign pairs of
        # others whose first item it owns (known to all, in source-rank order)
        foreign_to: List[List[Tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(world)]
        for fa, fb, _ in gathered:
            who = self.owner[fa]
            for r in range(world):
                sel = who == r
                foreign_to[r].append((fa[sel], fb[sel]))
        # the rows each rank r needs from the others: second items of the pairs it answers
        needs = [np.concatenate([gathered[r][2]] + [p[1] for p in foreign_to[r]]) for r in range(world)]
        wanted = []
        for t in range(world):
            from_t = [v[self.owner[v] == t] for r, v in enumerate(needs) if r != t]
            wanted.append(np.unique(self.pos[np.concatenate(from_t)]) if from_t else np.zeros(0, np.int64))
        task_a = np.concatenate([la] + [p[0] for p in foreign_to[me]])
        task_b = np.concatenate([lb] + [p[1] for p in foreign_to[me]])
        values = np.empty(len(task_a), dtype=np.float32)
        pa = self.pos[task_a]
        t_of = self.owner[task_b]
        pb = self.pos[task_b]
        own = t_of == me
        values[own] = pair_inner_products_between(self.rows, self.rows, pa[own], pb[own])
        # tasks by (rank, chunk of that rank's wanted rows)
        chunk_of = np.full(len(task_b), -1, dtype=np.int64)
        slot = np.full(len(task_b), -1, dtype=np.int64)
        for t in range(world):
            if t == me:
                continue
            sel = np.flatnonzero(t_of == t)
            idx = np.searchsorted(wanted[t], pb[sel])
            chunk_of[sel] = idx // self.chunk_rows
            slot[sel] = idx % self.chunk_rows
        chunk_no = {t: 0 for t in range(world)}
        for t, _, block in self._visit(wanted):
            c = chunk_no[t]
            chunk_no[t] += 1
            if t == me:
                continue
            sel = np.flatnonzero((t_of == t) & (chunk_of == c))
            if len(sel):
                values[sel] = pair_inner_products_between(self.rows, block, pa[sel], slot[sel])
            del block
        out = np.empty(len(a), dtype=np.float32)
        out[local] = values[: len(la)]
        if sum(len(g[0]) for g in gathered):
            answers = all_gather_object(values[len(la):])
            mine_f = np.flatnonzero(~local)
            who = self.owner[a[mine_f]]
            for r in range(world):
                sel = who == r
                if not sel.any():
                    continue
                offset = sum(len(foreign_to[r][s][0]) for s in range(me))
                out[mine_f[sel]] = answers[r][offset: offset + int(sel.sum())]
        return out

    def knn_graph(self, k: int, bf16: bool = False, margin: int = DEFAULT_MARGIN) -> KnnGraph:
        """kNN lists and farthest scores of all N items from one block pass. A collective.

        Each rank searches its own items against every visiting chunk (``knn.block_candidates``),
        keeping ``k + margin`` candidates (``k + 2 margin`` with bf16) and ``1 + margin``
        farthest candidates per item, re-scores them exactly (``pair_products``) and the lists
        are all-gathered.

        With bf16 the candidates of different chunks are compared by approximate scores whose
        error grows with the distance to the cut estimate of the moment (``_offset_scores``),
        poor in the first chunks of the pass (about 1e-3 near 0.45), hence the deeper list:
        the depth of ``DenseItems`` (``self_topk``'s own margin on top of the store's).
        """
        n = self.n
        if not 0 < k <= n:
            raise ValueError(f"k must lie in [1, {n}] for {n} items, got {k}")
        kk, fm = min(n, k + (2 * margin if bf16 else margin)), min(n, 1 + margin)
        x, m = self.rows, len(self.ids)
        top_s = np.zeros((m, 0), np.float32)
        top_i = np.zeros((m, 0), np.int64)
        far_s, far_i = top_s.copy(), top_i.copy()
        for t, sel, block in self._visit():
            if m == 0:
                continue
            gids = self.ids_of[t][sel]
            floor = top_s[:, -1] if bf16 and top_s.shape[1] else None
            s, i = block_candidates(block, x, kk, bf16, floor, self.device)
            top_s, top_i = _merge(top_s, top_i, s, i, gids, kk)
            floor = far_s[:, -1] if bf16 and far_s.shape[1] else None
            s, i = block_candidates(-block, x, fm, bf16, floor, self.device)
            far_s, far_i = _merge(far_s, far_i, s, i, gids, fm)
            del block
        cand = np.concatenate([top_i, far_i], axis=1)
        exact = self.pair_products(np.repeat(self.ids, cand.shape[1]), cand.reshape(-1)).reshape(cand.shape)
        s, i, far = _finish_graph(top_i, far_i, exact, k)
        parts = all_gather_object((self.ids, s, i, far))
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        farthest = np.empty(n, dtype=np.float32)
        for rid, ps, pi, pf in parts:
            if len(rid):
                scores[rid], ids[rid], farthest[rid] = ps, pi, pf
        return KnnGraph(scores, ids, farthest)

    def mean_pair_similarity(self, rng: np.random.Generator, pairs: int = 2000, lo: int = 0,
                             hi: Optional[int] = None) -> float:
        """Mean inner product of ``pairs`` random pairs of distinct items of ``[lo, hi)``.

        A collective; ``rng`` must be in the same state on every rank (every rank asks for
        the same pairs and gets the same value).
        """
        return _mean_similarity(self, rng, pairs, lo, hi)


def _merge(run_s: np.ndarray, run_i: np.ndarray, s: np.ndarray, local_i: np.ndarray, gids: np.ndarray,
           k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge a chunk's candidates (local ids into ``gids``) into the running lists (ties by id)."""
    g = np.where(local_i >= 0, gids[np.maximum(local_i, 0)], -1)
    merged_s, merged_i = sort_topk(np.concatenate([run_s, s], 1), np.concatenate([run_i, g], 1), k)
    return merged_s, merged_i


def as_items(items: Union[np.ndarray, "ItemStore"]) -> "ItemStore":
    """A store for ``items``: an ``(N, d)`` matrix becomes ``DenseItems``; stores pass through."""
    if isinstance(items, (DenseItems, ShardedItems)) or hasattr(items, "pair_products"):
        return items
    return DenseItems(items)
