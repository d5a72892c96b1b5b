"""PCA-whitening fit of a training job: gather-everything (before) vs sample-then-gather (after).

W gloo processes each hold their share of N synthetic training descriptors (N = training
queries + database images; Pitts30k: 7,416 + 10,000, 32,768-d), dealt in blocks of 256 rows
round-robin as the streaming passes deal shards. Then:

- ``gather``: every rank all-gathers every row (the trainer before: ``extract_group``), rank
  0 fits ``PCAWhitening.fit`` on 10,000 rows drawn at random, the result is broadcast;
- ``sample``: ``fit_pca_sharded`` (each rank sends its share of the same 10,000 rows, to rank 0
  only, which fits on its device and broadcasts).

Both give the same PCA (checked). Reported per method: every rank's peak resident memory
above its own baseline (interpreter, imports, its own share, measured before the step), the
fit time on rank 0 and the wall time of the whole step, with the CPU (``lscpu`` model name).

    python bench/bench_pca.py                                  # Pitts30k size (needs ~16 GB for gather)
    python bench/bench_pca.py --dim 8192 --methods gather,sample
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLOCK = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def share(rank: int, world: int, n: int, dim: int, seed: int):
    """This rank's global positions and rows: blocks of 256 rows dealt round-robin."""
    scale = np.geomspace(1.0, 0.02, dim).astype(np.float32)  # a decaying spectrum, as descriptors have
    blocks = [b for b in range(-(-n // BLOCK)) if b % world == rank]
    pos = np.concatenate([np.arange(b * BLOCK, min(n, (b + 1) * BLOCK)) for b in blocks]).astype(np.int64)
    rows = np.empty((len(pos), dim), dtype=np.float32)
    r = 0
    for b in blocks:
        m = min(n, (b + 1) * BLOCK) - b * BLOCK
        x = np.random.default_rng([seed, b]).standard_normal((m, dim), dtype=np.float32) * scale
        rows[r:r + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        r += m
    return pos, rows


def worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(args["threads"]))
    import torch
    import torch.distributed as dist

    from sfrs_dist import distributed as du
    from sfrs_dist.evaluation import pca_fit
    from sfrs_dist.evaluation.pca import PCAWhitening, broadcast_pca

    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n, dim = args["queries"] + args["db"], args["dim"]
        pos, rows = share(rank, world, n, dim, args["seed"])
        du.barrier()
        base = _rss_mb()
        t0 = time.time()
        fit_s = 0.0
        if args["method"] == "gather":
            parts = du.all_gather_object((pos, rows))
            full = np.empty((n, dim), dtype=np.float32)
            for p, r in parts:
                full[p] = r
            del parts
            pca = None
            if rank == 0:
                t1 = time.time()
                pca = PCAWhitening(args["dims"]).fit(full, max_samples=args["samples"], seed=args["seed"])
                fit_s = time.time() - t1
            del full
            pca = broadcast_pca(pca)
        else:
            fit = pca_fit.fit_pca
            times = []

            def timed(*a, **k):  # the fit itself, as the method runs it on rank 0
                t1 = time.time()
                res = fit(*a, **k)
                times.append(time.time() - t1)
                return res

            pca_fit.fit_pca = timed
            pca = pca_fit.fit_pca_sharded(pos, rows, n, args["dims"], args["samples"], args["seed"],
                                          torch.device("cpu"))
            fit_s = sum(times)
        wall = time.time() - t0
        res = {"rank": rank, "share_rows": len(pos), "share_mb": rows.nbytes / 2 ** 20, "peak_above_mb":
               _rss_mb() - base, "wall_s": wall, "fit_s": fit_s,
               "pca_sum": [float(np.abs(pca.U).sum()), float(pca.lams.sum())]}
        Path(out, f"{args['method']}_rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=7416)
    p.add_argument("--db", type=int, default=10000)
    p.add_argument("--dim", type=int, default=32768)
    p.add_argument("--samples", type=int, default=10000, help="rows the PCA is fitted on (eval.pca_samples)")
    p.add_argument("--dims", type=int, default=4096, help="PCA output dimensions (eval.pca_dim)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads per rank")
    p.add_argument("--methods", default="gather,sample")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import torch.multiprocessing as mp

    n = a.queries + a.db
    print(f"PCA fit: {n} descriptors ({a.queries} + {a.db}) x {a.dim}-d, {a.samples} sampled, -> {a.dims} dims, "
          f"{a.world} gloo ranks x {a.threads} thread(s); CPU: {cpu_name()}", flush=True)
    sums = {}
    with tempfile.TemporaryDirectory() as out:
        for method in a.methods.split(","):
            args = {**vars(a), "method": method}
            mp.start_processes(worker, args=(a.world, _free_port(), args, out), nprocs=a.world, join=True,
                               start_method="spawn")
            res = [json.loads(Path(out, f"{method}_rank{r}.json").read_text()) for r in range(a.world)]
            sums[method] = res[0]["pca_sum"]
            mem = ", ".join(f"rank {r['rank']} {r['peak_above_mb']:.0f} MB" for r in res)
            print(f"{method:7s} fit on rank 0 {res[0]['fit_s']:.1f} s, step {res[0]['wall_s']:.1f} s; peak memory "
                  f"above baseline: {mem} (own share {res[0]['share_mb']:.0f} MB)", flush=True)
    if len(sums) == 2:
        a_, b_ = sums.values()
        print(f"same PCA: {np.allclose(a_, b_, rtol=1e-6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
