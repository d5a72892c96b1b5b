"""Raw-pixel baseline on a synthetic-city dataset: Recall@1/5 of a trivial descriptor.

The descriptor is the grey image downsampled to 12x16, mean-subtracted and L2-normalised,
retrieved by cosine similarity (faiss IndexFlatIP); ground truth is 25 m, Tokyo with spatial
NMS per panorama. ``chance@1`` is the Recall@1 of a random ranking.

    python bench/baseline_rawpixel.py --root data/synthetic
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sfrs_dist.data.synthetic import raw_pixel_baseline


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder written by launch/make_synthetic.py")
    args = p.parse_args()
    results = raw_pixel_baseline(args.root, ns=(1, 5))
    print(f"{'query set':<18}{'queries':>8}{'R@1':>8}{'R@5':>8}{'chance@1':>10}")
    for name, rec in results.items():
        print(f"{name:<18}{rec['queries']:>8.0f}{rec['R@1']:>8.1f}{rec['R@5']:>8.1f}{rec['chance@1']:>10.1f}")


if __name__ == "__main__":
    main()
