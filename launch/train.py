"""Train SFRS: ``torchrun [--nnodes N --nproc_per_node G ...] launch/train.py --config FILE [--set a.b=v ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from sfrs_dist import distributed as du
from sfrs_dist.config import ConfigError, load_config
from sfrs_dist.logging_utils import setup_logging
from sfrs_dist.training.trainer import Trainer

log = logging.getLogger("train")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML run file (states only what differs from defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any process group or work
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    info = du.init_distributed(timeout_s=cfg.run.dist_timeout_s)
    setup_logging()
    log.info("command: %s", " ".join(sys.argv))
    log.info("world size %d, backend %s, device %s", info.world_size, info.backend, info.device)
    try:
        Trainer(cfg, info.device).run()
    finally:
        du.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
