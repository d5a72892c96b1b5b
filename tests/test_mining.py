"""Re-ranking and tuple selection against dense reference computations."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest

from sfrs_dist.config import MiningConfig
from sfrs_dist.mining.knn import self_farthest, self_topk
from sfrs_dist.mining.rerank import half_k, reciprocal_sets, rerank_dense_reference, rerank_pair_distances
from sfrs_dist.mining.tuples import (
    COLLAPSE_SIMILARITY,
    NegativeCache,
    TrainingTuple,
    make_negative_sampler,
    mean_pair_similarity,
    mine_subset,
    select_difficult_positives,
)


def clustered(n_places: int, per_place: int, dim: int, noise: float, seed: int):
    """L2-normalised descriptors around place centres, and the place of each item."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_places, dim))
    place = np.repeat(np.arange(n_places), per_place)
    x = centres[place] + noise * np.sqrt(dim / 32) * rng.standard_normal((len(place), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), place


# ---------------------------------------------------------------- re-ranking

def test_reciprocal_sets_follow_the_definition():
    x, _ = clustered(10, 8, 16, 0.8, seed=1)
    _, ids = self_topk(x, 6)
    for k in (5, half_k(5)):
        r = reciprocal_sets(ids, k).tolil()
        for p in range(len(x)):
            expect = {int(j) for j in ids[p, : k + 1] if p in set(ids[j, : k + 1].tolist())}
            assert set(r.rows[p]) == expect


@pytest.mark.parametrize("k2", [1, 3])
def test_sparse_rerank_equals_dense_reference(k2):
    x, _ = clustered(30, 10, 32, 0.7, seed=2)  # 300 items
    n = len(x)
    scores, ids = self_topk(x, 21)
    rng = np.random.default_rng(0)
    # the pairs mining needs (items and their near neighbours) plus random far pairs
    a = np.concatenate([np.repeat(np.arange(n), 20), rng.integers(0, n, 300)])
    b = np.concatenate([ids[:, 1:21].reshape(-1), rng.integers(0, n, 300)])
    farthest = self_farthest(x)
    np.testing.assert_allclose(farthest, (x @ x.T).min(1), atol=1e-6)
    final, original = rerank_pair_distances(x, ids, scores, farthest, a, b, k1=20, k2=k2, lam=0.1)
    dense = rerank_dense_reference(x, k1=20, k2=k2, lam=0.1)
    np.testing.assert_allclose(final, dense[a, b], atol=2e-6)
    base = (2 - 2 * (x.astype(np.float64) @ x.T)) ** 2
    np.testing.assert_allclose(original, base[a, b] / base[a].max(1), atol=1e-5)
    jaccard = (final - 0.1 * original) / 0.9
    assert (jaccard < 0.9).mean() > 0.3  # the neighbour pairs really share reciprocal sets
    assert (jaccard > 0.999).any()


def transcribed_difficult_positives(x: np.ndarray, nq: int, train_pos, k1=20, lam=0.1, n_cand=20, keep=10,
                                    reference=True):
    """The re-ranking and the rank-rise rule written out from their description, item by item.

    ``reference``: base distance (2 - 2 cos)^2 divided by each row's maximum, expansion when the
    overlap is strictly more than 2/3; otherwise the plain distance 2 - 2 cos and >= 2/3.
    """
    n = len(x)
    cos = x.astype(np.float64) @ x.astype(np.float64).T
    dist = (2 - 2 * cos) ** 2 if reference else 2 - 2 * cos
    if reference:
        dist = dist / dist.max(axis=1, keepdims=True)
    lists = [sorted(range(n), key=lambda j, i=i: (-cos[i, j], j)) for i in range(n)]

    def recip(p, k):
        return {j for j in lists[p][: k + 1] if p in lists[j][: k + 1]}

    kh = int(np.round(k1 / 2))
    vec = {}

    def v_of(p):
        if p not in vec:
            r = recip(p, k1)
            star = set(r)
            for c in r:
                rc = recip(c, kh)
                overlap = len(rc & r)
                if (3 * overlap > 2 * len(rc)) if reference else (3 * overlap >= 2 * len(rc)):
                    star |= rc
            w = {j: np.exp(-dist[p, j]) for j in star}
            z = sum(w.values())
            vec[p] = {j: v / z for j, v in w.items()}
        return vec[p]

    out = []
    for q in range(nq):
        cands = sorted(train_pos[q], key=lambda g: (-cos[q, nq + g], g))[:n_cand]
        vq = v_of(q)
        final = []
        for g in cands:
            vg = v_of(nq + g)
            keys = set(vq) | set(vg)
            mins = sum(min(vq.get(j, 0.0), vg.get(j, 0.0)) for j in keys)
            maxs = sum(max(vq.get(j, 0.0), vg.get(j, 0.0)) for j in keys)
            final.append((1 - lam) * (1 - mins / maxs) + lam * dist[q, nq + g])
        new_rank = {g: r for r, g in enumerate(sorted(cands, key=lambda g: (final[cands.index(g)], cands.index(g))))}
        rises = [(cands.index(g) - new_rank[g], g) for g in cands]
        up = sorted([(-rise, new_rank[g], g) for rise, g in rises if rise > 0])
        same = sorted([(new_rank[g], g) for rise, g in rises if rise == 0])
        out.append([g for *_, g in up] + [g for _, g in same])
        out[-1] = out[-1][:keep]
    return out


def test_sparse_difficult_positives_equal_a_dense_transcription():
    """240 queries and 960 database images in clusters: identical difficult-positive lists."""
    rng = np.random.default_rng(7)
    n_places, dim = 60, 32
    centres = rng.standard_normal((n_places, dim))
    db_place = np.repeat(np.arange(n_places), 16)
    q_place = np.repeat(np.arange(n_places), 4)
    x = np.concatenate([centres[q_place], centres[db_place]])
    x = x + 0.9 * rng.standard_normal(x.shape)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    nq = len(q_place)
    # training positives: the views of the query's place and of the next place
    train_pos = [np.flatnonzero((db_place == p) | (db_place == (p + 1) % n_places)) for p in q_place]
    cfg = MiningConfig(neg_pool=50, num_negatives=5)
    sample = make_negative_sampler(len(db_place), train_pos)
    res = mine_subset(np.arange(nq), x, nq, train_pos, sample, NegativeCache(nq, 5), 1,
                      np.random.default_rng(0), cfg)
    sparse = [t.difficult_positives.tolist() for t in res.tuples]
    expect = transcribed_difficult_positives(x, nq, train_pos)
    assert sparse == expect
    # the lists are not just the nearest positives, and the old definition would differ
    nearest = [sorted(p, key=lambda g: -float(x[q] @ x[nq + g]))[:10] for q, p in enumerate(train_pos)]
    assert sum(s != n for s, n in zip(sparse, nearest)) > nq // 2
    plain = transcribed_difficult_positives(x, nq, train_pos, reference=False)
    assert sum(s != p for s, p in zip(sparse, plain)) > nq // 10


def test_rerank_rejects_short_knn_lists():
    x, _ = clustered(5, 6, 8, 0.5, seed=3)
    scores, ids = self_topk(x, 5)
    with pytest.raises(ValueError, match="k1 \\+ 1"):
        rerank_pair_distances(x, ids, scores, self_farthest(x), np.array([0]), np.array([1]), k1=20)


# ---------------------------------------------------------------- selection rules

def test_difficult_positives_rule():
    cand = np.array([10, 11, 12, 13, 14, 15])       # old ranks 0..5
    reranked = np.array([0.5, 0.2, 0.6, 0.1, 0.9, 0.55])
    # new order: 13 (0), 11 (1), 10 (2), 15 (3), 12 (4), 14 (5)
    # rises: 10: -2, 11: 0, 12: -2, 13: +3, 14: -1, 15: +2
    np.testing.assert_array_equal(select_difficult_positives(cand, reranked, 10), [13, 15, 11])
    np.testing.assert_array_equal(select_difficult_positives(cand, reranked, 2), [13, 15])
    # nothing moves: all kept in order up to the limit
    np.testing.assert_array_equal(select_difficult_positives(cand, np.arange(6.0), 4), [10, 11, 12, 13])


def test_negative_cache_round_trip_and_errors():
    cache = NegativeCache(4, 3)
    cache.update(2, np.array([7, 8, 9]))
    cache.update(1, np.array([5]))
    again = NegativeCache.from_state_dict(cache.state_dict())
    np.testing.assert_array_equal(again.get(2), [7, 8, 9])
    np.testing.assert_array_equal(again.get(1), [5])
    assert len(again.get(0)) == 0
    with pytest.raises(KeyError, match="ids"):
        NegativeCache.from_state_dict({})
    with pytest.raises(ValueError, match="integer"):
        NegativeCache.from_state_dict({"ids": np.zeros((2, 3), np.float32)})


@pytest.mark.parametrize("size", [5, 150])  # rejection sampling and the dense fallback
def test_negative_sampler_draws_distinct_true_negatives(size):
    excluded = [np.arange(0, 40), np.array([3, 5])]
    sample = make_negative_sampler(200, excluded)
    rng = np.random.default_rng(0)
    for q in (0, 1):
        s = sample(q, rng, size)
        assert len(s) == min(size, 200 - len(excluded[q]))
        assert len(np.unique(s)) == len(s)
        assert not np.isin(s, excluded[q]).any() and s.min() >= 0 and s.max() < 200


# ---------------------------------------------------------------- whole refresh vs the dense pattern

def synthetic_city(seed: int = 0, dim: int = 32):
    """Places on a line 30 m apart; database views and queries around them."""
    rng = np.random.default_rng(seed)
    n_places, per_place, n_q = 25, 10, 70
    centres = rng.standard_normal((n_places, dim))
    db_place = np.repeat(np.arange(n_places), per_place)
    q_place = rng.integers(0, n_places, n_q)
    db_utm = db_place * 30.0 + rng.uniform(-2, 2, len(db_place))
    q_utm = q_place * 30.0 + rng.uniform(-14, 14, n_q)
    feats = np.concatenate([centres[q_place], centres[db_place]]) + 0.8 * rng.standard_normal((n_q + len(db_place), dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dist = np.abs(q_utm[:, None] - db_utm[None, :])
    train_pos = [np.flatnonzero(d < 10) for d in dist]
    non_neg = [np.flatnonzero(d < 25) for d in dist]
    return feats.astype(np.float32), n_q, train_pos, non_neg


def dense_pattern(query_ids, feats, nq, train_pos, pool_fn, cache: NegativeCache, generation, rng,
                  cfg: MiningConfig) -> List[TrainingTuple]:
    """The reference way: dense query x database distances, full argsort, row scans."""
    db = feats[nq:]
    dist = 2 - 2 * feats[:nq].astype(np.float64) @ db.T.astype(np.float64)
    order = np.argsort(dist, axis=1, kind="stable")
    rr = rerank_dense_reference(feats, cfg.k1, cfg.k2, cfg.lam) if generation >= 1 else None
    out = []
    queries = [q for q in query_ids if len(train_pos[q])]
    pools = [pool_fn(q, rng, cfg.neg_pool) for q in queries]
    for q, pool in zip(queries, pools):
        pos_sorted = [j for j in order[q] if j in set(train_pos[q].tolist())]
        cands = set(pool.tolist()) | set(cache.get(q).tolist())
        negs = [j for j in order[q] if j in cands][: cfg.num_negatives]
        near = np.array(pos_sorted[: cfg.difficult_candidates])
        difficult = np.zeros(0, np.int64)
        if generation >= 1:
            difficult = select_difficult_positives(near, rr[q, nq + near], cfg.num_difficult)
        out.append(TrainingTuple(q, int(pos_sorted[0]), np.array(negs), difficult))
    for t in out:
        cache.update(t.query, t.negatives)
    return out


def assert_same_tuples(a: List[TrainingTuple], b: List[TrainingTuple]) -> None:
    assert [t.query for t in a] == [t.query for t in b]
    for x, y in zip(a, b):
        assert x.positive == y.positive, x.query
        np.testing.assert_array_equal(x.negatives, y.negatives)
        np.testing.assert_array_equal(x.difficult_positives, y.difficult_positives)


@pytest.mark.parametrize("generation,bf16", [(0, False), (1, False), (1, True)])
def test_mine_subset_equals_dense_pattern(generation, bf16):
    feats, nq, train_pos, non_neg = synthetic_city()
    assert any(len(p) == 0 for p in train_pos)  # some queries must be skipped
    cfg = MiningConfig(neg_pool=40, num_negatives=5, difficult_candidates=8, num_difficult=5, k1=20,
                       bf16_search=bf16)
    pool_fn = make_negative_sampler(feats.shape[0] - nq, non_neg)
    subset = np.random.default_rng(5).permutation(nq)[:40]
    ours_cache, ref_cache = NegativeCache(nq, 5), NegativeCache(nq, 5)
    for refresh in range(2):  # the second refresh also draws from the negative cache
        ours = mine_subset(subset, feats, nq, train_pos, pool_fn, ours_cache, generation,
                           np.random.default_rng(refresh), cfg)
        ref = dense_pattern(subset, feats, nq, train_pos, pool_fn, ref_cache, generation,
                            np.random.default_rng(refresh), cfg)
        assert_same_tuples(ours.tuples, ref)
        np.testing.assert_array_equal(ours_cache.ids, ref_cache.ids)
    assert len(ours.tuples) < len(subset)
    for t in ours.tuples:
        assert t.positive in set(train_pos[t.query].tolist())
        assert not np.isin(t.negatives, non_neg[t.query]).any()
        assert np.isin(t.difficult_positives, train_pos[t.query]).all()
    if generation:
        ks = [len(t.difficult_positives) for t in ours.tuples]
        assert min(ks) < 5 and max(ks) > 0  # variable k, and the rule keeps some
        assert ours.timings.rerank_s > 0
    else:
        assert all(len(t.difficult_positives) == 0 for t in ours.tuples)


def test_mine_subset_rejects_bad_negatives():
    feats, nq, train_pos, non_neg = synthetic_city()
    cfg = MiningConfig(neg_pool=10, num_negatives=5)
    with pytest.raises(ValueError, match="outside the database"):
        mine_subset([1, 2], feats, nq, train_pos, lambda q, rng, n: np.arange(10) + 10_000,
                    NegativeCache(nq, 5), 0, np.random.default_rng(0), cfg)


def test_mean_pair_similarity_tells_spread_from_collapsed_descriptors():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(500, 64)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    common = rng.normal(size=64)
    collapsed = common + 0.05 * rng.normal(size=(500, 64))
    collapsed /= np.linalg.norm(collapsed, axis=1, keepdims=True)
    s_spread = mean_pair_similarity(spread, np.random.default_rng(1))
    s_collapsed = mean_pair_similarity(collapsed, np.random.default_rng(1))
    assert abs(s_spread) < 0.05
    assert s_collapsed > COLLAPSE_SIMILARITY
    # pairs are distinct rows: two descriptors, each pair is (0, 1) or (1, 0)
    two = np.eye(2, dtype=np.float32)
    assert mean_pair_similarity(two, np.random.default_rng(2)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        mean_pair_similarity(two[:1], np.random.default_rng(2))


def test_large_exact_search_in_blocks_equals_one_search(monkeypatch):
    """A search above the progress threshold runs in query blocks reporting progress; the
    result is the one-call search's, row for row."""
    from sfrs_dist.mining import knn

    rng = np.random.default_rng(3)
    db = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((5000, 16)).astype(np.float32)
    one = knn._FlatIndex(16).search(db, q, 9)
    updates = []

    class Recorder(knn.Progress):
        def update(self, n: int = 1) -> None:
            updates.append(n)
            super().update(n)

    monkeypatch.setattr(knn, "_PROGRESS_PAIRS", 1000)
    monkeypatch.setattr(knn, "Progress", Recorder)
    blocks = knn._FlatIndex(16).search(db, q, 9)
    np.testing.assert_array_equal(one[0], blocks[0])
    np.testing.assert_array_equal(one[1], blocks[1])
    assert len(updates) == 5 and sum(updates) == 5000  # blocks of max(1024, 5000 // 50) rows
