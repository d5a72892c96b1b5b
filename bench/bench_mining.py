"""One mining refresh: descriptors sharded across ranks vs. copied to each vs. the dense reference.

Methods, each in its own processes (peak memory = each process's ru_maxrss):

- ``sharded``: ``ShardedItems`` in W gloo processes. Each rank generates only its share of
  the descriptors (items dealt in shard-sized runs, as the streaming loader splits shards),
  blocks travel between ranks; kNN graph, re-ranking, tuple selection and the collapse
  check of one cache subset.
- ``dense``: ``DenseItems`` in one process, the full (N, d) matrix held (what every rank
  held before); the baseline the ratios are taken against.
- ``reference``: the dense reference pattern: dense Q x G distances + full argsort, dense
  k-reciprocal re-ranking over all N items, per-query Python scan of the sorted rows.

Descriptors: clustered synthetic ones (place centres + view centres + noise, each item
seeded by its own id, so any rank can generate any share) with synthetic UTMs for the
ground truth. Prints times, peak memory per rank, identical tuples against the reference
and the dense store, and the growth of time and memory with N.

    python bench/bench_mining.py --scale small
    python bench/bench_mining.py --scale growth            # three sizes, all methods
    python bench/bench_mining.py --scale pitts30k          # 32768-d, several minutes
    python bench/bench_mining.py --scale pitts250k         # sharded, 2 ranks; reference memory estimated
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy.spatial import cKDTree

from sfrs_dist.config import MiningConfig
from sfrs_dist.mining.rerank import rerank_dense_reference
from sfrs_dist.mining.store import DenseItems, ShardedItems
from sfrs_dist.mining.tuples import (
    NegativeCache,
    TrainingTuple,
    make_negative_sampler,
    mine_subset,
    select_difficult_positives,
)
from sfrs_dist.precision import search_bf16

log = logging.getLogger("bench_mining")

SCALES = {  # queries, database images, descriptor dim
    "small": (741, 1000, 4096),
    "pitts30k": (7416, 10000, 32768),
    "pitts250k": (7800, 91000, 4096),
}
GROWTH = [(850, 1150), (1700, 2300), (3400, 4600)]  # 2k, 4k, 8k items
GROWTH_DIM = 4096
PER_PLACE, YAWS, SPACING = 24, 12, 15.0
SHARD_ITEMS = 500  # items per shard when dealing shares to ranks


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown CPU"


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


def make_descriptors(items: np.ndarray, places: np.ndarray, yaws: np.ndarray, n_places: int, dim: int,
                     seed: int, chunk: int = 512) -> np.ndarray:
    """L2-normalised ``place + view + noise`` descriptors of ``items`` (global ids), in float32 chunks.

    Every item is seeded by its id, so a rank generating its share gets the same rows as a
    process generating all of them.
    """
    g = np.random.default_rng([seed, 1]).standard_normal((n_places, dim), dtype=np.float32)
    out = np.empty((len(items), dim), dtype=np.float32)
    for c0 in range(0, len(items), chunk):
        for r in range(c0, min(len(items), c0 + chunk)):
            i = int(items[r])
            view = np.random.default_rng([seed, 2, int(places[i]), int(yaws[i])]).standard_normal(dim, np.float32)
            noise = np.random.default_rng([seed, 3, i]).standard_normal(dim, np.float32)
            out[r] = g[places[i]] + view + 0.6 * noise
        out[c0:c0 + chunk] /= np.linalg.norm(out[c0:c0 + chunk], axis=1, keepdims=True)
    return out


def rank_items(nq: int, ng: int, rank: int, world: int) -> np.ndarray:
    """The items of ``rank``: query and database shards of ``SHARD_ITEMS`` dealt round-robin."""
    starts = list(range(0, nq, SHARD_ITEMS)) + list(range(nq, nq + ng, SHARD_ITEMS))
    ends = [min(s + SHARD_ITEMS, nq if s < nq else nq + ng) for s in starts]
    mine = [np.arange(s, e) for k, (s, e) in enumerate(zip(starts, ends)) if k % world == rank]
    return np.concatenate(mine) if mine else np.zeros(0, np.int64)


def subset_and_cache(nq: int, ng: int, train_pos, non_neg, subset: int, num_neg: int, seed: int):
    rng = np.random.default_rng([seed, 4])
    sampler = make_negative_sampler(ng, non_neg)
    with_pos = np.flatnonzero([len(p) > 0 for p in train_pos])
    ids = rng.permutation(with_pos)[:subset]
    cache = NegativeCache(nq, num_neg)
    for q in ids:  # a previous epoch's negatives (random true negatives), the same for every method
        cache.update(int(q), sampler(int(q), rng, num_neg))
    return ids, cache


def mining_config(args) -> MiningConfig:
    return MiningConfig(bf16_search=search_bf16(args.bf16 if args.bf16 == "auto" else args.bf16 == "true"))


def run_ours(items, nq, train_pos, non_neg, ids, cache, cfg) -> Tuple[List[TrainingTuple], Dict[str, float]]:
    """One refresh as the trainer runs it: ``mine_subset`` (generation >= 1) and the collapse check."""
    sampler = make_negative_sampler(len(items) - nq, non_neg)
    t0 = time.perf_counter()
    res = mine_subset(ids, items, nq, train_pos, sampler, cache, 1, np.random.default_rng(7), cfg)
    sim = items.mean_pair_similarity(np.random.default_rng(3), lo=nq)
    total = time.perf_counter() - t0
    return res.tuples, {"total_s": total, "search_s": res.timings.search_s, "rerank_s": res.timings.rerank_s,
                        "select_s": res.timings.select_s, "mean_sim": sim}


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


def _threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _sharded_rank(rank: int, world: int, init_file: str, args) -> None:
    import torch.distributed as dist

    _threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        base = peak_rss_gib()
        nq, ng, dim = args.nq, args.ng, args.dim
        places, yaws, n_places, train_pos, non_neg = make_layout(nq, ng, args.seed)
        mine = rank_items(nq, ng, rank, world)
        rows = make_descriptors(mine, places, yaws, n_places, dim, args.seed)
        cfg = mining_config(args)
        ids, cache = subset_and_cache(nq, ng, train_pos, non_neg, args.subset, cfg.num_negatives, args.seed)
        items = ShardedItems(mine, rows, nq + ng)
        del rows
        data = peak_rss_gib()
        dist.barrier()
        tuples, stats = run_ours(items, nq, train_pos, non_neg, ids, cache, cfg)
        stats.update(peak_gib=peak_rss_gib(), data_gib=data, base_gib=base, items=len(mine))
        with open(f"{args.out}.rank{rank}.json", "w") as f:
            json.dump(stats, f)
        if rank == 0:
            save_tuples(args.out + ".npz", tuples)
    finally:
        dist.destroy_process_group()


def child(args) -> None:
    nq, ng, dim = args.nq, args.ng, args.dim
    if args.method == "sharded":
        import torch.multiprocessing as mp

        init = args.out + ".init"
        mp.spawn(_sharded_rank, args=(args.ranks, init, args), nprocs=args.ranks, join=True)
        ranks = []
        for r in range(args.ranks):
            with open(f"{args.out}.rank{r}.json") as f:
                ranks.append(json.load(f))
        stats = dict(ranks[0])
        stats.update(total_s=max(s["total_s"] for s in ranks), peak_gib=max(s["peak_gib"] for s in ranks),
                     data_gib=max(s["data_gib"] for s in ranks), peak_each=[s["peak_gib"] for s in ranks],
                     above_each=[s["peak_gib"] - s["base_gib"] for s in ranks])
    else:
        _threads(os.cpu_count() or 1)
        base = peak_rss_gib()
        places, yaws, n_places, train_pos, non_neg = make_layout(nq, ng, args.seed)
        feats = make_descriptors(np.arange(nq + ng), places, yaws, n_places, dim, args.seed)
        cfg = mining_config(args)
        ids, cache = subset_and_cache(nq, ng, train_pos, non_neg, args.subset, cfg.num_negatives, args.seed)
        data = peak_rss_gib()
        if args.method == "dense":
            tuples, stats = run_ours(DenseItems(feats), nq, train_pos, non_neg, ids, cache, cfg)
        else:
            tuples, stats = run_reference(feats, nq, train_pos, non_neg, ids, cache, cfg)
        save_tuples(args.out + ".npz", tuples)
        stats.update(peak_gib=peak_rss_gib(), data_gib=data, peak_each=[peak_rss_gib()],
                     above_each=[peak_rss_gib() - base])
    with open(args.out + ".json", "w") as f:
        json.dump(stats, f)


def launch(method: str, nq: int, ng: int, dim: int, args, tmp: str, ranks: int = 1) -> Tuple[Dict, str]:
    out = os.path.join(tmp, f"{method}{ranks}_{nq + ng}")
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--nq", str(nq), "--ng", str(ng),
           "--dim", str(dim), "--ranks", str(ranks), "--out", out, "--subset", str(args.subset),
           "--seed", str(args.seed), "--bf16", args.bf16]
    log.info("running %s (%d rank(s)) at %d items, dim %d", method, ranks, nq + ng, dim)
    subprocess.run(cmd, check=True)
    with open(out + ".json") as f:
        return json.load(f), out + ".npz"


def agreement(a: str, b: str) -> float:
    """Fraction of identical whole tuples (positive, negatives, difficult positives)."""
    x, y = np.load(a), np.load(b)
    assert (x["q"] == y["q"]).all()
    return float(((x["p"] == y["p"]) & (x["n"] == y["n"]).all(1) & (x["d"] == y["d"])).mean())


def run_size(nq: int, ng: int, dim: int, args, tmp: str, methods: List[Tuple[str, int]]) -> List[Dict]:
    rows, files = [], {}
    for method, ranks in methods:
        stats, path = launch(method, nq, ng, dim, args, tmp, ranks)
        files[(method, ranks)] = path
        rows.append({"method": method, "ranks": ranks, "n": nq + ng, **stats})
    for r in rows:
        path = files[(r["method"], r["ranks"])]
        r["same_ref"] = agreement(path, files[("reference", 1)]) if ("reference", 1) in files else None
        r["same_dense"] = agreement(path, files[("dense", 1)]) if ("dense", 1) in files else None
    return rows


def print_table(rows: List[Dict], title: str) -> None:
    print(title)
    print("peak: ru_maxrss of each rank; above start: peak minus the process's RSS before generating descriptors")
    print(f"{'method':10s} {'ranks':>5s} {'N':>7s} {'time s':>9s} {'peak GiB/rank':>14s} {'above start':>12s} "
          f"{'t/dense':>8s} {'mem/dense':>9s} {'same as ref':>11s} {'same as dense':>13s}")
    dense = {r["n"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get(r["n"])
        t_ratio = f"{r['total_s'] / base['total_s']:.2f}" if base else "-"
        m_ratio = f"{max(r['above_each']) / max(base['above_each']):.2f}" if base else "-"
        same_ref = "-" if r["same_ref"] is None else f"{r['same_ref']:.4f}"
        same_dense = "-" if r["same_dense"] is None else f"{r['same_dense']:.4f}"
        peaks = "/".join(f"{p:.2f}" for p in r["peak_each"])
        above = "/".join(f"{p:.2f}" for p in r["above_each"])
        print(f"{r['method']:10s} {r['ranks']:5d} {r['n']:7d} {r['total_s']:9.1f} {peaks:>14s} {above:>12s} "
              f"{t_ratio:>8s} {m_ratio:>9s} {same_ref:>11s} {same_dense:>13s}")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES) + ["growth"], default="small")
    ap.add_argument("--subset", type=int, default=1000, help="queries in the cache subset")
    ap.add_argument("--dim", type=int, default=0, help="descriptor dimension (default: the scale's)")
    ap.add_argument("--ranks", type=int, default=0, help="sharded: largest number of ranks (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", choices=["auto", "true", "false"], default="auto", help="mining.bf16_search")
    ap.add_argument("--no-reference", action="store_true", help="skip the dense reference pattern")
    ap.add_argument("--method", choices=["sharded", "dense", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--nq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ng", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.method:
        child(args)
        return
    max_ranks = args.ranks or 2
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores visible); mining.bf16_search "
          f"{mining_config(args).bf16_search}; subset {args.subset} queries")
    with tempfile.TemporaryDirectory() as tmp:
        if args.scale == "growth":
            dim = args.dim or GROWTH_DIM
            rows = []
            for nq, ng in GROWTH:
                methods = [("dense", 1)] + [("sharded", w) for w in range(1, max_ranks + 1)]
                if not args.no_reference:
                    methods.append(("reference", 1))
                rows += run_size(nq, ng, dim, args, tmp, methods)
            print_table(rows, f"growth with N, dim {dim}")
            for method, ranks in sorted({(r["method"], r["ranks"]) for r in rows}):
                mine = [r for r in rows if (r["method"], r["ranks"]) == (method, ranks)]
                grow = ", ".join(f"N {r['n']}: {r['total_s']:.1f} s, {max(r['above_each']):.3f} GiB" for r in mine)
                print(f"  {method} x{ranks}: {grow}; N x{mine[-1]['n'] / mine[0]['n']:.1f} -> time "
                      f"x{mine[-1]['total_s'] / mine[0]['total_s']:.1f}, memory above start per rank "
                      f"x{max(mine[-1]['above_each']) / max(max(mine[0]['above_each']), 1e-3):.1f}")
            return
        nq, ng, dim = SCALES[args.scale]
        dim = args.dim or dim
        if args.scale == "pitts250k":
            rows = run_size(nq, ng, dim, args, tmp, [("sharded", max_ranks)])
            n = nq + ng
            print_table(rows, f"scale pitts250k: {nq} queries x {ng} database, dim {dim}")
            print(f"reference pattern (not run): N^2 float32 = {n * n * 4 / 2**30:.1f} GiB per N x N matrix; it holds "
                  f"the float32 dots and three float64 N x N matrices (distances, V, Jaccard): about "
                  f"{n * n * (4 + 3 * 8) / 2**30:.0f} GiB")
            return
        methods = [("dense", 1)] + [("sharded", w) for w in range(1, max_ranks + 1)]
        if not args.no_reference:
            methods.append(("reference", 1))
        rows = run_size(nq, ng, dim, args, tmp, methods)
        print_table(rows, f"scale {args.scale}: {nq} queries x {ng} database, dim {dim}")


if __name__ == "__main__":
    main()
