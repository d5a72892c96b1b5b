"""Run (or reuse) the teacher pass of a generation on its own.

``torchrun --nproc_per_node G launch/teacher.py --config FILE --generation G [--set ...]``
uses ``<run.out_dir>/checkpoints/generation<G-1>_final.pt`` as the teacher (or
``--teacher FILE``) and fills ``<run.out_dir>/cache``; ``launch/train.py`` runs the same
pass as a stage before every generation >= 1 and finds the cache filled.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from sfrs_dist import distributed as du
from sfrs_dist.config import load_config_for_launch
from sfrs_dist.data.manifest import Manifest
from sfrs_dist.logging_utils import setup_logging
from sfrs_dist.teacher import run_teacher_pass
from sfrs_dist.training.trainer import TrainSplit

log = logging.getLogger("teacher")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--generation", type=int, required=True, help="generation (>= 1) whose soft labels to compute")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: previous generation's final)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config_for_launch(args.config, args.overrides)  # validated before any work
    if cfg is None:
        return 2
    if args.generation < 1:
        print("--generation must be >= 1 (generation 0 has no teacher)", file=sys.stderr)
        return 2
    if cfg.train.teacher == "online":
        print("train.teacher is online: the teacher runs inside the training steps and has no cache to fill "
              "(set train.teacher=cached to use this pass)", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.out_dir)
    teacher = Path(args.teacher or run_dir / "checkpoints" / f"generation{args.generation - 1:02d}_final.pt")
    info = du.init_distributed(timeout_s=cfg.run.dist_timeout_s)
    setup_logging()
    try:
        manifest = Manifest.load(Path(cfg.data.shards))
        train = TrainSplit.from_manifest(manifest, cfg.data.train_set)
        _, key = run_teacher_pass(cfg, manifest, train.train_pos, teacher, run_dir / "cache", info.device)
        log.info("teacher cache ready: %s", key)
    finally:
        du.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
