"""Shard builder: output format, manifest, determinism, resume, bad input, verification."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sfrs_dist.data.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    SchemaVersionError,
    ShardReadError,
)
from sfrs_dist.data.random_access import ShardReader
from sfrs_dist.data.records import DATABASE, QUERY, Record, make_key
from sfrs_dist.data.shards import (
    FAIL_AFTER_ENV,
    INFO_DIR,
    BadImageError,
    InjectedFailure,
    build_shards,
    fit_size,
    verify_shards,
)

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / "launch" / "build_shards.py")


def _files(d: Path) -> dict:
    """Relative path -> bytes of every non-hidden file of a shard folder."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _two_splits(make_jpeg_split):
    return [make_jpeg_split("toy", "train", 23, 9, seed=1), make_jpeg_split("toy", "test", 5, 4, seed=2)]


def test_build_readable_by_webdataset_and_tar(tmp_path, make_jpeg_split):
    splits = _two_splits(make_jpeg_split)
    out = tmp_path / "shards"
    m = build_shards(splits, out, shard_size=4, workers=1, progress=False)
    records = {r.key: r for s in splits for r in s.database + s.queries}

    # shard layout: one group per (split, role), ceil(n / 4) shards each, named <group>-NNNNNN.tar
    expected_groups = {"toy_train_db": 23, "toy_train_q": 9, "toy_test_db": 5, "toy_test_q": 4}
    assert {g: e.num_samples for g, e in m.groups.items()} == expected_groups
    for g, n in expected_groups.items():
        assert m.groups[g].shards == [f"{g}-{i:06d}.tar" for i in range(-(-n // 4))]

    for s in splits:
        for role, recs in ((DATABASE, s.database), (QUERY, s.queries)):
            group = f"{s.name}_{s.split}_{role}"
            urls = [str(out / n) for n in m.groups[group].shards]
            # the tar command line sees <key>.jpg + <key>.json per sample, in .mat order
            names = []
            for u in urls:
                res = subprocess.run(["tar", "-tf", u], capture_output=True, text=True, check=True)
                names += res.stdout.split()
            assert names == [f"{r.key}.{ext}" for r in recs for ext in ("jpg", "json")]
            # plain webdataset reads the same samples: raw bytes and Record.meta()
            got = list(wds.WebDataset(urls, shardshuffle=False))
            assert [x["__key__"] for x in got] == [r.key for r in recs]
            for x, r in zip(got, recs):
                assert x["jpg"] == Path(r.file).read_bytes()
                assert json.loads(x["json"]) == r.meta()
            # manifest columns equal the records
            col = m.splits[f"{s.name}_{s.split}"].role(role)
            assert col.keys == [r.key for r in recs]
            assert col.utm == [list(r.utm) for r in recs]
            assert col.condition == [r.condition for r in recs]

    # per-shard checksums and counts; index covers every key
    for name, e in m.shards.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == e.sha256
        assert e.num_samples == len(m.shard_keys(name))
    assert set(m.index) == set(records)
    # ground truth rebuilt from the manifest equals the records' ground truth
    for s in splits:
        sd = Manifest.load(out).split_data(f"{s.name}_{s.split}")
        for a, b in zip(sd.potential_positives(), s.potential_positives()):
            np.testing.assert_array_equal(a, b)
    assert verify_shards(out) == []


def test_random_access_returns_streamed_bytes(tmp_path, make_jpeg_split):
    splits = _two_splits(make_jpeg_split)
    out = tmp_path / "shards"
    m = build_shards(splits, out, shard_size=5, workers=1, progress=False)
    streamed = {x["__key__"]: x for x in wds.WebDataset([str(out / n) for n in m.shards], shardshuffle=False)}
    assert len(streamed) == len(m.index)
    with ShardReader(out, max_open=2) as reader:
        keys = list(m.index)
        for key in keys[::-1]:  # reverse order: forces LRU evictions across shards
            data, meta = reader.get(key, decode=False)
            assert data == streamed[key]["jpg"]
            assert meta == json.loads(streamed[key]["json"]) == m.meta(key)
        img, _ = reader[keys[3]]
        ref = Image.open(io.BytesIO(streamed[keys[3]]["jpg"])).convert("RGB")
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))
        assert len(reader._fds) <= 2
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")


def test_resize_and_png_sources(tmp_path):
    rng = np.random.default_rng(0)
    recs = []
    for i, (h, w, fmt) in enumerate([(40, 60, "JPEG"), (60, 40, "JPEG"), (12, 16, "JPEG"), (30, 40, "PNG")]):
        f = tmp_path / "raw" / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f, format=fmt)
        recs.append(Record(key=make_key("t", "test", DATABASE, i), name="t", split="test", role=DATABASE,
                           index=i, relpath=f.name, file=str(f), utm=(float(i), 0.0)))
    from sfrs_dist.data.records import SplitData

    split = SplitData("t", "test", recs, [])
    # original bytes: the PNG stays PNG under <key>.png
    m = build_shards([split], tmp_path / "orig", shard_size=10, progress=False)
    with ShardReader(tmp_path / "orig") as r:
        data, _ = r.get(recs[3].key, decode=False)
        assert data == Path(recs[3].file).read_bytes()
    names = subprocess.run(["tar", "-tf", str(tmp_path / "orig" / m.groups["t_test_db"].shards[0])],
                           capture_output=True, text=True, check=True).stdout.split()
    assert f"{recs[3].key}.png" in names
    # resized: JPEG fitted into a 20x30 box turned like the image, never enlarged
    build_shards([split], tmp_path / "small", shard_size=10, resize=(20, 30), progress=False)
    with ShardReader(tmp_path / "small") as r:
        for rec in recs:
            data, _ = r.get(rec.key, decode=False)
            img = Image.open(io.BytesIO(data))
            src = Image.open(rec.file)
            assert img.format == "JPEG"
            assert (img.height, img.width) == fit_size(src.height, src.width, 20, 30)
    assert fit_size(40, 60, 20, 30) == (20, 30) and fit_size(60, 40, 20, 30) == (30, 20)
    assert fit_size(12, 16, 20, 30) == (12, 16)


def test_bad_jpeg_fails_or_is_skipped(tmp_path, make_jpeg_split):
    split = make_jpeg_split("toy", "train", 10, 3)
    bad_trunc = Path(split.database[4].file)
    bad_trunc.write_bytes(bad_trunc.read_bytes()[:200])
    bad_garbage = Path(split.queries[1].file)
    bad_garbage.write_bytes(b"not an image at all" * 10)

    with pytest.raises(BadImageError, match=str(bad_trunc)) as ei:
        build_shards([split], tmp_path / "a", shard_size=4, progress=False)
    assert split.database[4].key in str(ei.value)
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()

    m = build_shards([split], tmp_path / "b", shard_size=4, skip_bad=True, progress=False)
    assert sorted(s["key"] for s in m.skipped) == sorted([split.database[4].key, split.queries[1].key])
    assert all(s["file"] and s["error"] for s in m.skipped)
    col = m.splits["toy_train"].database
    assert col.keys == [r.key for i, r in enumerate(split.database) if i != 4]
    assert col.index == [i for i in range(10) if i != 4]
    assert m.groups["toy_train_db"].num_samples == 9 and m.groups["toy_train_q"].num_samples == 2
    assert split.database[4].key not in m.index
    assert verify_shards(tmp_path / "b") == []


def test_missing_image_names_file(tmp_path, make_jpeg_split):
    split = make_jpeg_split("toy", "train", 4, 2)
    os.unlink(split.database[2].file)
    with pytest.raises(BadImageError, match=str(split.database[2].file)):
        build_shards([split], tmp_path / "s", shard_size=4, progress=False)


def test_interrupted_build_resumes_byte_identical(tmp_path, make_jpeg_split, monkeypatch):
    splits = _two_splits(make_jpeg_split)
    ref = tmp_path / "ref"
    build_shards(splits, ref, shard_size=3, workers=2, progress=False)

    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_AFTER_ENV, "4")
    with pytest.raises(InjectedFailure):
        build_shards(splits, out, shard_size=3, workers=1, progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    assert not (out / MANIFEST_NAME).exists()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert len(done) == 4 and list(out.glob(".*.tmp-*"))  # 4 complete shards + a partial temp file
    # corrupt one completed shard: the rerun must rebuild it and keep the three others
    (out / done[0]).write_bytes(b"\0" * 10)
    before = {n: os.stat(out / n).st_mtime_ns for n in done[1:]}

    build_shards(splits, out, shard_size=3, workers=2, progress=False)
    assert {n: os.stat(out / n).st_mtime_ns for n in done[1:]} == before
    assert not list(out.glob(".*.tmp-*"))
    assert _files(out) == _files(ref)  # every shard and the manifest byte-identical
    assert verify_shards(out) == []
    # a rerun with nothing to do rewrites no shard
    mt = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    build_shards(splits, out, shard_size=3, workers=1, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mt
    assert _files(out) == _files(ref)


def _corrupt(out: Path, m: Manifest):
    """Flip bytes inside one sample's image, truncate a shard, delete a third; return names."""
    shards = list(m.shards)
    flipped, truncated, deleted = shards[0], shards[2], shards[4]
    key = m.shard_keys(flipped)[1]
    e = m.index[key]
    data = bytearray((out / flipped).read_bytes())
    for i in range(e.offset + 600, e.offset + 610):
        data[i] ^= 0xFF
    (out / flipped).write_bytes(bytes(data))
    tkey = m.shard_keys(truncated)[2]
    with open(out / truncated, "r+b") as f:
        f.truncate(m.index[tkey].offset + 700)
    (out / deleted).unlink()
    return flipped, key, truncated, tkey, deleted


def test_verify_detects_corruption(tmp_path, make_jpeg_split):
    out = tmp_path / "s"
    m = build_shards(_two_splits(make_jpeg_split), out, shard_size=4, progress=False)
    ok = subprocess.run([sys.executable, CLI, "--out", str(out), "--verify"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    flipped, key, truncated, tkey, deleted = _corrupt(out, m)
    problems = verify_shards(out)
    assert len(problems) == 3
    for name in (flipped, truncated, deleted):
        assert sum(p.startswith(name) for p in problems) == 1
    res = subprocess.run([sys.executable, CLI, "--out", str(out), "--verify"], capture_output=True, text=True)
    assert res.returncode == 1
    for name in (flipped, truncated, deleted):
        assert name in res.stderr
    # random access names shard and sample
    with ShardReader(out) as r:
        with pytest.raises(ShardReadError, match=f"{flipped}.*{key}"):
            r.get(key)
        with pytest.raises(ShardReadError, match=f"{truncated}.*{tkey}"):
            r.get(tkey)
        with pytest.raises(ShardReadError, match=deleted):
            r.get(m.shard_keys(deleted)[0])
        good = m.shard_keys(flipped)[0]
        assert r.get(good, decode=False)[1]["key"] == good


def test_wrong_schema_version(tmp_path, make_jpeg_split):
    out = tmp_path / "s"
    build_shards([make_jpeg_split("toy", "test", 3, 2)], out, shard_size=4, progress=False)
    path = out / MANIFEST_NAME
    d = json.loads(path.read_text())
    d["schema_version"] = SCHEMA_VERSION + 98
    path.write_text(json.dumps(d))
    for fn in (Manifest.load, verify_shards, ShardReader):
        with pytest.raises(SchemaVersionError) as ei:
            fn(out)
        msg = str(ei.value)
        assert str(path) in msg and str(SCHEMA_VERSION + 98) in msg and str(SCHEMA_VERSION) in msg
    res = subprocess.run([sys.executable, CLI, "--out", str(out), "--verify"], capture_output=True, text=True)
    assert res.returncode == 2 and str(path) in res.stderr and "schema version" in res.stderr


def test_cli_synthetic_interrupted_then_resumed(synthetic_raw, synthetic_shards, tmp_path):
    """CLI on the synthetic raw set: a failing build, then a rerun equals an uninterrupted build."""
    out = tmp_path / "cli"
    cmd = [sys.executable, CLI, "--dataset", "synthetic", "--root", str(synthetic_raw), "--out", str(out),
           "--shard-size", "16", "--workers", "2", "--no-progress"]
    env = dict(os.environ, **{FAIL_AFTER_ENV: "3"})
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "InjectedFailure" in res.stderr
    assert not (out / MANIFEST_NAME).exists()
    res = subprocess.run(cmd + ["--verify"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ref = _files(synthetic_shards)
    got = _files(out)
    # the manifest records the source root given on the command line; the fixture used the same
    assert got.keys() == ref.keys() and got == ref
    assert (out / INFO_DIR).is_dir()


def test_cli_bad_raw_input(synthetic_raw, tmp_path):
    """A corrupt JPEG fails naming it (or is skipped with --skip-bad); a missing one is named."""
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(synthetic_raw, raw)
    bad = sorted((raw / "pitts" / "queries_real").rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: 300])
    cmd = [sys.executable, CLI, "--dataset", "synthetic", "--root", str(raw), "--shard-size", "64", "--no-progress"]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert res.returncode == 2 and str(bad) in res.stderr, res.stderr
    res = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--skip-bad", "--verify"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    m = Manifest.load(tmp_path / "b")
    assert [s["file"] for s in m.skipped] == [str(bad.relative_to(raw / "pitts" / "queries_real"))]
    assert m.skipped[0]["key"] not in m.index
    missing = sorted((raw / "tokyo247" / "images").rglob("*.png"))[5]
    missing.unlink()
    res = subprocess.run(cmd + ["--out", str(tmp_path / "c"), "--skip-bad"], capture_output=True, text=True)
    # named as in the .mat (Tokyo lists its PNG cutouts as .jpg), with the .mat file
    assert res.returncode == 2 and missing.stem in res.stderr and "tokyo247.mat" in res.stderr, res.stderr


class _ReaderDataset(torch.utils.data.Dataset):
    def __init__(self, reader: ShardReader, keys):
        self.reader, self.keys = reader, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.reader.get(self.keys[i], decode=False)[0]


def test_reader_threads_and_processes(tmp_path, make_jpeg_split):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "s"
    m = build_shards(_two_splits(make_jpeg_split), out, shard_size=3, progress=False)
    keys = list(m.index)
    reader = ShardReader(out, max_open=2)
    ref = {k: reader.get(k, decode=False)[0] for k in keys}  # parent now holds open descriptors
    with ThreadPoolExecutor(4) as ex:  # concurrent reads with constant LRU evictions
        got = list(ex.map(lambda k: reader.get(k, decode=False)[0], keys * 4))
    assert got == [ref[k] for k in keys * 4]
    loader = torch.utils.data.DataLoader(_ReaderDataset(reader, keys), batch_size=None, num_workers=2)
    assert list(loader) == [ref[k] for k in keys]
    reader.close()
