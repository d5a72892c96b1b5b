"""Step time of an SFRS training step: cached soft labels against the online teacher.

Both steps run the same student forward, loss, backward and SGD step on the same batch of
tuples (query, positive, negatives, difficult positives); ``cached`` takes the teacher's
similarities from an array (what ``train.teacher: cached`` does after its one pass per
generation), ``online`` forwards the teacher on the batch's query and difficult positives
under ``no_grad`` (``train.teacher: online``, the reference's way). Steps alternate so both
see the same machine load; the median step times and their ratio are printed.

    python bench/bench_online_teacher.py                       # the demo's network and tuples
    python bench/bench_online_teacher.py --backbone vgg16 --weights none --clusters 64 \
        --size 240 320 --negatives 10 --difficult 10           # reference shapes at half size
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sfrs_dist.config import LossConfig  # noqa: E402
from sfrs_dist.models import build_model  # noqa: E402
from sfrs_dist.training.engine import build_engine  # noqa: E402
from sfrs_dist.training.step_loss import online_soft_targets, step_loss  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="'none' for random weights")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[96, 128])
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--difficult", type=int, default=5)
    p.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one rank's share of the cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = None if args.weights == "none" else args.weights
    student = build_model(args.backbone, weights=weights, num_clusters=args.clusters)
    teacher = build_model(args.backbone, weights=weights, num_clusters=args.clusters).requires_grad_(False).eval()
    engine = build_engine("ddp", student, torch.device("cpu"), lr=1e-3, momentum=0.9, weight_decay=1e-3)
    engine.train(True)
    tuples = [{"query": 0, "positive": 0, "negatives": list(range(args.negatives)),
               "num_negatives": args.negatives, "difficult": list(range(args.difficult))}]
    n = 2 + args.negatives + args.difficult
    images = torch.randn(n, 3, *args.size) * 60
    with torch.no_grad():
        cached = online_soft_targets(teacher, images, tuples)  # what the cache would hold
    loss_cfg = LossConfig()

    def step(online: bool) -> float:
        t0 = time.perf_counter()
        soft = online_soft_targets(teacher, images, tuples) if online else cached
        loss, _ = step_loss(engine.forward(images, regions=True), tuples, 1, loss_cfg, 0.07, 0.07, soft)
        engine.backward_step(loss)
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.steps):
        for online in (False, True):
            times[online].append(step(online))
    c, o = statistics.median(times[False]), statistics.median(times[True])
    print(f"CPU: {cpu_name()}, {args.threads} thread(s); {args.backbone} K={args.clusters} at "
          f"{args.size[0]}x{args.size[1]}, {n} images per tuple ({args.difficult} difficult positives)")
    print(f"cached soft labels: {1000 * c:8.1f} ms/step (median of {args.steps})")
    print(f"online teacher:     {1000 * o:8.1f} ms/step (median of {args.steps}); "
          f"teacher forwards {1 + args.difficult} images per tuple")
    print(f"online / cached:    {o / c:8.2f}x")


if __name__ == "__main__":
    main()
