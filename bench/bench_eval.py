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

``--sharded 1,2`` also runs the evaluation's sharded-database search
(``sharded_search_topk``: each rank holds its contiguous share of the database and every
query, searches its share, the per-rank top-20 are all-gathered and merged) in W gloo
processes for each W listed, and reports every rank's peak memory above its own baseline
(interpreter, imports and a first collective, measured before the data is loaded), with the CPU
(``lscpu`` model name). Its top-20 is checked against the ``faiss`` method's.

    python bench/bench_eval.py --dim 256 --methods faiss --sharded 1,2   # Pitts250k-test size, 256-d
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
from typing import Dict, List, Sequence

import numpy as np

NS = (1, 5, 10, 20)
METHODS = ("faiss", "bf16", "dense")

log = logging.getLogger("bench_eval")


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


def cpu_model() -> str:
    """The ``lscpu`` model name (``unknown`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def read_rows(path: str, rank: int, world: int):
    """Rank ``rank``'s contiguous share of the rows of a 2-d float32 .npy file, read directly
    into its own array (no memory map, whose pages would count in the resident memory)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (n, dim), fortran, dtype = read_header(f)
        if fortran or dtype != np.float32:
            raise ValueError(f"{path}: expected a C-order float32 matrix")
        start, end = rank * n // world, (rank + 1) * n // world
        f.seek(start * dim * 4, os.SEEK_CUR)
        rows = np.fromfile(f, dtype=np.float32, count=(end - start) * dim).reshape(end - start, dim)
    return rows, start, end


def run_sharded_rank(data_dir: str, rank: int, world: int, port: int) -> Dict:
    """One rank of the sharded-database search: its contiguous database rows, every query."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from sfrs_dist.evaluation.recall import recall_at_n
    from sfrs_dist.evaluation.search import sharded_search_topk

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dist.all_gather_object([None] * world, np.zeros((64, 64)))  # gloo's buffers and threads, in the baseline
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    db, start, end = read_rows(os.path.join(data_dir, "db.npy"), rank, world)
    queries = np.load(os.path.join(data_dir, "queries.npy"))
    t0 = time.perf_counter()
    _, topk = sharded_search_topk(db, np.arange(start, end), queries, max(NS))
    result: Dict = {"method": f"sharded{world}", "rank": rank, "rows": end - start,
                    "seconds": time.perf_counter() - t0,
                    "search_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if rank == 0:
        result["recalls"] = recall_at_n(topk, load_positives(data_dir), NS)
        ref = os.path.join(data_dir, "topk_faiss.npy")
        if os.path.exists(ref):
            result["same_as_faiss"] = bool(np.array_equal(topk, np.load(ref)))
    result["base_mb"] = base_mb
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if world > 1:
        dist.destroy_process_group()
    return result


def spawn_sharded(world: int, data_dir: str) -> List[Dict]:
    """W rank processes of ``run_sharded_rank``; their results in rank order."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "sharded", "--data", data_dir,
                               "--rank", str(r), "--world", str(world), "--port", str(port)],
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"sharded rank process failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def report_sharded(runs: Dict[int, List[Dict]], db_mb: float, q_mb: float) -> None:
    log.info("sharded database search, CPU %s (%d cores visible); database %.0f MB, queries %.0f MB",
             cpu_model(), os.cpu_count(), db_mb, q_mb)
    log.info("(search: peak after the search and merge; +recall: after rank 0's recall computation too)")
    log.info("%-7s%6s%10s%10s%10s%18s%18s", "ranks", "rank", "rows", "seconds", "peak MB", "search-base MB",
             "+recall-base MB")
    for world, ranks in sorted(runs.items()):
        for r in ranks:
            log.info("%-7d%6d%10d%10.1f%10.0f%18.0f%18.0f", world, r["rank"], r["rows"], r["seconds"], r["peak_mb"],
                     r["search_peak_mb"] - r["base_mb"], r["peak_mb"] - r["base_mb"])
        head = ranks[0]
        log.info("ranks=%d: recalls %s, top-20 identical to the faiss method: %s", world,
                 " ".join(f"R@{n} {100 * head['recalls'][str(n)]:.2f}" for n in NS), head.get("same_as_faiss", "n/a"))
    if 1 in runs:
        for what in ("search_peak_mb", "peak_mb"):
            one = runs[1][0][what] - runs[1][0]["base_mb"]
            for world, ranks in sorted(runs.items()):
                if world > 1:
                    worst = max(r[what] - r["base_mb"] for r in ranks)
                    log.info("ranks=%d: largest per-rank %s above baseline %.0f MB = %.2f of the 1-rank %.0f MB",
                             world, "search peak" if what == "search_peak_mb" else "peak", worst,
                             worst / max(one, 1e-9), one)


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
    p.add_argument("--sharded", default="",
                   help="comma-separated rank counts for the sharded-database search, e.g. 1,2 (default: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "sharded":
        print(json.dumps(run_sharded_rank(args.data, args.rank, args.world, args.port)))
        return
    if args.child:
        print(json.dumps(run_child(args.child, args.data)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worlds = [int(w) for w in args.sharded.split(",") if w]
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
        if worlds:
            runs = {w: spawn_sharded(w, data_dir) for w in worlds}
            report_sharded(runs, args.db * args.dim * 4 / 2**20, args.queries * args.dim * 4 / 2**20)


if __name__ == "__main__":
    main()
