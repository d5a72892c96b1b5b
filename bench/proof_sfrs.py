"""Does SFRS beat its SARE baseline? Recall@1/5 per generation, 3 seeds on each of 2 cities,
with the system's cached teacher and the reference's online one, and fp32 against bf16.

Runs the demo job (``configs/demo.yaml``: ImageNet EfficientNet-Lite0 + NetVLAD, generation 0 =
SARE-ind, then SFRS generations; with PCA-whitening to 256-d, which the demo leaves out for time) once per (city, training seed) and prints Recall@1/5, mean
and standard deviation over the seeds, per city and over both, on the Pittsburgh-style test
split and the Tokyo-style queries by light condition. The ``off`` column is the untrained
network (backbone ImageNet weights + NetVLAD k-means init), tested before any step
(``eval.test_untrained``). Every generation's final network is evaluated and the test split
plays no part in any choice; ``sel`` is the reference's reported network (best validation
Recall@5 over all generations and epochs).

    python bench/proof_sfrs.py [--cities shards/city0 shards/city1] [--seeds 0 1 2] [--nproc 2]
                               [--variants cached online bf16] [--report]

Variants (``VARIANTS``): ``cached`` (fp32 throughout, as the reference computes, cached teacher),
``online`` (the same with the reference's online teacher), ``bf16`` (cached teacher, bf16
training, extraction and search).

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
from typing import List, Optional

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
# Every variant runs the demo recipe in float32 throughout, as the reference computes (the demo
# itself extracts in bf16 where the CPU has it); each variant changes one thing.
FP32 = ["train.precision=fp32", "eval.bf16=false", "eval.bf16_search=false", "mining.bf16_search=false"]
VARIANTS = {
    "cached": FP32,                                      # the system's teacher: one cached pass per generation
    "online": FP32 + ["train.teacher=online"],           # the reference's teacher: forwarded on every batch
    "bf16": ["train.precision=bf16", "eval.bf16=true", "eval.bf16_search=true", "mining.bf16_search=true"],  # cached teacher, bf16
}


def run_dir(out: Path, variant: str, city: Path, seed: int) -> Path:
    return out / variant / city.name / f"seed{seed}"


def run_seed(seed: int, nproc: int, shards: Path, out: Path, extra) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.shards={shards}", "--set", f"run.out_dir={out}", "--set", f"train.seed={seed}",
           "--set", "eval.test_untrained=true", "--set", "eval.pca_dim=256", "--set", "eval.pca_samples=2000",
           "--set", f"tracking.run_name=proof-{out.parent.parent.name}-{out.parent.name}-seed{seed}", *extra]
    subprocess.run(cmd, check=True, cwd=REPO)


def read_run(out: Path) -> Optional[dict]:
    """Test tables per column (off, gen g, sel) and validation R@5 per generation of a finished run."""
    ckpts = out / "checkpoints"
    if not ckpts.is_dir() or latest_checkpoint(ckpts) is None:
        return None
    ck = torch.load(latest_checkpoint(ckpts), map_location="cpu", weights_only=False)
    if not ck.get("selected"):
        return None  # not finished
    cols = {"off": ck.get("untrained", {}).get("test", {})}
    cols.update({f"gen {g}": h["test"] for g, h in sorted(ck["history"].items())})
    cols["sel"] = ck["selected"]["test"]
    val = {g: h.get("best_val_r5") for g, h in sorted(ck["history"].items())}
    return {"cols": cols, "val_r5": val, "selected": ck["selected"]["generation"],
            "tied": ck["selected"].get("tied_with", [])}


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


def cell(vals: List[float]) -> str:
    return f"{np.mean(vals):7.1f} +-{np.std(vals):4.1f}" if vals else "-"


def print_table(title: str, runs: List[dict]) -> None:
    cols = list(runs[0]["cols"])
    print(f"\n{title}")
    print(f"{'test set':<16}{'condition':<10}{'N':>3}" + "".join(f"{c:>15}" for c in cols))
    for sid, cond in ROWS:
        for n in (1, 5):
            cells = []
            for c in cols:
                vals = [100 * r["cols"][c][sid][0][cond][n] for r in runs
                        if c in r["cols"] and sid in r["cols"][c] and cond in r["cols"][c][sid][0]]
                cells.append(cell(vals))
            print(f"{sid:<16}{cond:<10}{n:>3}" + "".join(f"{c:>15}" for c in cells))
    gens = sorted(runs[0]["val_r5"])
    print(f"{'validation':<16}{'all':<10}{5:>3}{'':>15}" +
          "".join(f"{cell([100 * r['val_r5'][g] for r in runs if r['val_r5'].get(g) is not None]):>15}" for g in gens))
    print("selected generation per run: " + ", ".join(
        f"{r['selected']}" + (f" (tie with {r['tied']})" if r["tied"] else "") for r in runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cities", type=Path, nargs="+", default=[REPO / "shards" / "city0", REPO / "shards" / "city1"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["cached", "online"], choices=sorted(VARIANTS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "proof")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override (every run)")
    p.add_argument("--report", action="store_true", help="run nothing: print the tables of the finished runs")
    args = p.parse_args()
    missing = [str(c) for c in args.cities if not (c / "manifest.json").is_file()]
    if missing:
        sys.exit(f"no shard set at {', '.join(missing)} (see the build commands in this script's help)")
    if not args.report:  # seeds outermost: an interrupted proof has every variant at the same seeds
        for city in args.cities:
            for seed in args.seeds:
                for v in args.variants:
                    extra = [a for s in VARIANTS[v] + args.extra for a in ("--set", s)]
                    run_seed(seed, args.nproc, city, run_dir(args.out, v, city, seed), extra)
    print("\nRecall@N (%), mean +- std over training seeds; off = untrained, gen 0 = SARE-ind, gen >= 1 = SFRS, "
          "sel = best by validation R@5; validation row: each generation's best validation R@5")
    for v in args.variants:
        both = []
        for city in args.cities:
            runs = [r for r in (read_run(run_dir(args.out, v, city, s)) for s in args.seeds) if r]
            if runs:
                print_table(f"{v}: city {city.name} ({len(runs)} seeds)", runs)
                both += runs
        if len({len(r["cols"]) for r in both}) == 1 and len(args.cities) > 1 and both:
            print_table(f"{v}: all cities ({len(both)} runs)", both)
    print("\nTeacher soft labels of the cached runs (all cached positives x 9 regions per training query):")
    for city in args.cities:
        stats = [soft_label_stats(run_dir(args.out, "cached", city, s), city) for s in args.seeds
                 if (run_dir(args.out, "cached", city, s) / "config.yaml").is_file()]
        for g in sorted(stats[0]) if stats else []:
            sims = [st[g][0] for st in stats if g in st]
            ents = [st[g][1] for st in stats if g in st]
            print(f"  {city.name} generation {g}: teacher similarity {np.mean(sims):.3f}, normalised entropy at "
                  f"tau_g {np.mean(ents):.3f} +- {np.std(ents):.3f} (1 = uniform, nothing to distil)")


if __name__ == "__main__":
    main()
