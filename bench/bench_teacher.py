"""Teacher forwards per generation: cached teacher pass vs. a teacher forward at every step.

The reference recomputes the teacher's region similarities at every training step on the
query and its difficult positives (plus positive and negatives as part of the tuple: 11
images per tuple with 10 difficult positives at most); the cached pass forwards every
training query and database image once per generation. This script runs a real teacher
pass on the tiny synthetic config (generating data and a generation-0 checkpoint if
needed) and prints both counts, the ratio, and the wall time of the cached pass against
the time the per-step forwards take on the same network.

    python bench/bench_teacher.py [--work /tmp/sfrs-bench-teacher]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sfrs_dist.config import load_config  # noqa: E402
from sfrs_dist.data.manifest import Manifest  # noqa: E402
from sfrs_dist.data.transforms import eval_transform  # noqa: E402
from sfrs_dist.teacher import load_network, run_teacher_pass  # noqa: E402
from sfrs_dist.training.trainer import TrainSplit  # noqa: E402


def prepare(work: Path) -> Path:
    raw, shards, run = work / "raw", work / "shards", work / "run"
    py = sys.executable
    if not (raw / "synthetic_summary.json").exists():
        subprocess.run([py, str(REPO / "launch/make_synthetic.py"), "--out", str(raw), "--preset", "tiny"], check=True)
    if not (shards / "manifest.json").exists():
        subprocess.run([py, str(REPO / "launch/build_shards.py"), "--dataset", "synthetic", "--root", str(raw),
                        "--out", str(shards), "--shard-size", "16"], check=True)
    if not (run / "checkpoints" / "generation00_final.pt").exists():
        subprocess.run([py, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/tiny.yaml"),
                        "--set", f"data.shards={shards}", "--set", f"run.out_dir={run}",
                        "--set", "train.generations=1"], check=True)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/sfrs-bench-teacher"))
    p.add_argument("--epochs", type=int, default=5, help="epochs per generation (reference: 5)")
    p.add_argument("--per-tuple", type=int, default=11, help="teacher images per tuple at every step (reference: 11)")
    args = p.parse_args()
    run = prepare(args.work)
    cfg = load_config(REPO / "configs/tiny.yaml", [f"data.shards={args.work / 'shards'}", f"run.out_dir={run}"])
    manifest = Manifest.load(Path(cfg.data.shards))
    train = TrainSplit.from_manifest(manifest, cfg.data.train_set)
    teacher_ckpt = run / "checkpoints" / "generation00_final.pt"
    cache_dir = args.work / f"cache-{time.time_ns()}"
    device = torch.device("cpu")

    t0 = time.time()
    run_teacher_pass(cfg, manifest, train.train_pos, teacher_ckpt, cache_dir, device)
    cached_s = time.time() - t0
    cached_forwards = len(train.q_keys) + len(train.db_keys)

    epochs, per_tuple = args.epochs, args.per_tuple
    tuples_per_epoch = len(train.queries)
    step_forwards = epochs * tuples_per_epoch * per_tuple
    # time those per-step forwards on the same network (one epoch's worth, extrapolated)
    net = load_network(cfg, teacher_ckpt, device)
    h, w = cfg.data.image_size
    x = eval_transform(h, w)(Image.new("RGB", (w, h))).unsqueeze(0)
    batch = x.repeat(per_tuple, 1, 1, 1)
    t0 = time.time()
    with torch.no_grad():
        for _ in range(tuples_per_epoch):
            net(batch, regions=True)
    step_s = (time.time() - t0) * epochs

    print(f"training split {cfg.data.train_set}: {len(train.queries)} training queries, "
          f"{len(train.db_keys)} database images, {epochs} epochs per generation, {per_tuple} teacher images per tuple")
    print(f"teacher forwards per generation: cached pass {cached_forwards}, per-step {step_forwards} "
          f"-> {step_forwards / cached_forwards:.1f}x fewer")
    print(f"teacher wall time per generation: cached pass {cached_s:.1f} s (incl. I/O), per-step forwards "
          f"{step_s:.1f} s -> {step_s / max(cached_s, 1e-9):.1f}x")
    print(f"(at the reference scale, Pitts30k-train: 7,416 + 10,000 images once vs. "
          f"{5 * 7320 * 11:,} per-step forwards over 5 epochs = {5 * 7320 * 11 / 17416:.1f}x)")


if __name__ == "__main__":
    main()
