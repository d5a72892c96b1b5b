"""The whole job at real sizes, and the manifest at MSLS size.

    python bench/bench_job.py job --scale 0.25          # 1/4 of Pitts250k + Tokyo 24/7, 2 ranks
    python bench/bench_job.py job --scale 1.0           # full size (hours on 2 CPU cores)
    python bench/bench_job.py manifest --entries 1600000

``job``: a shard set of tiny synthetic JPEGs (unique random content, ``--image-size``) with the
split sizes of Pitts250k (train 91,464 database + 7,824 queries, val 78,648 + 7,608, test
83,952 + 8,280) and a Tokyo 24/7-size test set (75,984 + 315), all times ``--scale``; then
``launch/train.py`` under torchrun on 2 ranks with ``smallcnn``: 2 generations (so a teacher
pass), one epoch each, ``--subsets`` cache subsets per epoch (refresh with re-ranking each),
``--steps`` training steps per subset, validation, the test sets and the PCA fit. Every rank
records each phase's wall time and peak resident memory (``<run>/stages/rank<r>.jsonl``);
printed per stage, with the data building time.

``manifest``: a ``manifest.json`` of ``--entries`` samples (MSLS-like keys and paths), then
``Manifest.load`` and ``split_data`` of the largest split in 2 processes at once, as every
rank does: time and peak memory of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sfrs_dist.data.records import DATABASE, QUERY, Record, SplitData, make_key  # noqa: E402
from sfrs_dist.training.watchdog import PHASES  # noqa: E402

#: (name, split) -> (database, queries) at full size
SIZES = {
    ("pitts250k", "train"): (91464, 7824),
    ("pitts250k", "val"): (78648, 7608),
    ("pitts250k", "test"): (83952, 8280),
    ("tokyo247", "test"): (75984, 315),
}


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    base = rng.integers(0, 256, size=(max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_split(root: Path, name: str, split: str, n_db: int, n_q: int, size: Tuple[int, int],
               seed: int) -> SplitData:
    """Database images 4 to a place, places 6 m apart on a line; queries near random places."""
    rng = np.random.default_rng(seed)
    recs: Dict[str, List[Record]] = {}
    places = max(n_db // 4, 1)
    q_place = rng.integers(0, places, n_q)
    for role, n in ((DATABASE, n_db), (QUERY, n_q)):
        out = []
        for i in range(n):
            rel = f"{role}/{i // 1000:03d}/{i:07d}.jpg"
            f = root / name / split / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(_jpeg(rng, *size))
            x = 6.0 * (i // 4) if role == DATABASE else 6.0 * q_place[i] + rng.normal(0, 2)
            cond = ("day", "sunset", "night")[i % 3] if name == "tokyo247" and role == QUERY else None
            out.append(Record(key=make_key(name, split, role, i), name=name, split=split, role=role, index=i,
                              relpath=rel, file=str(f), utm=(500000.0 + x, 4400000.0 + (i % 4 if role == DATABASE
                                                                                       else rng.normal(0, 2))),
                              condition=cond))
        recs[role] = out
    return SplitData(name=name, split=split, database=recs[DATABASE], queries=recs[QUERY])


def build(work: Path, scale: float, size: Tuple[int, int]) -> Tuple[Path, float]:
    from sfrs_dist.data.shards import build_shards

    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards, 0.0
    t0 = time.time()
    splits = [make_split(work / "raw", n, s, max(int(db * scale), 8), max(int(q * scale), 4), size, seed)
              for seed, ((n, s), (db, q)) in enumerate(SIZES.items())]
    build_shards(splits, shards, shard_size=1000, workers=2, progress=False, source={"dataset": "bench_job"})
    return shards, time.time() - t0


def run_job(args) -> None:
    if args.report:
        report(Path(args.report))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_job_"))
    size = tuple(int(v) for v in args.image_size.split("x"))
    shards, build_s = build(work, args.scale, size)
    out = work / f"run_{time.strftime('%H%M%S')}"
    n_train_q = max(int(SIZES[("pitts250k", "train")][1] * args.scale), 4)
    subset = -(-n_train_q // args.subsets)
    sets = [f"data.shards={shards}", f"run.out_dir={out}", "data.train_set=pitts250k_train",
            "data.val_set=pitts250k_val", "data.test_sets=[pitts250k_test,tokyo247_test]",
            f"data.image_size=[{-(-size[0] // 16) * 16},{-(-size[1] // 16) * 16}]",  # region split: multiples of 16 "data.num_workers=1", "data.extract_batch_size=64",
            "model.backbone=smallcnn", "model.num_clusters=16", "train.generations=2", "train.epochs=1",
            f"train.max_steps_per_epoch={args.steps * args.subsets}", f"mining.cache_subset_size={subset}",
            "eval.pca_dim=64", "eval.pca_samples=10000", "run.dist_timeout_s=3600"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    t0 = time.time()
    with open(work / "job.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    if rc != 0:
        sys.exit(f"job failed ({rc}); see {work / 'job.log'}")
    images = {f"{n}_{s}": (int(db * args.scale), int(q * args.scale)) for (n, s), (db, q) in SIZES.items()}
    print(f"scale {args.scale}: {json.dumps(images)}; images {size[0]}x{size[1]}; 2 ranks; "
          f"data built in {build_s:.0f} s; job wall time {wall:.0f} s")
    report(out)


def report(out: Path) -> None:
    """Per stage: count, total and mean seconds (max over ranks), peak memory per rank; the
    refresh split by generation (0: no re-ranking; 1+: re-ranking for difficult positives)."""
    rows: Dict[str, Dict[int, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted((out / "stages").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["phase"] == "refresh":  # generation 0 mines without re-ranking the difficult positives
                r["phase"] = "refresh g0" if r["where"].startswith("generation 0 ") else "refresh g1+"
            rows[r["phase"]][r["rank"]].append(r)
    print(f"{'stage':<14}{'count':>6}{'total s':>10}{'mean s':>9}  peak RSS per rank (MB)")
    order = [p for p in PHASES if p != "refresh"]
    order[1:1] = ["refresh g0", "refresh g1+"]
    for phase in sorted(rows, key=lambda p: order.index(p) if p in order else len(order)):
        ranks = rows[phase]
        count = max(len(v) for v in ranks.values())
        total = max(sum(r["seconds"] for r in v) for v in ranks.values())
        peaks = " ".join(f"r{k}:{max(r['peak_rss_mb'] for r in v):.0f}" for k, v in sorted(ranks.items()))
        print(f"{phase:<14}{count:>6}{total:>10.1f}{total / count:>9.2f}  {peaks}")


def write_manifest(path: Path, entries: int) -> None:
    """A schema-valid manifest of ``entries`` samples in one split (MSLS-like keys, paths, UTMs)."""
    from sfrs_dist.data.manifest import SCHEMA_VERSION

    rng = np.random.default_rng(0)
    n_q = entries // 10
    split = {"name": "msls", "split": "train", "pos_dist_thr": 25.0, "nontriv_pos_dist_sq_thr": 100.0,
             "exclude_same_timestamp": False}
    shards, index, groups = {}, {}, {}
    for role, field, n in ((DATABASE, "database", entries - n_q), (QUERY, "queries", n_q)):
        keys = [make_key("msls", "train", role, i) for i in range(n)]
        utm = np.round(rng.uniform(0, 1e5, (n, 2)) + [5e5, 4.4e6], 2).tolist()
        split[field] = {"keys": keys, "index": list(range(n)),
                        "relpath": [f"{role}/city{i % 22:02d}/{rng.integers(1 << 62):016x}.jpg" for i in range(n)],
                        "utm": utm, "condition": [None] * n, "timestamp": [int(1.5e9 + i) for i in range(n)]}
        group = f"msls_train_{role}"
        names = [f"{group}-{j:06d}.tar" for j in range(-(-n // 1000))]
        groups[group] = {"split": "msls_train", "role": role, "shards": names, "num_samples": n}
        for j, s in enumerate(names):
            shards[s] = {"group": group, "first": j * 1000, "num_samples": min(1000, n - j * 1000),
                         "size": 10 ** 7, "sha256": "0" * 64}
        for i, k in enumerate(keys):
            index[k] = [names[i // 1000], 10240 * (i % 1000), 10240, f"{i & 0xffffffff:08x}"]
    d = {"schema_version": SCHEMA_VERSION, "source": {"dataset": "bench"}, "options": {},
         "splits": {"msls_train": split}, "groups": groups, "shards": shards, "index": index, "skipped": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, separators=(",", ":"))


_LOAD = """
import json, resource, sys, time
from pathlib import Path
from sfrs_dist.training.watchdog import peak_memory_mb
base = peak_memory_mb()
t0 = time.time()
from sfrs_dist.data.manifest import Manifest
m = Manifest.load(Path(sys.argv[1]))
t1 = time.time()
load_peak = peak_memory_mb()
sd = m.split_data("msls_train")
t2 = time.time()
print(json.dumps({"load_s": t1 - t0, "split_data_s": t2 - t1, "base_mb": base, "load_peak_mb": load_peak,
                  "peak_mb": peak_memory_mb()}))
"""


def run_manifest(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_manifest_"))
    path = work / "manifest.json"
    t0 = time.time()
    write_manifest(path, args.entries)
    print(f"{args.entries} entries: manifest.json {path.stat().st_size / 1e6:.0f} MB "
          f"({path.stat().st_size / args.entries:.0f} B/entry), written in {time.time() - t0:.0f} s")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(work)], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(args.ranks)]
    for r, p in enumerate(procs):
        res = json.loads(p.communicate()[0])
        print(f"rank {r}: Manifest.load {res['load_s']:.1f} s, peak {res['load_peak_mb'] - res['base_mb']:.0f} MB "
              f"above the {res['base_mb']:.0f} MB of the imports; split_data {res['split_data_s']:.1f} s, "
              f"peak {res['peak_mb'] - res['base_mb']:.0f} MB above")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    j = sub.add_parser("job")
    j.add_argument("--scale", type=float, default=0.25)
    j.add_argument("--image-size", default="24x32")
    j.add_argument("--subsets", type=int, default=2, help="cache subsets (refreshes) per epoch")
    j.add_argument("--steps", type=int, default=10, help="training steps per subset")
    j.add_argument("--work", default=None, help="folder for data and runs (kept; data reused)")
    j.add_argument("--report", default=None, help="only print the stage table of this run folder")
    m = sub.add_parser("manifest")
    m.add_argument("--entries", type=int, default=1_600_000)
    m.add_argument("--ranks", type=int, default=2)
    m.add_argument("--work", default=None)
    args = p.parse_args()
    run_job(args) if args.what == "job" else run_manifest(args)


if __name__ == "__main__":
    main()
