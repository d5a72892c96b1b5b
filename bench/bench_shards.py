"""Throughput of the shard readers against a raw image folder and in-memory decoding.

    python bench/bench_shards.py [--images 400] [--image-size 480x640] [--size 240x320]
                                 [--workers 1 2] [--repeats 3] [--source random|synthetic]

Generates its own data: JPEGs with photo-like content (smooth shapes, edges, texture noise) at
``--image-size`` (or the synthetic city at that size with ``--source synthetic``), builds a
shard set from them (builder throughput) and then measures images/s decoded and resized
(test transform) by
- shards: ``make_pass_loader`` streaming (tar parsing, manifest checks, decode, transform);
- folder: a map-style Dataset over the JPEG paths in a plain DataLoader;
- memory: the same bytes held in memory, decoded in a plain DataLoader (the decode limit);
each with the same number of DataLoader workers, best of ``--repeats`` warm runs.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from sfrs_dist.data.manifest import Manifest
from sfrs_dist.data.records import DATABASE, Record, SplitData, make_key
from sfrs_dist.data.shards import build_shards
from sfrs_dist.data.streaming import make_pass_loader
from sfrs_dist.data.transforms import eval_transform


def parse_size(text: str) -> Tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def photo_like(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth gradient sky/ground, random boxes and lines (facades, edges), mild noise."""
    y = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.uniform(60, 230, 3), rng.uniform(20, 160, 3)
    base = (top * (1 - y) + bottom * y) * np.ones((1, w, 1))
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 3), y0 + rng.integers(10, h // 3)
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(60):
        d.line([tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2)],
               fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def random_split(root: Path, n: int, size: Tuple[int, int], seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        rel = f"{i // 100:03d}/{i:06d}.jpg"
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        photo_like(rng, *size).save(f, format="JPEG", quality=90)
        recs.append(Record(key=make_key("bench", "test", DATABASE, i), name="bench", split="test",
                           role=DATABASE, index=i, relpath=rel, file=str(f), utm=(float(i), 0.0)))
    return SplitData("bench", "test", recs, [])


def synthetic_split(root: Path, n: int, size: Tuple[int, int]) -> SplitData:
    from sfrs_dist.data.datasets import load_dataset
    from sfrs_dist.data.synthetic import generate

    generate(root, preset="tiny", seed=0, image_size=size)
    split = [s for s in load_dataset("synthetic", root) if s.name == "pitts30k"][0]
    split.database = split.database[:n]
    split.queries = []
    return split


class DecodeDataset(torch.utils.data.Dataset):
    """Decode + transform from file paths (``folder``) or from bytes in memory (``memory``)."""

    def __init__(self, items: Sequence, transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        src = io.BytesIO(item) if isinstance(item, bytes) else item
        with Image.open(src) as im:
            return self.transform(im.convert("RGB"))


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def rate(make_loader: Callable, n: int, repeats: int) -> float:
    """Best images/s over ``repeats`` passes (after one warm-up pass)."""
    best = 0.0
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        count = 0
        for batch in make_loader():
            count += len(batch["key"]) if isinstance(batch, dict) else len(batch)
        dt = time.perf_counter() - t0
        if count != n:
            raise RuntimeError(f"read {count} images, expected {n}")
        if r > 0:
            best = max(best, n / dt)
    return best


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--image-size", type=parse_size, default=(480, 640), help="HxW of the JPEGs")
    p.add_argument("--size", type=parse_size, default=(240, 320), help="HxW after resize")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--source", choices=("random", "synthetic"), default="random")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.source == "synthetic":
            split = synthetic_split(tmp / "raw", args.images, args.image_size)
        else:
            split = random_split(tmp / "raw", args.images, args.image_size)
        n = len(split.database)
        files = [r.file for r in split.database]
        mean_kb = np.mean([Path(f).stat().st_size for f in files]) / 1024
        build_rates = {}
        for bw in sorted({1, args.build_workers}):
            t0 = time.perf_counter()
            build_shards([split], tmp / f"shards{bw}", shard_size=args.shard_size, workers=bw, progress=False)
            build_rates[bw] = n / (time.perf_counter() - t0)
        build_dir = tmp / f"shards{args.build_workers}"
        manifest = Manifest.load(build_dir)
        blobs = [Path(f).read_bytes() for f in files]
        tf = eval_transform(*args.size)
        group = f"{split.name}_{split.split}_db"

        print(f"{n} JPEGs {args.image_size[0]}x{args.image_size[1]} (mean {mean_kb:.0f} KiB), "
              f"resize to {args.size[0]}x{args.size[1]}, batch {args.batch_size}")
        for bw, r in build_rates.items():
            print(f"builder: {r:.0f} images/s with {bw} worker(s) (decode check + tar write + sha256, "
                  f"{len(manifest.shards)} shards; includes process start-up)")
        print(f"{'workers':>7} {'shards':>9} {'folder':>9} {'memory':>9} {'shards/folder':>14} {'shards/memory':>14}")
        for w in args.workers:
            def plain(items, w=w):
                return torch.utils.data.DataLoader(DecodeDataset(items, tf), batch_size=args.batch_size,
                                                   num_workers=w, worker_init_fn=_init_worker)

            r_sh = rate(lambda w=w: make_pass_loader(manifest, group, tf, args.batch_size, w, rank=0,
                                                     world_size=1), n, args.repeats)
            r_fo = rate(lambda: plain(files), n, args.repeats)
            r_me = rate(lambda: plain(blobs), n, args.repeats)
            print(f"{w:>7} {r_sh:>9.1f} {r_fo:>9.1f} {r_me:>9.1f} {r_sh / r_fo:>14.2f} {r_sh / r_me:>14.2f}")


if __name__ == "__main__":
    main()
