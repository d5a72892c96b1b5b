"""Draw retrieval results (and 9-region similarity heat maps) for chosen queries.

Inputs: the WebDataset shards holding the images, and a descriptor file (``.npz``) with
``db`` (G, D), ``queries`` (Q, D), ``db_keys``, ``query_keys``, ``db_utm`` (G, 2) and
``query_utm`` (Q, 2). Optionally ``--regions`` (``.npz`` with ``keys`` (n,) and ``regions``
(n, 9, D)) adds heat maps of the query against its correct retrievals.

    python launch/visualize.py --shards shards/pitts30k --descriptors desc.npz \
        --queries 0 10 20 --topk 5 --out vis/
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from sfrs_dist.evaluation.visualize import load_shard_images, visualize_queries

DESCRIPTOR_ARRAYS = ("db", "queries", "db_keys", "query_keys", "db_utm", "query_utm")


def shard_paths(shards: Sequence[str], manifest: Optional[str]) -> List[str]:
    """Tar files from directories/files given, or from the folder of the manifest."""
    roots = list(shards) + ([os.path.dirname(os.path.abspath(manifest))] if manifest else [])
    paths: List[str] = []
    for root in roots:
        paths += sorted(glob.glob(os.path.join(root, "*.tar"))) if os.path.isdir(root) else [root]
    if not paths:
        raise FileNotFoundError(f"no .tar shards under {roots}")
    return paths


def load_npz(path: str, required: Sequence[str]) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        missing = [name for name in required if name not in f.files]
        if missing:
            raise KeyError(f"{path} lacks array(s) {missing}; expected {list(required)}")
        return {name: f[name] for name in f.files}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="*", default=[], help="shard directories or .tar files")
    p.add_argument("--manifest", default=None, help="manifest.json; its folder holds the shards")
    p.add_argument("--descriptors", required=True, help=".npz with " + ", ".join(DESCRIPTOR_ARRAYS))
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--queries", type=int, nargs="+", help="query row indices")
    sel.add_argument("--query-keys", nargs="+", help="query sample keys")
    p.add_argument("--regions", default=None, help=".npz with keys (n,) and regions (n, 9, D)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--radius", type=float, default=25.0, help="ground-truth radius in metres")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    logging.getLogger(__name__).info("command line: %s", " ".join(sys.argv if argv is None else argv))
    d = load_npz(args.descriptors, DESCRIPTOR_ARRAYS)
    query_keys = [str(k) for k in d["query_keys"]]
    if args.query_keys:
        pos = {k: i for i, k in enumerate(query_keys)}
        unknown = [k for k in args.query_keys if k not in pos]
        if unknown:
            raise KeyError(f"query keys not in {args.descriptors}: {unknown}")
        indices = [pos[k] for k in args.query_keys]
    else:
        indices = args.queries
    regions = None
    if args.regions:
        r = load_npz(args.regions, ("keys", "regions"))
        regions = {str(k): v for k, v in zip(r["keys"], r["regions"])}
    paths = shard_paths(args.shards, args.manifest)
    written = visualize_queries(
        indices, d["queries"], d["db"], d["query_utm"], d["db_utm"], query_keys,
        [str(k) for k in d["db_keys"]], lambda keys: load_shard_images(paths, keys), args.out,
        k=args.topk, radius=args.radius, regions=regions,
    )
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
