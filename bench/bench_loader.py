"""Training input pipeline against the training step, on this machine's CPU, in one run.

    python bench/bench_loader.py [--workers N] [--tuples 48] [--threads T] [--jitter-on-device]

Generates the ``tiny`` synthetic city in a temporary folder, builds its shards, and mines
nothing: tuples are drawn from the ground truth as the demo's would look (query, positive,
``mining.num_negatives`` negatives, up to ``mining.num_difficult`` difficult positives). With
the model, input size, tuple shape and precision of configs/demo.yaml (EfficientNet-Lite0,
96x128) it measures, each after a warm-up,

- loader: tuples/s of the training-tuple loader alone (``TupleLoader``, random reads from the
  shards, decode, colour jitter, resize; persistent workers, one subset per pass);
- step: tuples/s of the training step alone (forward + backward + SGD step on batches
  already in memory, the SARE-ind loss);

and prints both, their ratio and the CPU (``lscpu`` model name). A ratio above 1 means the
loader keeps up with the step. About a minute on 2 cores (``--step-seconds`` bounds the step's
part). Both figures depend on what else the cores run: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sfrs_dist.config import load_config  # noqa: E402
from sfrs_dist.data.datasets import load_dataset  # noqa: E402
from sfrs_dist.data.manifest import Manifest  # noqa: E402
from sfrs_dist.data.shards import build_shards  # noqa: E402
from sfrs_dist.data.synthetic import generate  # noqa: E402
from sfrs_dist.data.transforms import DeviceColorJitter  # noqa: E402
from sfrs_dist.losses import tuple_loss  # noqa: E402
from sfrs_dist.mining.tuples import TrainingTuple  # noqa: E402
from sfrs_dist.models import build_model  # noqa: E402
from sfrs_dist.training.engine import build_engine  # noqa: E402
from sfrs_dist.training.trainer import TrainSplit  # noqa: E402
from sfrs_dist.training.tuples_data import TupleImages, TupleLoader  # noqa: E402

log = logging.getLogger("bench_loader")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_tuples(split: TrainSplit, n: int, negatives: int, difficult: int, seed: int = 0) -> List[TrainingTuple]:
    rng = np.random.default_rng(seed)
    out = []
    for q in np.resize(split.queries, n):
        near = set(int(j) for j in split.potential[q])
        far = [int(j) for j in rng.permutation(len(split.db_keys)) if int(j) not in near][:negatives]
        pos = split.train_pos[q]
        out.append(TrainingTuple(int(q), int(pos[0]), np.asarray(far), np.asarray(pos[1:1 + difficult])))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default: the demo's data.train_workers, else data.num_workers)")
    p.add_argument("--tuples", type=int, default=48, help="tuples per measured pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the step (default: torch's)")
    p.add_argument("--step-seconds", type=float, default=20.0,
                   help="time spent measuring the step (at least 3 steps, at most one per loaded batch)")
    p.add_argument("--jitter-on-device", action="store_true",
                   help="the loader only resizes; the step includes DeviceColorJitter")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "configs" / "demo.yaml")
    d, m = cfg.data, cfg.model
    workers = args.workers if args.workers is not None else (d.num_workers if d.train_workers is None
                                                             else d.train_workers)
    h, w = (int(v) for v in d.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.time()
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        generate(raw, preset="tiny", seed=0)
        build_shards(load_dataset("synthetic", raw), shards, shard_size=64, workers=1, progress=False)
        manifest = Manifest.load(shards)
        split = TrainSplit.from_manifest(manifest, d.train_set)
        log.info("synthetic shards in %.1f s: %d training queries, %d database images", time.time() - t0,
                 len(split.q_keys), len(split.db_keys))
        tuples = make_tuples(split, args.tuples, cfg.mining.num_negatives, cfg.mining.num_difficult)
        per_tuple = np.mean([2 + len(t.negatives) + len(t.difficult_positives) for t in tuples])
        bs = cfg.train.batch_size

        ds = TupleImages(shards, split.q_keys, split.db_keys, d.image_size, d.color_jitter,
                         jitter_on_device=args.jitter_on_device)
        with TupleLoader(ds, bs, workers) as loader:
            list(loader.subset(tuples[:max(4, workers * 2)], seed=0))  # workers started, files open
            t0 = time.time()
            batches = list(loader.subset(tuples, seed=1))
            load_rate = len(tuples) / (time.time() - t0)

        torch.manual_seed(0)
        net = build_model(m.backbone, weights=m.weights, num_clusters=m.num_clusters, trainable=m.trainable,
                          layer=m.layer, checkpointing=m.grad_checkpointing, input_norm=m.input_norm,
                          freeze_batchnorm=m.freeze_batchnorm)  # as model_init.build_student
        precision = "fp32" if cfg.train.precision == "auto" else cfg.train.precision
        engine = build_engine("ddp", net, torch.device("cpu"), cfg.train.lr, cfg.train.momentum,
                              cfg.train.weight_decay, precision)
        engine.train(True)
        jitter = DeviceColorJitter(d.color_jitter) if args.jitter_on_device else None

        def step(batch) -> None:
            images = batch["images"] if jitter is None else jitter(batch["images"])
            r = engine.forward(images, regions=True)
            q, pos, negs, off = [], [], [], 0
            for t in batch["tuples"]:
                n = t["num_negatives"]
                q.append(r[off, 0])
                pos.append(r[off + 1, 0])
                negs.append(r[off + 2:off + 2 + n, 0])
                off += 2 + n + len(t["difficult"])
            loss = tuple_loss(torch.stack(q), torch.stack(pos), torch.stack(negs), kind=cfg.loss.kind,
                              temp=cfg.loss.temperatures[0], margin=cfg.loss.hinge_margin)
            engine.backward_step(loss)

        for batch in batches[:2]:  # warm-up (allocator, oneDNN primitives)
            step(batch)
        t0 = time.time()
        done = 0
        for batch in batches:
            step(batch)
            done += len(batch["tuples"])
            if done >= 3 * bs and time.time() - t0 >= args.step_seconds:
                break
        step_rate = done / (time.time() - t0)

    ratio = load_rate / step_rate
    jit = "jitter on the step's device" if args.jitter_on_device else "jitter in the loader"
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs; step on {torch.get_num_threads()} torch threads)")
    print(f"demo tuples: {per_tuple:.1f} images of {h}x{w}, batch {bs}, {m.backbone} {precision}, {jit}")
    print(f"loader alone: {load_rate:8.2f} tuples/s ({workers} workers)")
    print(f"step alone:   {step_rate:8.2f} tuples/s (forward + backward + SGD)")
    print(f"loader / step: {ratio:.2f} ({'the loader keeps up' if ratio >= 1 else 'the loader is the bottleneck'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
