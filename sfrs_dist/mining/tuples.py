"""Training-tuple selection for one cache subset (DESIGN.md section 2).

Indexing: items are ordered ``[training queries (num_queries); database images (G)]``;
database image ``j`` is item ``num_queries + j``. Their descriptors live in a store
(``store.DenseItems``: one ``(N, d)`` matrix, on every rank; ``store.ShardedItems``: each
rank its share), which gives the kNN graph and pair products. Tuples name queries by
training-query index and everything else by database index. Ground truth comes from the
caller: ``train_pos[q]`` the database ids within 10 m of query ``q``, and a sampler of true
negatives (beyond 25 m).

Every score is an exact float32 inner product of L2-normalised descriptors (larger = nearer)
computed only for the pairs needed (a query against its training positives and its ~1010
negative candidates, one faiss dot product per pair), never a query x database matrix.
Orders break ties by smaller id. The tuples are the same for either store and any number
of ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from sfrs_dist.config import MiningConfig
from sfrs_dist.distributed import all_gather_object
from sfrs_dist.mining.rerank import rerank_pair_distances
from sfrs_dist.mining.store import ItemStore, KnnGraph, as_items
from sfrs_dist.precision import search_bf16

log = logging.getLogger(__name__)

NegPoolFn = Callable[[int, np.random.Generator, int], np.ndarray]
"""``fn(query, rng, size)`` -> up to ``size`` distinct true-negative database ids of ``query``."""

Items = Union[np.ndarray, ItemStore]
"""An ``(N, d)`` descriptor matrix (wrapped in ``DenseItems``) or a descriptor store."""


def build_knn_graph(items: Items, cfg: MiningConfig) -> KnnGraph:
    """kNN lists (``max(k1 + 1, k2)`` columns) and farthest scores, computed across ranks."""
    bf16 = search_bf16(cfg.bf16_search)  # 'auto' when the caller did not resolve the config
    return as_items(items).knn_graph(max(cfg.k1 + 1, cfg.k2), bf16=bf16)


@dataclass(frozen=True)
class TrainingTuple:
    """One mined tuple: ids are a training-query index and database indices."""

    query: int
    positive: int
    negatives: np.ndarray
    difficult_positives: np.ndarray


@dataclass
class MiningTimings:
    """Seconds spent in one refresh."""

    search_s: float = 0.0
    rerank_s: float = 0.0
    select_s: float = 0.0


@dataclass
class MiningResult:
    tuples: List[TrainingTuple]
    timings: MiningTimings = field(default_factory=MiningTimings)


class NegativeCache:
    """The hard negatives each training query got at its previous refresh (``-1`` = none)."""

    def __init__(self, num_queries: int, num_negatives: int) -> None:
        if num_queries < 0 or num_negatives <= 0:
            raise ValueError(f"bad NegativeCache shape ({num_queries}, {num_negatives})")
        self.ids = np.full((num_queries, num_negatives), -1, dtype=np.int64)

    def get(self, query: int) -> np.ndarray:
        row = self.ids[query]
        return row[row >= 0]

    def update(self, query: int, negatives: np.ndarray) -> None:
        negatives = np.asarray(negatives, dtype=np.int64)[: self.ids.shape[1]]
        self.ids[query] = -1
        self.ids[query, : len(negatives)] = negatives

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"ids": self.ids.copy()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, np.ndarray]) -> "NegativeCache":
        if "ids" not in state:
            raise KeyError("NegativeCache state has no key 'ids'")
        ids = np.asarray(state["ids"])
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"NegativeCache state 'ids' must be a 2-d integer array, got {ids.dtype} {ids.shape}")
        cache = cls(ids.shape[0], ids.shape[1])
        cache.ids[:] = ids
        return cache


def make_negative_sampler(num_db: int, non_negatives: Sequence[np.ndarray]) -> NegPoolFn:
    """Sampler of true negatives: database ids not in ``non_negatives[q]`` (those within 25 m).

    Draws uniformly without replacement from the complement by rejection, so no per-query
    list of ~G negatives is stored.
    """
    sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in non_negatives]

    def sample(query: int, rng: np.random.Generator, size: int) -> np.ndarray:
        excluded = sets[query]
        available = num_db - len(excluded)
        size = min(size, available)
        if size <= 0:
            return np.zeros(0, dtype=np.int64)
        if 4 * size > available:
            mask = np.ones(num_db, dtype=bool)
            mask[excluded] = False
            return rng.choice(np.flatnonzero(mask), size, replace=False)
        out = np.zeros(0, dtype=np.int64)
        while len(out) < size:
            draw = rng.integers(0, num_db, 2 * (size - len(out)) + 16)
            draw = draw[~np.isin(draw, excluded)]
            out = np.concatenate([out, draw[~np.isin(draw, out)]])
            _, first = np.unique(out, return_index=True)
            out = out[np.sort(first)]
        return out[:size]

    return sample


#: Mean cosine similarity between random images above which descriptors count as collapsed.
COLLAPSE_SIMILARITY = 0.95


def mean_pair_similarity(feats: np.ndarray, rng: np.random.Generator, pairs: int = 2000) -> float:
    """Mean inner product of ``pairs`` random pairs of distinct rows of ``feats`` (L2-normalised).

    A health check of the descriptor space: a few tenths for a working network, close to 1
    when every image maps to nearly the same descriptor (a collapsed network).
    """
    n = len(feats)
    if n < 2:
        raise ValueError(f"mean_pair_similarity needs at least 2 descriptors, got {n}")
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n  # never equal to a
    return float(np.einsum("ij,ij->i", feats[a].astype(np.float32), feats[b].astype(np.float32)).mean())


def _order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions sorting by descending score, ties by smaller id."""
    return np.lexsort((ids, -scores))


def select_easiest_positive(pos_ids: np.ndarray, pos_scores: np.ndarray) -> int:
    """p1: the training positive with the highest inner product to the query."""
    if len(pos_ids) == 0:
        raise ValueError("select_easiest_positive: the query has no training positive")
    return int(pos_ids[_order(pos_ids, pos_scores)[0]])


def nearest_ids(ids: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` ids of highest score (nearest first)."""
    return np.asarray(ids, dtype=np.int64)[_order(ids, scores)[:n]]


def negative_candidates(pool: np.ndarray, cached: np.ndarray) -> np.ndarray:
    """Random pool united with the previous hard negatives (distinct ids)."""
    return np.unique(np.concatenate([np.asarray(pool, np.int64), np.asarray(cached, np.int64)]))


def select_hard_negatives(cand_ids: np.ndarray, cand_scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` candidates nearest to the query (highest inner product first)."""
    if len(cand_ids) < n:
        raise ValueError(f"select_hard_negatives: {len(cand_ids)} candidates for {n} negatives")
    return nearest_ids(cand_ids, cand_scores, n)


def select_difficult_positives(cand_ids: np.ndarray, reranked: np.ndarray, max_keep: int) -> np.ndarray:
    """Difficult positives from the nearest training positives and their re-ranked distances.

    ``cand_ids`` are ordered nearest first in descriptor space (old rank = position).
    New ranks sort by ascending re-ranked distance (ties: old rank). Kept first: those
    whose rank rose, by largest rise (ties: new rank); then those whose rank did not
    change, by rank; at most ``max_keep``. Those whose rank fell are left out.
    """
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    m = len(cand_ids)
    old = np.arange(m)
    new = np.empty(m, dtype=np.int64)
    new[np.lexsort((old, np.asarray(reranked, dtype=np.float64)))] = old
    rise = old - new
    up = np.flatnonzero(rise > 0)
    up = up[np.lexsort((new[up], -rise[up]))]
    same = np.flatnonzero(rise == 0)
    return cand_ids[np.concatenate([up, same])[:max_keep]]


def _select_share(query_ids: np.ndarray, items: ItemStore, num_queries: int, train_pos: Sequence[np.ndarray],
                  neg_cands: List[np.ndarray], knn: Optional[KnnGraph],
                  generation: int, cfg: MiningConfig, timings: MiningTimings) -> List[TrainingTuple]:
    """Tuples of this rank's queries. Collective calls (``pair_products``): one for the
    candidate scores, one in the re-ranking from generation 1 on, whatever the share."""
    t0 = time.perf_counter()
    q_rows = np.asarray(query_ids, dtype=np.int64)
    pos = [np.asarray(train_pos[q], dtype=np.int64) for q in query_ids]
    cands = pos + list(neg_cands)
    lens = np.array([len(c) for c in cands], dtype=np.int64)
    flat = np.concatenate(cands).astype(np.int64) if cands else np.zeros(0, np.int64)
    scores = items.pair_products(np.repeat(np.concatenate([q_rows, q_rows]), lens), flat + num_queries)
    parts = np.split(scores, np.cumsum(lens)[:-1]) if len(lens) else []
    pos_scores, neg_scores = parts[: len(pos)], parts[len(pos):]
    timings.search_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    near = [nearest_ids(p, s, cfg.difficult_candidates) for p, s in zip(pos, pos_scores)]
    reranked: List[np.ndarray] = [np.zeros(0)] * len(query_ids)
    if generation >= 1:
        assert knn is not None
        counts = [len(n) for n in near]
        a = np.repeat(q_rows, counts)
        b = np.concatenate(near) + num_queries if near else np.zeros(0, np.int64)
        final, _ = rerank_pair_distances(items, knn.ids, knn.scores, knn.farthest, a, b, cfg.k1, cfg.k2,
                                         cfg.lam)
        reranked = np.split(final, np.cumsum(counts)[:-1]) if near else []
    timings.rerank_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    out = []
    for i, q in enumerate(query_ids):
        difficult = (select_difficult_positives(near[i], reranked[i], cfg.num_difficult)
                     if generation >= 1 else np.zeros(0, dtype=np.int64))
        out.append(TrainingTuple(
            query=int(q),
            positive=select_easiest_positive(pos[i], pos_scores[i]),
            negatives=select_hard_negatives(neg_cands[i], neg_scores[i], cfg.num_negatives),
            difficult_positives=difficult,
        ))
    timings.select_s += time.perf_counter() - t0
    return out


def mine_subset(query_ids: Sequence[int], items: Items, num_queries: int,
                train_pos: Sequence[np.ndarray], neg_pool_fn: NegPoolFn, neg_cache: NegativeCache,
                generation: int, rng: np.random.Generator, cfg: MiningConfig,
                knn: Optional[KnnGraph] = None) -> MiningResult:
    """Mine the tuples of one cache subset; called once before training on that subset.

    Args:
        query_ids: training-query indices of the subset; queries without a training
            positive are skipped.
        items: descriptors of the ``num_queries + G`` items ``[queries; database]``
            (L2-normalised): an ``(N, d)`` matrix, the same on every rank, or a store
            (``store.DenseItems``, ``store.ShardedItems``: each rank its share).
        train_pos: per training query, database ids within 10 m.
        neg_pool_fn: true-negative sampler (``make_negative_sampler``).
        neg_cache: previous hard negatives per query; updated in place with the new ones.
        generation: re-ranked difficult positives are mined from generation 1 on.
        rng: draws the random negative pools; must be in the same state on every rank.
        cfg: sizes (pool, negatives, difficult candidates/kept, k1, k2, lambda, bf16 search).
        knn: optional precomputed ``KnnGraph`` of the items (``k1 + 1`` columns or more);
            computed with ``build_knn_graph`` when needed.

    Returns:
        The tuples (same list on every rank, in ``query_ids`` order) and timings.
        Distributed: the kNN graph is built across ranks; each rank then scores and
        selects the subset's queries the store assigns it (``assign``: a contiguous share
        for a matrix, the queries it holds for a sharded store) and the tuples are
        all-gathered. Every rank must call it (collectives).
    """
    items = as_items(items)
    if not 0 < num_queries <= len(items):
        raise ValueError(f"{len(items)} items cannot hold {num_queries} queries followed by a database")
    timings = MiningTimings()
    ids = np.asarray(query_ids, dtype=np.int64)
    keep = np.array([len(train_pos[q]) > 0 for q in ids], dtype=bool)
    if not keep.all():
        log.info("mining: %d queries of the subset have no training positive and are skipped", (~keep).sum())
    ids = ids[keep]
    num_db = len(items) - num_queries
    neg_cands = [negative_candidates(neg_pool_fn(int(q), rng, cfg.neg_pool), neg_cache.get(int(q))) for q in ids]
    for q, c in zip(ids, neg_cands):
        if len(c) and (c.min() < 0 or c.max() >= num_db):
            raise ValueError(f"negative candidates of query {q} fall outside the database [0, {num_db})")

    if generation >= 1 and knn is None:
        t0 = time.perf_counter()
        knn = build_knn_graph(items, cfg)
        timings.search_s += time.perf_counter() - t0

    where = np.flatnonzero(items.assign(ids))
    mine = _select_share(ids[where], items, num_queries, train_pos, [neg_cands[i] for i in where], knn,
                         generation, cfg, timings)
    tuples: List[Optional[TrainingTuple]] = [None] * len(ids)
    for positions, part in all_gather_object((where, mine)):
        for i, t in zip(positions, part):
            tuples[i] = t
    if any(t is None for t in tuples):
        raise RuntimeError("mining: some queries of the subset were mined by no rank")
    for t in tuples:
        neg_cache.update(t.query, t.negatives)
    return MiningResult(tuples=tuples, timings=timings)
