"""Mapillary SLS in its own layout (train_val/<city>/{query,database}/ with csv files), written
from the synthetic city: splits, panoramas left out, official validation queries, conditions,
positives within a city only, and the shard builder's command line."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfrs_dist.data.datasets import DatasetFormatError, load_dataset
from sfrs_dist.data.manifest import Manifest
from sfrs_dist.data.msls import CITY_OFFSET_M, TRAIN_CITIES, load_msls
from sfrs_dist.data.vpr_layout import msls_official_queries

REPO = Path(__file__).resolve().parent.parent


def _write_role(folder: Path, records, keys, pano=(), night=(), sideways=()) -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "postprocessed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "key", "easting", "northing", "night", "control_panel", "view_direction", "unique_cluster"])
        for i, (r, k) in enumerate(zip(records, keys)):
            w.writerow([i, k, repr(r.utm[0]), repr(r.utm[1]), i in night, False,
                        "Sideways" if i in sideways else "Forward", 0])
    with open(folder / "raw.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "key", "lon", "lat", "ca", "captured_at", "pano"])
        for i, k in enumerate(keys):
            w.writerow([i, k, 12.5, 55.6, 90.0, f"2016-0{1 + i % 9}-01", i in pano])
    for r, k in zip(records, keys):
        shutil.copyfile(r.file, folder / "images" / f"{k}.jpg")


@pytest.fixture(scope="module")
def msls_root(synthetic_raw, tmp_path_factory):
    """london <- pitts30k train, boston <- pitts30k val, cph <- pitts30k test (official query keys + 2 others)."""
    root = tmp_path_factory.mktemp("msls")
    splits = {s.split: s for s in load_dataset("pitts", Path(synthetic_raw) / "pitts")}
    cph_keys = [k for k, c in msls_official_queries().items() if c == "cph"]
    for city, split in (("london", "train"), ("boston", "val"), ("cph", "test")):
        s = splits[split]
        base = root / "train_val" / city
        db_keys = [f"{city}db{i:05d}" for i in range(len(s.database))]
        q_keys = ([f"{city}q{i:05d}" for i in range(len(s.queries))] if city != "cph"
                  else cph_keys[: len(s.queries) - 2] + ["notofficial0", "notofficial1"])
        _write_role(base / "database", s.database, db_keys, pano={0, 5})
        _write_role(base / "query", s.queries, q_keys, night={1, 2}, sideways={2, 3})
    return root, splits


def test_msls_splits(msls_root):
    root, mat = msls_root
    out = {s.split: s for s in load_msls(root)}
    train, val = out["train"], out["val"]
    assert (train.name, val.name) == ("msls", "msls")
    # panoramas left out; train = london + boston, val = cph (sf absent)
    assert len(train.database) == len(mat["train"].database) + len(mat["val"].database) - 4
    assert len(val.database) == len(mat["test"].database) - 2
    assert {r.extra["city"] for r in train.database} == {"london", "boston"}
    assert not any(r.extra["pano_id"] in ("londondb00000", "londondb00005") for r in train.database)
    # only the official validation queries (the two others dropped), re-indexed
    assert len(val.queries) == len(mat["test"].queries) - 2
    assert {r.extra["pano_id"] for r in val.queries} <= set(msls_official_queries())
    assert [r.index for r in val.queries] == list(range(len(val.queries)))
    assert len(load_msls(root, splits=["val"], official_queries=False)[0].queries) == len(mat["test"].queries)
    # conditions: night / day, sideways kept
    conds = [r.condition for r in train.queries[:4]]
    assert conds == ["day", "night", "night_sideways", "day_sideways"]
    assert (train.pos_dist_thr, train.nontriv_pos_dist_sq_thr) == (25.0, 100.0)
    # positives stay inside a city: boston's records are moved east by its offset
    b = [r for r in train.database if r.extra["city"] == "boston"]  # its first image: database[1]
    assert b[0].utm[0] - mat["val"].database[1].utm[0] == pytest.approx(TRAIN_CITIES.index("boston") * CITY_OFFSET_M)
    assert b[0].utm[1] == mat["val"].database[1].utm[1]
    pos = train.training_positives()
    city_of = np.asarray([r.extra["city"] for r in train.database])
    for q, p in zip(train.queries, pos):
        assert (city_of[p] == q.extra["city"]).all()
    n_london = len(mat["train"].queries)
    assert sum(len(p) > 0 for p in pos[:n_london]) == sum(len(p) > 0 for p in mat["train"].training_positives())


def test_msls_errors_and_build(msls_root, tmp_path):
    root, _ = msls_root
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    post = bad / "train_val" / "boston" / "query" / "postprocessed.csv"
    post.write_text(post.read_text().replace("northing", "north"))
    with pytest.raises(DatasetFormatError, match=r"boston/query/postprocessed\.csv: column\(s\) \['northing'\]"):
        load_msls(bad)
    missing = next((root / "train_val" / "cph" / "database" / "images").iterdir())
    shutil.rmtree(bad)
    shutil.copytree(root, bad)
    (bad / missing.relative_to(root)).unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        load_msls(bad)

    with pytest.raises(ValueError, match=r"unknown MSLS cities \['copenhagen'\]"):
        load_msls(root, cities=["copenhagen"])
    assert [s.split for s in load_msls(root, cities=["london"])] == ["train"]

    out = tmp_path / "shards"
    out.mkdir()  # made beforehand, empty: built under a staging name, then renamed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "build_shards.py"), "--dataset", "msls", "--root",
                          str(root), "--out", str(out), "--shard-size", "64", "--no-progress"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    m = Manifest.load(out)
    assert sorted(m.splits) == ["msls_train", "msls_val"]
    assert m.splits["msls_val"].queries.condition[:4] == ["day", "night", "night_sideways", "day_sideways"]
    assert m.splits["msls_train"].database.extra[0]["city"] == "london"
