"""Does SFRS beat its SARE baseline on the synthetic city? Recall@1 per generation, 3 seeds.

Runs the demo job (``configs/demo.yaml``: generation 0 = SARE-ind, then SFRS generations)
once per training seed on the demo city and prints Recall@1/5 per generation on the
Pittsburgh-style test split and on the Tokyo-style queries by light condition, averaged over
the seeds (mean and standard deviation). Checkpoints are picked by nothing: every
generation's final network is evaluated, so the test split plays no part in any choice.

    python bench/proof_sfrs.py [--seeds 0 1 2] [--nproc 2] [--shards shards/synthetic-demo]

Needs the demo shards (``bash launch/demo.sh`` builds them). Each seed takes roughly as long
as the demo's training; a finished seed is reused on rerun (the job resumes).
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

from sfrs_dist import teacher_cache as tc  # noqa: E402
from sfrs_dist.config import load_config  # noqa: E402
from sfrs_dist.data.manifest import Manifest  # noqa: E402
from sfrs_dist.training.checkpoint import latest_checkpoint  # noqa: E402

ROWS = [("pitts30k_test", "all"), ("tokyo247_test", "all"), ("tokyo247_test", "day"),
        ("tokyo247_test", "sunset"), ("tokyo247_test", "night")]


def run_seed(seed: int, nproc: int, shards: Path, out_root: Path, extra) -> dict:
    out = out_root / f"seed{seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.shards={shards}", "--set", f"run.out_dir={out}", "--set", f"train.seed={seed}",
           "--set", f"tracking.run_name=proof-seed{seed}", *extra]
    subprocess.run(cmd, check=True, cwd=REPO)
    ck = torch.load(latest_checkpoint(out / "checkpoints"), map_location="cpu", weights_only=False)
    return ck["history"]


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--shards", type=Path, default=REPO / "shards" / "synthetic-demo")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "proof")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = p.parse_args()
    extra = [a for s in args.extra for a in ("--set", s)]
    histories = [run_seed(s, args.nproc, args.shards, args.out, extra) for s in args.seeds]
    gens = sorted(histories[0])
    print(f"\nRecall@N (%) on the synthetic city, mean +- std over seeds {args.seeds}; generation 0 = SARE-ind")
    print(f"{'test set':<16}{'condition':<10}{'N':>3}" + "".join(f"{'gen ' + str(g):>16}" for g in gens))
    for sid, cond in ROWS:
        for n in (1, 5):
            cells = []
            for g in gens:
                vals = [100 * h[g]["test"][sid][0][cond][n] for h in histories
                        if sid in h[g]["test"] and cond in h[g]["test"][sid][0]]
                cells.append(f"{np.mean(vals):8.1f} +-{np.std(vals):4.1f}" if vals else f"{'-':>16}")
            print(f"{sid:<16}{cond:<10}{n:>3}" + "".join(f"{c:>16}" for c in cells))
    stats = [soft_label_stats(args.out / f"seed{s}", args.shards) for s in args.seeds]
    print("\nTeacher soft labels (all cached positives x 9 regions per training query), mean over seeds:")
    for g in sorted(stats[0]):
        sims = [st[g][0] for st in stats if g in st]
        ents = [st[g][1] for st in stats if g in st]
        print(f"  generation {g}: teacher similarity {np.mean(sims):.3f}, normalised entropy at tau_g "
              f"{np.mean(ents):.3f} +- {np.std(ents):.3f} (1 = uniform, nothing to distil)")


if __name__ == "__main__":
    main()
