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

``manifest``: a schema-1 manifest (per-sample fields in the JSON) of ``--entries`` samples
(MSLS-like keys and paths) and the same manifest saved as schema 2 (memory-mapped columns);
for each, ``Manifest.load``, ``split_data`` of the split with its keys and UTMs (what the trainer
takes) and 10,000 key lookups, in ``--ranks`` processes at once as every rank does: time and
peak memory of each, and the ratios.
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
            # the region split needs multiples of 16
            f"data.image_size=[{-(-size[0] // 16) * 16},{-(-size[1] // 16) * 16}]",
            "data.num_workers=0", "data.extract_batch_size=32",  # decode in the rank: 2 ranks on 2 cores
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


def write_manifest_v1(path: Path, entries: int) -> dict:
    """A schema-1 ``manifest.json`` of ``entries`` samples in one split (MSLS-like keys, paths, UTMs),
    the per-sample columns and the index in the JSON document; returns the document."""
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
                        "utm": utm, "condition": [None] * n, "timestamp": [int(1.5e9 + i) for i in range(n)],
                        "extra": []}
        group = f"msls_train_{role}"
        names = [f"{group}-{j:06d}.tar" for j in range(-(-n // 1000))]
        groups[group] = {"split": "msls_train", "role": role, "shards": names, "num_samples": n}
        for j, s in enumerate(names):
            shards[s] = {"group": group, "first": j * 1000, "num_samples": min(1000, n - j * 1000),
                         "size": 10 ** 7, "sha256": "0" * 64}
        for i, k in enumerate(keys):
            index[k] = [names[i // 1000], 10240 * (i % 1000), 10240, f"{i & 0xffffffff:08x}"]
    d = {"schema_version": 1, "source": {"dataset": "bench"}, "options": {},
         "splits": {"msls_train": split}, "groups": groups, "shards": shards, "index": index, "skipped": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, separators=(",", ":"))
    return d


_LOAD = """
import json, sys, time
import numpy as np
from pathlib import Path
from sfrs_dist.training.watchdog import peak_memory_mb
from sfrs_dist.data.manifest import Manifest
from sfrs_dist.data.records import record_keys
base = peak_memory_mb()
t0 = time.time()
m = Manifest.load(Path(sys.argv[1]))
t1 = time.time()
load_peak = peak_memory_mb()
sd = m.split_data("msls_train")
q_keys, db_keys = record_keys(sd.queries), record_keys(sd.database)  # what the trainer keeps
utm = sd.utm_db
t2 = time.time()
rng = np.random.default_rng(1)
picks = [db_keys[i] for i in rng.integers(0, len(db_keys), 10000)]
t3 = time.time()
found = sum(m.index.get(k) is not None for k in picks)
t4 = time.time()
print(json.dumps({"load_s": t1 - t0, "split_data_s": t2 - t1, "lookup_us": (t4 - t3) / len(picks) * 1e6,
                  "found": found, "base_mb": base, "load_peak_mb": load_peak, "peak_mb": peak_memory_mb()}))
"""


def _load_in_ranks(folder: Path, ranks: int) -> List[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(folder)], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(ranks)]
    return [json.loads(p.communicate()[0]) for p in procs]


def run_manifest(args) -> None:
    from sfrs_dist.data.manifest import Manifest

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_manifest_"))
    v1, v2 = work / "schema1", work / "schema2"
    t0 = time.time()
    d = write_manifest_v1(v1 / "manifest.json", args.entries)
    t1 = time.time()
    Manifest.from_json(d).save(v2.mkdir(parents=True, exist_ok=True) or v2)
    t2 = time.time()
    del d
    size1 = (v1 / "manifest.json").stat().st_size
    size2 = sum(f.stat().st_size for f in v2.rglob("*") if f.is_file())
    print(f"{args.entries} entries; {args.ranks} processes load at once, as every rank does")
    print(f"schema 1: manifest.json {size1 / 1e6:.0f} MB ({size1 / args.entries:.0f} B/entry), written in {t1 - t0:.0f} s")
    print(f"schema 2: manifest.json + columns {size2 / 1e6:.0f} MB ({size2 / args.entries:.0f} B/entry), "
          f"written in {t2 - t1:.0f} s")
    results = {}
    for name, folder in (("schema 1", v1), ("schema 2", v2)):
        results[name] = _load_in_ranks(folder, args.ranks)
        for r, res in enumerate(results[name]):
            print(f"{name} rank {r}: Manifest.load {res['load_s']:6.2f} s, {res['load_peak_mb'] - res['base_mb']:5.0f} MB "
                  f"above the {res['base_mb']:.0f} MB of the imports; split_data + keys + UTMs "
                  f"{res['split_data_s']:5.2f} s, peak {res['peak_mb'] - res['base_mb']:5.0f} MB above; "
                  f"index.get {res['lookup_us']:.1f} us/key ({res['found']} of 10000 found)")
    a, b = results["schema 1"], results["schema 2"]
    ratio_t = max(r["load_s"] + r["split_data_s"] for r in a) / max(r["load_s"] + r["split_data_s"] for r in b)
    ratio_m = max(r["peak_mb"] - r["base_mb"] for r in a) / max(max(r["peak_mb"] - r["base_mb"] for r in b), 1)
    print(f"schema 2 vs 1: open + split_data {ratio_t:.1f}x faster, peak memory above the imports {ratio_m:.1f}x "
          "smaller")


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
