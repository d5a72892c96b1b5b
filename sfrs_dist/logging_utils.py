"""Logging set-up: rank 0 logs at INFO, other ranks only warnings, every line tagged by rank."""

from __future__ import annotations

import logging
import sys

from . import distributed as du


def setup_logging(level: int = logging.INFO) -> None:
    rank = du.get_rank()
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level if rank == 0 else logging.WARNING, format=fmt, force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
