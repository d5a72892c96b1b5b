"""Build (or verify) a WebDataset shard set from a raw dataset.

    python launch/build_shards.py --dataset pitts --root /data/pitts --scale 30k \
        --out shards/pitts30k [--resize 480x640] [--shard-size 1000] [--workers 8] \
        [--verify] [--skip-bad]
    python launch/build_shards.py --out shards/pitts30k --verify      # check a built set
    python launch/build_shards.py --dataset utm --root /data/vpr/tokyo247 --out shards/tokyo247_vpr \
        [--name tokyo247]     # the @UTM-named layout of VPR-datasets-downloader (<root>/images/<split>/...)

A new set is built under ``.<out name>.partial`` beside ``--out`` and renamed to ``--out`` when
complete, so nothing half-built carries the final name (a rerun resumes the partial folder).

A rerun on the same folder keeps every shard whose checksum verifies and rebuilds missing or
corrupt ones. Exit status: 0 on success, 1 when verification finds bad shards (each named on
stderr), 2 on bad input (malformed .mat, missing or unreadable images, bad manifest).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from sfrs_dist.data.manifest import ManifestError

log = logging.getLogger("build_shards")


def parse_size(text: str) -> Tuple[int, int]:
    """``HxW`` -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x640 (HxW), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("pitts", "tokyo", "synthetic", "utm", "msls"),
                   help="raw dataset format (utm: the @UTM-named layout of VPR-datasets-downloader; "
                        "msls: Mapillary SLS's own train_val/<city>/ layout)")
    p.add_argument("--root", type=Path, help="raw dataset root folder")
    p.add_argument("--scale", default="30k", help="Pittsburgh scale: 30k or 250k")
    p.add_argument("--splits", nargs="*", default=None, help="splits to read (default: all found)")
    p.add_argument("--name", default=None,
                   help="utm: dataset name of the split ids <name>_<split> (default: the root folder's name)")
    p.add_argument("--pos-dist", type=float, default=25.0, help="utm, msls: radius of positives in metres")
    p.add_argument("--train-pos-dist", type=float, default=10.0,
                   help="utm, msls: radius of training positives in metres")
    p.add_argument("--all-queries", action="store_true",
                   help="utm, msls: msls_val keeps every query, not only the official evaluation's 740")
    p.add_argument("--cities", nargs="*", default=None, help="msls: only these cities (default: all present)")
    p.add_argument("--out", type=Path, required=True, help="shard folder, e.g. shards/pitts30k")
    p.add_argument("--resize", type=parse_size, default=None,
                   help="store JPEGs scaled to fit HxW (aspect kept); default keeps original bytes")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="builder processes")
    p.add_argument("--verify", action="store_true", help="verify the set (after building, if building)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in manifest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--upgrade", action="store_true",
                   help="rewrite the manifest of the set at --out in the current schema (shards untouched)")
    args = p.parse_args(argv)
    if (args.dataset is None) != (args.root is None):
        p.error("--dataset and --root go together")
    if args.dataset is None and not (args.verify or args.upgrade):
        p.error("give --dataset and --root to build, --verify to check a built set or --upgrade to rewrite "
                "its manifest")
    return args


def read_dataset(args: argparse.Namespace):
    """(splits, source description) of the raw dataset named on the command line."""
    if args.dataset == "utm":
        from sfrs_dist.data.vpr_layout import load_vpr_layout

        splits = load_vpr_layout(args.root, name=args.name, splits=args.splits, pos_dist_thr=args.pos_dist,
                                 train_pos_dist_thr=args.train_pos_dist, official_msls=not args.all_queries)
        for s in splits:
            missing = [r.file for r in s.database + s.queries if not Path(r.file).is_file()]
            if missing:
                raise FileNotFoundError(f"{missing[0]}: not a readable file ({len(missing)} such)")
        return splits, {"dataset": "utm", "root": str(args.root.resolve()), "name": splits[0].name}
    if args.dataset == "msls":
        from sfrs_dist.data.msls import load_msls

        splits = load_msls(args.root, splits=args.splits, cities=args.cities, pos_dist_thr=args.pos_dist,
                           train_pos_dist_thr=args.train_pos_dist, official_queries=not args.all_queries)
        return splits, {"dataset": "msls", "root": str(args.root.resolve())}
    from sfrs_dist.data.datasets import load_dataset

    splits = load_dataset(args.dataset, args.root, scale=args.scale, splits=args.splits)
    return splits, {"dataset": args.dataset, "root": str(args.root.resolve()), "scale": args.scale}


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from sfrs_dist.data.shards import BadImageError, build_shards, verify_shards

    try:
        if args.dataset is not None:
            splits, source = read_dataset(args)
            target = args.out
            staging = args.out.parent / f".{args.out.name}.partial"
            if args.out.is_dir() and not any(args.out.iterdir()):
                args.out.rmdir()  # an empty folder made beforehand: built under the staging name too
            if not args.out.exists():
                target = staging
                args.out.parent.mkdir(parents=True, exist_ok=True)
            m = build_shards(splits, target, shard_size=args.shard_size, workers=args.workers,
                             resize=args.resize, skip_bad=args.skip_bad, source=source,
                             progress=not args.no_progress)
            if target == staging:
                os.replace(staging, args.out)
            print(f"{args.out}: {len(m.shards)} shards, {len(m.index)} samples, "
                  f"{len(m.skipped)} skipped")
            for s in m.skipped:
                print(f"skipped {s['key']}: {s['error']}", file=sys.stderr)
        if args.upgrade:
            from sfrs_dist.data.manifest import SCHEMA_VERSION, Manifest

            m = Manifest.load(args.out)
            path = m.save(args.out)  # always writes the current schema
            print(f"{path}: schema {m.schema_version} -> {SCHEMA_VERSION}, {len(m.index)} samples")
        if args.verify:
            problems: List[str] = verify_shards(args.out)
            for prob in problems:
                print(f"BAD {prob}", file=sys.stderr)
            if problems:
                return 1
            print(f"{args.out}: verified")
    except (BadImageError, ManifestError, ValueError, FileNotFoundError) as e:  # DatasetFormatError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
