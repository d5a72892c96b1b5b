"""Sharded faiss top-k across 2 real gloo processes, against brute-force numpy search."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from sfrs_dist.mining.knn import self_topk, shard_range, sharded_topk

N_DB, N_Q, DIM, K = 120, 17, 24, 7
SPLIT = 37  # rank 0 holds rows [0, 37), rank 1 rows [37, 120): uneven shards


def _data(seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    if ties:
        # 0/1 entries on 4 dims: inner products are exact small integers and each value is
        # shared by far more items than k + margin, so ties run past faiss's short list
        db = np.zeros((N_DB, DIM), np.float32)
        q = np.zeros((N_Q, DIM), np.float32)
        db[:, :4] = rng.integers(0, 2, size=(N_DB, 4))
        q[:, :4] = rng.integers(0, 2, size=(N_Q, 4))
        return db, q
    db = rng.standard_normal((N_DB, DIM)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((N_Q, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return db, q


def brute_force(db: np.ndarray, q: np.ndarray, k: int):
    """Dense scores, full sort by (score desc, id asc)."""
    s = q.astype(np.float64) @ db.astype(np.float64).T
    ids = np.broadcast_to(np.arange(db.shape[0]), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def _mine_arrays() -> dict:
    """One generation-1 refresh (bf16 kNN graph) of a small city, as arrays."""
    from test_mining import synthetic_city

    from sfrs_dist.config import MiningConfig
    from sfrs_dist.mining.tuples import NegativeCache, make_negative_sampler, mine_subset

    feats, nq, train_pos, non_neg = synthetic_city(seed=1)
    cfg = MiningConfig(neg_pool=30, num_negatives=4, difficult_candidates=8, num_difficult=5, bf16_search=True)
    cache = NegativeCache(nq, 4)
    res = mine_subset(np.arange(nq), feats, nq, train_pos, make_negative_sampler(len(feats) - nq, non_neg),
                      cache, 1, np.random.default_rng(0), cfg)
    t = res.tuples
    return {"mine_q": np.array([x.query for x in t]), "mine_p": np.array([x.positive for x in t]),
            "mine_n": np.stack([x.negatives for x in t]),
            "mine_d": np.concatenate([np.r_[len(x.difficult_positives), x.difficult_positives] for x in t]),
            "mine_cache": cache.ids}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file=init_file):
        results = {}
        for ties in (False, True):
            db, q = _data(ties=ties)
            start, end = (0, SPLIT) if rank == 0 else (SPLIT, N_DB)
            for bf16 in ((False,) if ties else (False, True)):
                s, i = sharded_topk(db[start:end], start, q, K, bf16=bf16)
                results[f"topk_t{int(ties)}_b{int(bf16)}_s"] = s
                results[f"topk_t{int(ties)}_b{int(bf16)}_i"] = i
        db, _ = _data(seed=1)
        for bf16 in (False, True):
            s, i = self_topk(db, K, bf16=bf16)
            results[f"self_b{int(bf16)}_s"] = s
            results[f"self_b{int(bf16)}_i"] = i
        results.update(_mine_arrays())
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knn2")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("ties,bf16", [(False, False), (False, True), (True, False)])
def test_two_ranks_match_brute_force(two_rank_results, ties, bf16):
    """Exact search breaks exact ties by global id; bf16 matches exact search off ties."""
    db, q = _data(ties=ties)
    ref_s, ref_i = brute_force(db, q, K)
    for res in two_rank_results:
        np.testing.assert_array_equal(res[f"topk_t{int(ties)}_b{int(bf16)}_i"], ref_i)
        np.testing.assert_allclose(res[f"topk_t{int(ties)}_b{int(bf16)}_s"], ref_s, rtol=0, atol=1e-5)
    if ties:  # ties at the cut must outnumber faiss's short list for the test to bite
        s = q @ db.T
        kth = np.sort(s, axis=1)[:, ::-1][:, K - 1]
        assert ((s == kth[:, None]).sum(1) > K + 8).any()


@pytest.mark.parametrize("bf16", [False, True])
def test_two_ranks_self_graph(two_rank_results, bf16):
    db, _ = _data(seed=1)
    ref_s, ref_i = brute_force(db, db, K)
    assert (ref_i[:, 0] == np.arange(N_DB)).all()
    for res in two_rank_results:
        np.testing.assert_array_equal(res[f"self_b{int(bf16)}_i"], ref_i)
        np.testing.assert_allclose(res[f"self_b{int(bf16)}_s"], ref_s, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_single_process(bf16):
    db, q = _data(seed=3)
    ref_s, ref_i = brute_force(db, q, K)
    s, i = sharded_topk(db, 0, q, K, bf16=bf16)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    s, i = self_topk(q, 5, bf16=bf16)
    ref_s, ref_i = brute_force(q, q, 5)
    np.testing.assert_array_equal(i, ref_i)


def test_bf16_many_blocks(monkeypatch):
    """Block loops with several row and column blocks (including the symmetric half)."""
    import sfrs_dist.mining.knn as knn

    monkeypatch.setattr(knn, "_MAX_BLOCK_ROWS", 16)
    monkeypatch.setattr(knn, "_BF16_BLOCK_BYTES", 1 << 30)
    db, q = _data(seed=4)
    ref_s, ref_i = brute_force(db, q, K)
    s, i = sharded_topk(db, 0, q, K, bf16=True)
    np.testing.assert_array_equal(i, ref_i)
    s, i = self_topk(db, K, bf16=True)
    np.testing.assert_array_equal(i, brute_force(db, db, K)[1])


def test_shard_range_covers_all_rows():
    for n in (0, 1, 7, 100):
        for w in (1, 2, 3, 8):
            ranges = [shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(w - 1))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_bad_input_raises():
    db, q = _data()
    with pytest.raises(ValueError, match="dimension"):
        sharded_topk(db[:, :5], 0, q, 3)
    with pytest.raises(ValueError, match="k="):
        sharded_topk(db[:4], 0, q, 5)
    with pytest.raises(ValueError, match="2-d"):
        sharded_topk(db, 0, q[0], 3)


def test_two_rank_refresh_equals_single_process(two_rank_results):
    single = _mine_arrays()
    for res in two_rank_results:
        for key, value in single.items():
            np.testing.assert_array_equal(res[key], value, err_msg=key)


def test_bf16_resolves_dense_bands():
    """Neighbours packed closer than bf16's output resolution (~4e-3 near 0.9): the offset
    matmul still finds the exact top-k, where plain bf16 scores lose it."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal(512)
    x = u + 0.3 * rng.standard_normal((300, 512))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    _, exact = brute_force(x, x, 21)
    xt = torch.from_numpy(x).bfloat16()
    plain = torch.topk((xt @ xt.T).float(), 29, dim=1).indices.numpy()
    assert np.mean([set(exact[r]) <= set(plain[r]) for r in range(len(x))]) < 0.5
    _, ids = self_topk(x, 21, bf16=True)
    assert (ids == exact).all(1).mean() > 0.9
    _, ids = sharded_topk(x[40:], 40, x[:40], 21, bf16=True)
    assert (ids == brute_force(x[40:], x[:40], 21)[1] + 40).all(1).mean() > 0.9
