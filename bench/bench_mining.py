"""One mining refresh: sharded top-k + sparse re-ranking vs the dense reference pattern.

Ours: bf16 kNN graph over all N = Q + G items (symmetric blocks, exact fp32 re-score),
k-reciprocal re-ranking from the sparse graph, tuple selection for one cache subset with
dot products of each query against just its positives and negative candidates.
Reference pattern: dense Q x G distances + full argsort, dense k-reciprocal re-ranking over
all N items, per-query Python scan of the sorted rows.

Each method runs in its own subprocess (peak memory = that process's ru_maxrss), on the
same clustered synthetic descriptors (place centres + view centres + noise, generated in
float32 chunks) with synthetic UTMs for the ground truth. Prints times, peak memories and
the fraction of identical tuples.

    python bench/bench_mining.py --scale small
    python bench/bench_mining.py --scale pitts30k          # ~ a few minutes
    python bench/bench_mining.py --scale pitts250k         # ours only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
from scipy.spatial import cKDTree

from sfrs_dist.config import MiningConfig
from sfrs_dist.mining.knn import sharded_topk
from sfrs_dist.mining.rerank import rerank_dense_reference
from sfrs_dist.mining.tuples import (
    NegativeCache,
    TrainingTuple,
    make_negative_sampler,
    mine_subset,
    select_difficult_positives,
)

SCALES = {  # queries, database images, descriptor dim
    "small": (741, 1000, 4096),
    "pitts30k": (7416, 10000, 32768),
    "pitts250k": (7800, 91000, 4096),
}
PER_PLACE, YAWS, SPACING = 24, 12, 15.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_layout(nq: int, ng: int, seed: int):
    """Places on a jittered grid; database views (place, yaw, pitch); queries near places."""
    rng = np.random.default_rng([seed, 0])
    n_places = max(1, ng // PER_PLACE)
    side = int(np.ceil(np.sqrt(n_places)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_places]
    place_xy = grid * SPACING + rng.uniform(-2, 2, (n_places, 2))
    db_place = np.arange(ng) // PER_PLACE % n_places
    db_yaw = np.arange(ng) % YAWS
    db_xy = place_xy[db_place] + rng.uniform(-1, 1, (ng, 2))
    q_place = rng.integers(0, n_places, nq)
    q_yaw = rng.integers(0, YAWS, nq)
    r = 12.0 * np.sqrt(rng.uniform(0, 1, nq))
    t = rng.uniform(0, 2 * np.pi, nq)
    q_xy = place_xy[q_place] + np.stack([r * np.cos(t), r * np.sin(t)], 1)
    tree = cKDTree(db_xy)
    train_pos = [np.sort(np.asarray(p, np.int64)) for p in tree.query_ball_point(q_xy, 10.0)]
    non_neg = [np.sort(np.asarray(p, np.int64)) for p in tree.query_ball_point(q_xy, 25.0)]
    return (np.concatenate([q_place, db_place]), np.concatenate([q_yaw, db_yaw]), n_places,
            train_pos, non_neg)


def make_descriptors(places: np.ndarray, yaws: np.ndarray, n_places: int, dim: int, seed: int,
                     chunk: int = 512) -> np.ndarray:
    """L2-normalised ``place + view + noise`` descriptors, built in float32 chunks."""
    g = np.random.default_rng([seed, 1]).standard_normal((n_places, dim), dtype=np.float32)
    out = np.empty((len(places), dim), dtype=np.float32)
    for c0 in range(0, len(places), chunk):
        for i in range(c0, min(len(places), c0 + chunk)):
            view = np.random.default_rng([seed, 2, int(places[i]), int(yaws[i])]).standard_normal(dim, np.float32)
            noise = np.random.default_rng([seed, 3, i]).standard_normal(dim, np.float32)
            out[i] = g[places[i]] + view + 0.6 * noise
        out[c0:c0 + chunk] /= np.linalg.norm(out[c0:c0 + chunk], axis=1, keepdims=True)
    return out


def make_problem(nq: int, ng: int, dim: int, seed: int):
    places, yaws, n_places, train_pos, non_neg = make_layout(nq, ng, seed)
    feats = make_descriptors(places, yaws, n_places, dim, seed)
    return feats, train_pos, non_neg


def subset_and_cache(nq: int, ng: int, train_pos, non_neg, subset: int, num_neg: int, seed: int):
    rng = np.random.default_rng([seed, 4])
    sampler = make_negative_sampler(ng, non_neg)
    with_pos = np.flatnonzero([len(p) > 0 for p in train_pos])
    ids = rng.permutation(with_pos)[:subset]
    cache = NegativeCache(nq, num_neg)
    for q in ids:  # a previous epoch's negatives (random true negatives), the same for both methods
        cache.update(int(q), sampler(int(q), rng, num_neg))
    return ids, cache


def run_ours(feats, nq, train_pos, non_neg, ids, cache, cfg) -> Tuple[List[TrainingTuple], Dict[str, float]]:
    sampler = make_negative_sampler(feats.shape[0] - nq, non_neg)
    t0 = time.perf_counter()
    res = mine_subset(ids, feats, nq, train_pos, sampler, cache, 1, np.random.default_rng(7), cfg)
    total = time.perf_counter() - t0
    return res.tuples, {"total_s": total, "search_s": res.timings.search_s, "rerank_s": res.timings.rerank_s,
                        "select_s": res.timings.select_s}


def run_reference(feats, nq, train_pos, non_neg, ids, cache, cfg) -> Tuple[List[TrainingTuple], Dict[str, float]]:
    sampler = make_negative_sampler(feats.shape[0] - nq, non_neg)
    t0 = time.perf_counter()
    dist = feats[:nq] @ feats[nq:].T
    dist *= -2.0
    dist += 2.0
    order = np.argsort(dist, axis=1, kind="stable")
    t1 = time.perf_counter()
    rr = rerank_dense_reference(feats, cfg.k1, cfg.k2, cfg.lam)
    t2 = time.perf_counter()
    rng = np.random.default_rng(7)
    pools = [sampler(int(q), rng, cfg.neg_pool) for q in ids]
    out = []
    for q, pool in zip(ids, pools):
        pos_set = set(train_pos[q].tolist())
        cands = set(pool.tolist()) | set(cache.get(int(q)).tolist())
        pos_sorted, negs = [], []
        for j in order[q]:
            if j in pos_set:
                pos_sorted.append(j)
            elif j in cands and len(negs) < cfg.num_negatives:
                negs.append(j)
        near = np.array(pos_sorted[: cfg.difficult_candidates], dtype=np.int64)
        difficult = select_difficult_positives(near, rr[q, nq + near], cfg.num_difficult)
        out.append(TrainingTuple(int(q), int(pos_sorted[0]), np.array(negs), difficult))
    t3 = time.perf_counter()
    return out, {"total_s": t3 - t0, "dist_sort_s": t1 - t0, "rerank_s": t2 - t1, "select_s": t3 - t2}


def save_tuples(path: str, tuples: List[TrainingTuple]) -> None:
    np.savez(path, q=np.array([t.query for t in tuples]), p=np.array([t.positive for t in tuples]),
             n=np.stack([t.negatives for t in tuples]),
             d=np.array([",".join(map(str, t.difficult_positives)) for t in tuples]))


def child(args) -> None:
    nq, ng, dim = SCALES[args.scale]
    dim = args.dim or dim
    if args.method == "search":
        feats, _, _ = make_problem(nq, ng, dim, args.seed)
        base = peak_rss_gib()
        t0 = time.perf_counter()
        sharded_topk(feats[nq:], 0, feats[:nq], 21, bf16=True)
        stats = {"total_s": time.perf_counter() - t0}
    else:
        feats, train_pos, non_neg = make_problem(nq, ng, dim, args.seed)
        cfg = MiningConfig(bf16_search=True)
        ids, cache = subset_and_cache(nq, ng, train_pos, non_neg, args.subset, cfg.num_negatives, args.seed)
        base = peak_rss_gib()
        fn = run_ours if args.method == "ours" else run_reference
        tuples, stats = fn(feats, nq, train_pos, non_neg, ids, cache, cfg)
        save_tuples(args.out + ".npz", tuples)
    stats.update(peak_gib=peak_rss_gib(), data_gib=base, dim=dim)
    with open(args.out + ".json", "w") as f:
        json.dump(stats, f)


def launch(method: str, args, tmp: str, dim: int = 0) -> Tuple[Dict[str, float], str]:
    out = os.path.join(tmp, method)
    cmd = [sys.executable, os.path.abspath(__file__), "--scale", args.scale, "--method", method,
           "--out", out, "--subset", str(args.subset), "--seed", str(args.seed), "--dim", str(dim or args.dim)]
    subprocess.run(cmd, check=True)
    with open(out + ".json") as f:
        return json.load(f), out + ".npz"


def agreement(a: str, b: str) -> Dict[str, float]:
    x, y = np.load(a), np.load(b)
    same_p = x["p"] == y["p"]
    same_n = (x["n"] == y["n"]).all(1)
    same_d = x["d"] == y["d"]
    assert (x["q"] == y["q"]).all()
    return {"positive": same_p.mean(), "negatives": same_n.mean(), "difficult": same_d.mean(),
            "whole tuple": (same_p & same_n & same_d).mean()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--subset", type=int, default=1000, help="queries in the cache subset")
    ap.add_argument("--dim", type=int, default=0, help="descriptor dimension (default: the scale's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=["ours", "reference", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--search-dim", type=int, default=32768, help="pitts250k: dimension of the q x db search")
    args = ap.parse_args(argv)
    if args.method:
        child(args)
        return
    nq, ng, dim = SCALES[args.scale]
    print(f"scale {args.scale}: {nq} queries x {ng} database, dim {args.dim or dim}, subset {args.subset}")
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_file = launch("ours", args, tmp)
        rows = [("ours (sparse)", ours)]
        if args.scale != "pitts250k":
            ref, ref_file = launch("reference", args, tmp)
            rows.append(("reference (dense)", ref))
        else:
            search, _ = launch("search", args, tmp, dim=args.search_dim)
            rows.append((f"ours q x db search only, dim {args.search_dim}", search))
        for name, s in rows:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k.endswith("_s") and k != "total_s")
            print(f"{name:45s} time {s['total_s']:8.1f} s ({parts}); peak {s['peak_gib']:.2f} GiB "
                  f"(after data {s['data_gib']:.2f} GiB)")
        if args.scale != "pitts250k":
            print(f"speed-up {ref['total_s'] / ours['total_s']:.1f}x; peak memory ratio ours/reference "
                  f"{ours['peak_gib'] / ref['peak_gib']:.2f}; above data "
                  f"{(ours['peak_gib'] - ours['data_gib']) / max(ref['peak_gib'] - ref['data_gib'], 1e-9):.2f}")
            agree = agreement(ours_file, ref_file)
            print("identical tuples: " + ", ".join(f"{k} {v:.4f}" for k, v in agree.items()))


if __name__ == "__main__":
    main()
