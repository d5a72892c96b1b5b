"""Generate the synthetic-city Pittsburgh and Tokyo 24/7 datasets.

python launch/make_synthetic.py --out data/synthetic --preset tiny --seed 0 [--workers N] [--places N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from sfrs_dist.data.synthetic import PRESETS, generate

logger = logging.getLogger("make_synthetic")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (gets pitts/ and tokyo247/)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="dataset size preset")
    p.add_argument("--seed", type=int, default=0, help="seed of the city, cameras and noise")
    p.add_argument(
        "--workers", type=int, default=1, help="rendering processes (output does not depend on it)"
    )
    p.add_argument(
        "--places", type=int, default=None, help="Pittsburgh database places (rescales every count)"
    )
    p.add_argument(
        "--image-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"), help="image size"
    )
    p.add_argument(
        "--query-views", type=int, default=None, help="views rendered per Pittsburgh query position"
    )
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    logger.info("command line: %s", " ".join(sys.argv if argv is None else ["make_synthetic.py", *argv]))
    overrides = {}
    if args.places is not None:
        overrides["places"] = args.places
    if args.query_views is not None:
        overrides["query_views"] = args.query_views
    summary = generate(
        args.out,
        preset=args.preset,
        seed=args.seed,
        image_size=tuple(args.image_size),
        workers=args.workers,
        progress=True,
        **overrides,
    )
    logger.info("summary:\n%s", json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
