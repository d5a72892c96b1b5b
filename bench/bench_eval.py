"""Recall@N computation: faiss top-k (exact, and bf16 candidates + exact re-score) vs a dense
query x database distance matrix with a full argsort (the reference evaluation pattern).

Synthetic city at Pitts250k-test scale by default (8,280 queries, 83,952 database images,
4096-d unit descriptors): places every 12 m along streets 100 m apart, 24 database views per
place, queries within 5 m of a place; a descriptor is its place's random centre plus
Gaussian noise (``--snr``: expected same-place similarity over the spread of unrelated
similarities), so recalls are well below 100%. Positives: database images within 25 m
(KD-tree on the synthetic UTMs).

Each method runs in its own subprocess (data loaded from .npy files written once), which
reports its wall time (search + recall, data loading excluded) and its peak resident memory
(``ru_maxrss``). A ``load`` child measures the memory of the loaded data alone.

    python bench/bench_eval.py                       # full scale (a few minutes on 2 cores)
    python bench/bench_eval.py --queries 500 --db 5000 --dim 512
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
from typing import Dict, List, Sequence

import numpy as np

NS = (1, 5, 10, 20)
METHODS = ("faiss", "bf16", "dense")


def synthetic_city(n_q: int, n_db: int, dim: int, noise: float, out_dir: str, seed: int) -> None:
    """Write db.npy, queries.npy and positives (CSR: pos_offsets.npy, pos_values.npy)."""
    from sfrs_dist.data.records import ground_truth_within

    rng = np.random.default_rng(seed)
    views = 24
    n_places = -(-n_db // views)
    per_street = 40
    place_xy = np.stack([np.arange(n_places) % per_street * 12.0,
                         np.arange(n_places) // per_street * 100.0], axis=1)
    centres = rng.standard_normal((n_places, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    db_place = np.arange(n_db) // views
    q_place = rng.integers(0, n_places, n_q)
    angle, radius = rng.uniform(0, 2 * np.pi, n_q), rng.uniform(0, 5.0, n_q)
    utm_q = place_xy[q_place] + np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius[:, None]
    for name, place in (("db", db_place), ("queries", q_place)):
        arr = np.lib.format.open_memmap(os.path.join(out_dir, f"{name}.npy"), mode="w+",
                                        dtype=np.float32, shape=(place.size, dim))
        for r0 in range(0, place.size, 4096):
            p = place[r0:r0 + 4096]
            x = centres[p] + rng.standard_normal((p.size, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
            arr[r0:r0 + p.size] = x / np.linalg.norm(x, axis=1, keepdims=True)
        arr.flush()
        del arr
    pos = ground_truth_within(utm_q, place_xy[db_place], 25.0)
    np.save(os.path.join(out_dir, "pos_offsets.npy"), np.cumsum([0] + [p.size for p in pos]))
    np.save(os.path.join(out_dir, "pos_values.npy"), np.concatenate(pos))


def load_positives(data_dir: str) -> List[np.ndarray]:
    off = np.load(os.path.join(data_dir, "pos_offsets.npy"))
    val = np.load(os.path.join(data_dir, "pos_values.npy"))
    return [val[off[i]:off[i + 1]] for i in range(off.size - 1)]


def dense_reference_topk(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Squared Euclidean distance matrix (Q x G) then a full argsort of every row."""
    import torch

    x, y = torch.from_numpy(queries), torch.from_numpy(db)
    m, n = x.shape[0], y.shape[0]
    dist = x.pow(2).sum(dim=1, keepdim=True).expand(m, n) + y.pow(2).sum(dim=1, keepdim=True).expand(n, m).t()
    dist.addmm_(x, y.t(), beta=1, alpha=-2)
    order = np.argsort(dist.numpy(), axis=1)
    return order[:, :k]


def run_child(method: str, data_dir: str) -> Dict:
    """Load the data, run one method, report time, recalls and peak memory."""
    from sfrs_dist.evaluation.recall import recall_at_n
    from sfrs_dist.evaluation.search import search_topk

    db = np.load(os.path.join(data_dir, "db.npy"))
    queries = np.load(os.path.join(data_dir, "queries.npy"))
    positives = load_positives(data_dir)
    k = max(NS)
    result: Dict = {"method": method}
    t0 = time.perf_counter()
    if method == "faiss":
        _, topk = search_topk(db, queries, k, use_gpu="auto")
    elif method == "bf16":
        _, topk = search_topk(db, queries, k, bf16=True)
    elif method == "dense":
        topk = dense_reference_topk(db, queries, k)
    elif method == "load":
        topk = None
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS + ('load',)}")
    if topk is not None:
        result["recalls"] = recall_at_n(topk, positives, NS)
        result["seconds"] = time.perf_counter() - t0
        np.save(os.path.join(data_dir, f"topk_{method}.npy"), topk)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def spawn(method: str, data_dir: str) -> Dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, "--data", data_dir],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: Dict[str, Dict], data_dir: str, methods: Sequence[str]) -> None:
    base = results["load"]["peak_mb"]
    print(f"\n{'method':<8}{'seconds':>10}{'peak MB':>10}{'peak-data MB':>14}  "
          + "  ".join(f"R@{n:<5}" for n in NS))
    for m in methods:
        r = results[m]
        rec = "  ".join(f"{100 * r['recalls'][str(n)]:6.2f}" for n in NS)
        print(f"{m:<8}{r['seconds']:>10.1f}{r['peak_mb']:>10.0f}{r['peak_mb'] - base:>14.0f}  {rec}")
    print(f"{'load':<8}{'':>10}{base:>10.0f}   (data + interpreter only)")
    if "dense" not in results:
        return
    dense = results["dense"]
    ref_topk = np.load(os.path.join(data_dir, "topk_dense.npy"))
    for m in methods:
        if m == "dense":
            continue
        r = results[m]
        same = r["recalls"] == dense["recalls"]
        topk = np.load(os.path.join(data_dir, f"topk_{m}.npy"))
        agree = float(np.mean(topk == ref_topk))
        print(f"{m} vs dense: {dense['seconds'] / r['seconds']:.2f}x faster, peak memory "
              f"{r['peak_mb'] / dense['peak_mb']:.3f} of dense (excluding data: "
              f"{(r['peak_mb'] - base) / max(dense['peak_mb'] - base, 1e-9):.3f}), recalls identical: {same}, "
              f"top-20 entries equal: {100 * agree:.3f}%")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=8280)
    p.add_argument("--db", type=int, default=83952)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--snr", type=float, default=2.8,
                   help="same-place similarity over the std of unrelated similarities (sets the noise)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.data)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    print(f"command: {' '.join(sys.argv)}")
    noise = float(np.sqrt(max(np.sqrt(args.dim) / args.snr - 1.0, 0.0)))
    print(f"queries={args.queries} db={args.db} dim={args.dim} noise={noise:.2f} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as data_dir:
        t0 = time.perf_counter()
        synthetic_city(args.queries, args.db, args.dim, noise, data_dir, args.seed)
        print(f"synthetic data written in {time.perf_counter() - t0:.1f}s")
        results = {"load": spawn("load", data_dir)}
        for m in methods:
            results[m] = spawn(m, data_dir)
            print(f"{m}: {results[m]['seconds']:.1f}s, peak {results[m]['peak_mb']:.0f} MB", flush=True)
        report(results, data_dir, methods)


if __name__ == "__main__":
    main()
