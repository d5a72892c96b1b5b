"""Schema-2 manifest: per-sample columns in memory-mapped .npy files, same API as schema 1."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from sfrs_dist.data.manifest import (
    COLUMNS_PREFIX,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ColumnIndex,
    IndexEntry,
    Manifest,
    ManifestError,
)
from sfrs_dist.data.random_access import ShardReader
from sfrs_dist.data.records import RecordTable, SplitData, record_keys, record_utm
from sfrs_dist.data.shards import build_shards

REPO = Path(__file__).resolve().parents[1]


def _varied(split: SplitData) -> SplitData:
    """The split with conditions, time stamps (some missing) and extra fields on some samples."""

    def vary(recs):
        return [replace(r, condition=(None, "day", "night")[i % 3], timestamp=None if i % 4 == 0 else 1_500_000_000 + i,
                        extra=None if i % 2 else {"city": "zürich", "heading": str(i)})
                for i, r in enumerate(recs)]

    return replace(split, database=vary(split.database), queries=vary(split.queries), exclude_same_timestamp=True)


@pytest.fixture()
def built(tmp_path, make_jpeg_split):
    """(in-memory manifest returned by the builder, shard folder) of two splits, one with varied fields."""
    splits = [_varied(make_jpeg_split("toy", "train", 11, 7, seed=1)), make_jpeg_split("toy", "test", 5, 3, seed=2)]
    out = tmp_path / "shards"
    m = build_shards(splits, out, shard_size=4, workers=1, progress=False)
    return m, out


def _v1_document(m: Manifest) -> dict:
    """The schema-1 JSON document of a manifest (what builders wrote before schema 2)."""
    return {
        "schema_version": 1, "source": m.source, "options": m.options,
        "splits": {k: {**{f: getattr(v, f) for f in ("name", "split", "pos_dist_thr", "nontriv_pos_dist_sq_thr",
                                                       "exclude_same_timestamp")},
                       "database": {f: list(getattr(v.database, f)) for f in v.database.__dataclass_fields__},
                       "queries": {f: list(getattr(v.queries, f)) for f in v.queries.__dataclass_fields__}}
                   for k, v in m.splits.items()},
        "groups": {k: asdict(v) for k, v in m.groups.items()},
        "shards": {k: asdict(v) for k, v in m.shards.items()},
        "index": {k: [v.shard, v.offset, v.size, v.digest] for k, v in m.index.items()},
        "skipped": m.skipped,
    }


def _same_api(a: Manifest, b: Manifest) -> None:
    """Everything a reader asks of a manifest answers the same for ``a`` and ``b``."""
    assert sorted(a.splits) == sorted(b.splits) and a.groups == b.groups and a.shards == b.shards
    assert list(a.index) == list(b.index) and len(a.index) == len(b.index)
    for key in a.index:
        assert a.index[key] == b.index[key] and key in b.index
        assert a.meta(key) == b.meta(key)
    for shard in a.shards:
        assert a.shard_keys(shard) == b.shard_keys(shard)
        assert a.shard_digests(shard) == b.shard_digests(shard) == [a.index[k].digest for k in a.shard_keys(shard)]
    for g in a.groups:
        assert a.group_keys(g) == b.group_keys(g)
    for sid in a.splits:
        sa, sb = a.split_data(sid), b.split_data(sid)
        assert list(sa.database) == list(sb.database) and list(sa.queries) == list(sb.queries)
        assert record_keys(sa.database) == record_keys(sb.database)
        np.testing.assert_array_equal(sa.utm_q, sb.utm_q)
        for pa, pb in zip(sa.potential_positives() + sa.training_positives(),
                          sb.potential_positives() + sb.training_positives()):
            np.testing.assert_array_equal(pa, pb)
        for role in ("db", "q"):
            ca, cb = a.splits[sid].role(role), b.splits[sid].role(role)
            for f in ("keys", "index", "relpath", "condition", "timestamp", "extra"):
                assert list(getattr(ca, f)) == list(getattr(cb, f)), (sid, role, f)
            assert [list(u) for u in ca.utm] == [list(u) for u in cb.utm]


def test_saved_columns_answer_like_the_built_manifest(built):
    m, out = built
    loaded = Manifest.load(out)
    assert loaded.schema_version == SCHEMA_VERSION == 2 and isinstance(loaded.index, ColumnIndex)
    _same_api(m, loaded)
    # the varied fields survive: None, codes, missing time stamps, non-ASCII extra
    col = loaded.splits["toy_train"].database
    assert col.condition[:3] == [None, "day", "night"]
    assert col.timestamp[0] is None and col.timestamp[1] == 1_500_000_001
    assert col.extra[0] == {"city": "zürich", "heading": "0"} and col.extra[1] is None
    assert loaded.splits["toy_test"].database.extra == []  # no sample has extra fields
    # split_data reads records from the columns; same-time-stamp exclusion uses the column
    sd = loaded.split_data("toy_train")
    assert isinstance(sd.database, RecordTable) and sd.database[-1] == m.split_data("toy_train").database[-1]
    assert record_utm(sd.database).shape == (11, 2)
    # keys not in the set, prefixes and over-long keys are absent; lookups raise KeyError naming nothing else
    some = next(iter(loaded.index))
    for bad in (some[:-1], some + "0", "x" * 500, "", some + "\0"):
        assert bad not in loaded.index and loaded.index.get(bad) is None
    with pytest.raises(KeyError):
        loaded.meta("no_such_key")
    # the reader opens samples through the column index
    with ShardReader(out, loaded) as r:
        for key in list(loaded.index)[::5]:
            img, meta = r.get(key)
            assert meta == m.meta(key)


def test_loaded_manifest_pickles_as_paths_not_arrays(built):
    """DataLoader workers receive the manifest pickled: the columns travel as file paths."""
    m, out = built
    loaded = Manifest.load(out)
    blob = pickle.dumps(loaded)
    columns = sum(f.stat().st_size for f in next(out.glob(f"{COLUMNS_PREFIX}*")).iterdir())
    assert b"keys_sorted.npy" in blob and len(blob) < columns
    again = pickle.loads(blob)
    _same_api(loaded, again)


def test_schema_1_manifest_loads_and_upgrades(built, caplog):
    m, out = built
    folder = next(out.glob(f"{COLUMNS_PREFIX}*"))
    (out / MANIFEST_NAME).write_text(json.dumps(_v1_document(m)))
    with caplog.at_level("INFO"):
        v1 = Manifest.load(out)
    assert v1.schema_version == 1 and isinstance(v1.index, dict)
    assert "--upgrade" in caplog.text
    _same_api(m, v1)
    res = subprocess.run([sys.executable, str(REPO / "launch" / "build_shards.py"), "--out", str(out), "--upgrade",
                          "--verify"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    assert "schema 1 -> 2" in res.stdout and "verified" in res.stdout
    v2 = Manifest.load(out)
    assert v2.schema_version == 2
    _same_api(m, v2)
    # same contents, same column folder name (it is their digest)
    assert next(out.glob(f"{COLUMNS_PREFIX}*")) == folder


def test_missing_or_short_column_file_is_named(built):
    _, out = built
    folder = next(out.glob(f"{COLUMNS_PREFIX}*"))
    utm = folder / "toy_train_db.utm.npy"
    good = utm.read_bytes()
    np.save(utm, np.zeros((3, 2)))
    with pytest.raises(ManifestError) as ei:
        Manifest.load(out)
    assert str(utm) in str(ei.value) and "3 rows" in str(ei.value) and "11" in str(ei.value)
    utm.unlink()
    with pytest.raises(ManifestError) as ei:
        Manifest.load(out)
    assert str(utm) in str(ei.value) and "missing" in str(ei.value)
    utm.write_bytes(good)
    Manifest.load(out)
    folder.rename(out / "elsewhere")
    with pytest.raises(ManifestError) as ei:
        Manifest.load(out)
    assert folder.name in str(ei.value) and str(out / MANIFEST_NAME) in str(ei.value)


def test_interrupted_save_keeps_the_previous_manifest(built, monkeypatch):
    m, out = built
    before = Manifest.load(out)
    (first_folder,) = out.glob(f"{COLUMNS_PREFIX}*")
    # a changed manifest whose save fails at the last step (the JSON document's rename)
    changed = Manifest.load(out)
    sid = "toy_test"
    changed.splits[sid] = replace(changed.splits[sid], database=replace(
        changed.splits[sid].database, utm=[[u[0] + 1.0, u[1]] for u in changed.splits[sid].database.utm]))
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst).name == MANIFEST_NAME:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        changed.save(out)
    monkeypatch.setattr(os, "replace", real_replace)
    _same_api(before, Manifest.load(out))
    assert len(list(out.glob(f"{COLUMNS_PREFIX}*"))) == 2  # the new columns, not yet named by any manifest
    # a successful save makes the new columns current and removes the folder no manifest names
    changed.save(out)
    after = Manifest.load(out)
    assert after.splits[sid].database.utm[0][0] == before.splits[sid].database.utm[0][0] + 1.0
    (folder,) = out.glob(f"{COLUMNS_PREFIX}*")
    assert folder != first_folder


def test_save_rejects_an_inconsistent_index(built, tmp_path):
    m, _ = built
    key = next(iter(m.index))
    e = m.index[key]
    wrong = dict(m.index)
    other = next(s for s in m.shards if s != e.shard)
    wrong[key] = IndexEntry(other, e.offset, e.size, e.digest)
    with pytest.raises(ManifestError, match=key):
        replace(m, index=wrong).save(tmp_path / "x")
    del wrong[key]
    with pytest.raises(ManifestError, match="no index entry"):
        replace(m, index=wrong).save(tmp_path / "x")
