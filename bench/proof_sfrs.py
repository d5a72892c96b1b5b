"""Does SFRS beat its SARE baseline? Recall@1/5 per generation, 3 seeds on each of 2 cities.

Runs the demo job (``configs/demo.yaml``: ImageNet EfficientNet-Lite0 + NetVLAD, generation 0 =
SARE-ind, then SFRS generations; with PCA-whitening to 256-d, which the demo leaves out for time) once per (city, training seed) and prints Recall@1/5, mean
and standard deviation over the seeds, per city and over both, on the Pittsburgh-style test
split and the Tokyo-style queries by light condition. The ``off`` column is the untrained
network (backbone ImageNet weights + NetVLAD k-means init), tested before any step
(``eval.test_untrained``). Every generation's final network is evaluated and the test split
plays no part in any choice; ``sel`` is the reference's reported network (best validation
Recall@5 over all generations and epochs).

    python bench/proof_sfrs.py [--cities shards/city0 shards/city1] [--seeds 0 1 2] [--nproc 2]

Each city is a shard set of ``launch/make_synthetic.py --preset demo --seed S`` (two generator
seeds: a result on one city can be an accident of that city); build them with

    python launch/make_synthetic.py --out data/city1 --preset demo --seed 1
    python launch/build_shards.py --dataset synthetic --root data/city1 --out shards/city1

Each run takes about as long as the demo's training; a finished run is reused on rerun
(the job resumes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sfrs_dist.config import load_config  # noqa: E402
from sfrs_dist.data.manifest import Manifest  # noqa: E402
from sfrs_dist.teacher import cache as tc  # noqa: E402
from sfrs_dist.training.checkpoint import latest_checkpoint  # noqa: E402

ROWS = [("pitts30k_test", "all"), ("tokyo247_test", "all"), ("tokyo247_test", "day"),
        ("tokyo247_test", "sunset"), ("tokyo247_test", "night")]


def run_seed(seed: int, nproc: int, shards: Path, out: Path, extra) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.shards={shards}", "--set", f"run.out_dir={out}", "--set", f"train.seed={seed}",
           "--set", "eval.test_untrained=true", "--set", "eval.pca_dim=256", "--set", "eval.pca_samples=2000", "--set", f"tracking.run_name=proof-{out.parent.name}-seed{seed}",
           *extra]
    subprocess.run(cmd, check=True, cwd=REPO)
    ck = torch.load(latest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=False)
    cols = {"off": ck.get("untrained", {}).get("test", {})}
    cols.update({f"gen {g}": h["test"] for g, h in sorted(ck["history"].items())})
    if ck.get("selected"):
        cols["sel"] = ck["selected"]["test"]
    return cols


def soft_label_stats(run_dir: Path, shards: Path) -> dict:
    """generation -> (mean teacher similarity, mean normalised entropy of its soft labels)."""
    cfg = load_config(run_dir / "config.yaml")
    num_queries = len(Manifest.load(shards).split_data(cfg.data.train_set).queries)
    out = {}
    for done in sorted((run_dir / "cache").glob("teacher_*.done.json")):
        info = json.loads(done.read_text())
        gen = int(Path(info["teacher"]).name[len("generation"):][:2]) + 1
        cache = tc.load_cache(run_dir / "cache", info["key"], num_queries)
        out[gen] = (float(cache.sims.mean()), float(tc.soft_label_entropy(cache, cfg.temperature(gen)).mean()))
    return out


def print_table(title: str, runs: list) -> None:
    cols = list(runs[0])
    print(f"\n{title}")
    print(f"{'test set':<16}{'condition':<10}{'N':>3}" + "".join(f"{c:>15}" for c in cols))
    for sid, cond in ROWS:
        for n in (1, 5):
            cells = []
            for c in cols:
                vals = [100 * r[c][sid][0][cond][n] for r in runs if c in r and sid in r[c] and cond in r[c][sid][0]]
                cells.append(f"{np.mean(vals):7.1f} +-{np.std(vals):4.1f}" if vals else "-")
            print(f"{sid:<16}{cond:<10}{n:>3}" + "".join(f"{c:>15}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cities", type=Path, nargs="+", default=[REPO / "shards" / "city0", REPO / "shards" / "city1"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "proof")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = p.parse_args()
    extra = [a for s in args.extra for a in ("--set", s)]
    missing = [str(c) for c in args.cities if not (c / "manifest.json").is_file()]
    if missing:
        sys.exit(f"no shard set at {', '.join(missing)} (see the build commands in this script's help)")
    runs = {c: [run_seed(s, args.nproc, c, args.out / c.name / f"seed{s}", extra) for s in args.seeds]
            for c in args.cities}
    print(f"\nRecall@N (%), mean +- std over training seeds {args.seeds}; off = untrained, gen 0 = SARE-ind, "
          "gen >= 1 = SFRS, sel = best by validation R@5")
    for c, r in runs.items():
        print_table(f"city {c.name}", r)
    print_table(f"both cities ({len(args.cities) * len(args.seeds)} runs)", [r for rs in runs.values() for r in rs])
    print("\nTeacher soft labels (all cached positives x 9 regions per training query), mean over seeds:")
    for c in args.cities:
        stats = [soft_label_stats(args.out / c.name / f"seed{s}", c) for s in args.seeds]
        for g in sorted(stats[0]):
            sims = [st[g][0] for st in stats if g in st]
            ents = [st[g][1] for st in stats if g in st]
            print(f"  {c.name} generation {g}: teacher similarity {np.mean(sims):.3f}, normalised entropy at tau_g "
                  f"{np.mean(ents):.3f} +- {np.std(ents):.3f} (1 = uniform, nothing to distil)")


if __name__ == "__main__":
    main()
