"""What reading Mapillary SLS and writing its manifest cost at scale, without the images.

    python bench/bench_msls_manifest.py [--images 200000] [--cities 4]

Writes MSLS's csv files (``train_val/<city>/{query,database}/postprocessed.csv``, ``raw.csv``) for
``--images`` images over ``--cities`` training cities (10% queries, 5% panoramas), then times
``load_msls`` (csv -> records, image check off), the manifest columns of the splits
(``RoleEntry.from_records``) and their JSON text, and reports the peak memory (ru_maxrss) and the
JSON size per image, to extrapolate to MSLS's 1.6 M images.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sfrs_dist.data.manifest import RoleEntry
from sfrs_dist.data.msls import TRAIN_CITIES, load_msls


def write_city(folder: Path, n: int, rng: np.random.Generator) -> None:
    for role, count in (("database", n - n // 10), ("query", n // 10)):
        d = folder / role
        d.mkdir(parents=True)
        keys = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789"), 22)) for _ in range(count)]
        east = 500000 + rng.uniform(0, 5000, count)
        north = 5000000 + rng.uniform(0, 5000, count)
        with open(d / "postprocessed.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "key", "easting", "northing", "night", "control_panel", "view_direction", "unique_cluster"])
            for i in range(count):
                w.writerow([i, keys[i], east[i], north[i], i % 9 == 0, False, "Forward", 0])
        with open(d / "raw.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "key", "lon", "lat", "ca", "captured_at", "pano"])
            for i in range(count):
                w.writerow([i, keys[i], 12.5, 55.6, 90.0, "2016-05-01 10:00:00", i % 20 == 0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200000)
    p.add_argument("--cities", type=int, default=4)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for city in TRAIN_CITIES[: args.cities]:
            write_city(Path(tmp) / "train_val" / city, args.images // args.cities, rng)
        t0 = time.perf_counter()
        (split,) = load_msls(tmp, splits=["train"], check_files=False)
        t1 = time.perf_counter()
        cols = {"database": RoleEntry.from_records(split.database), "queries": RoleEntry.from_records(split.queries)}
        t2 = time.perf_counter()
        text = json.dumps({k: asdict(v) for k, v in cols.items()}, separators=(",", ":"))
        t3 = time.perf_counter()
        pos = split.training_positives()
        t4 = time.perf_counter()
    n = len(split.database) + len(split.queries)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} images kept ({len(split.database)} database, {len(split.queries)} queries; panoramas left out)")
    print(f"read csv -> records  {t1 - t0:7.2f} s   ({n / (t1 - t0):,.0f} images/s)")
    print(f"manifest columns     {t2 - t1:7.2f} s")
    print(f"manifest JSON text   {t3 - t2:7.2f} s   {len(text) / 1e6:.1f} MB ({len(text) / n:.0f} bytes/image)")
    print(f"training positives   {t4 - t3:7.2f} s   ({sum(len(q) > 0 for q in pos)} queries with one)")
    print(f"peak memory          {peak_mb:7.0f} MB ({peak_mb * 1e6 / n / 1e3:.1f} kB/image)")
    scale = 1.6e6 / n
    print(f"at 1.6 M images (x{scale:.1f}, linear): read {scale * (t1 - t0):.0f} s, JSON {scale * len(text) / 1e9:.2f} GB "
          f"of columns (+ the index), peak memory ~{scale * peak_mb / 1e3:.1f} GB")


if __name__ == "__main__":
    main()
