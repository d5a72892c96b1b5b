"""Raw dataset readers and ground truth, on .mat files written here in the real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sfrs_dist.data.datasets import (
    DatasetFormatError,
    MissingImagesError,
    load_dataset,
    load_pitts,
    load_tokyo247,
    load_tokyo_tm,
    panorama_ids,
    read_dbstruct,
)
from sfrs_dist.data.records import ground_truth_within


def _cell(names):
    arr = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        arr[i, 0] = n
    return arr


def write_dbstruct(path: Path, fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = [(k, object) for k in fields]
    s = np.empty((1, 1), dtype=dtype)
    for k, v in fields.items():
        s[0, 0][k] = v
    scipy.io.savemat(str(path), {"dbStruct": s})


def _img(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format=fmt)


def make_pitts(root: Path, split: str, rng: np.random.Generator, n_db: int = 40, n_q: int = 12, write_images=True):
    db = [f"{i // 24:03d}/{i:06d}_pitch1_yaw{i % 12 + 1}.jpg" for i in range(n_db)]
    q = [f"{i // 24:03d}/{i:06d}_pitch1_yaw{i % 12 + 1}.jpg" for i in range(n_q)]
    utm_db = rng.uniform(0, 120, size=(2, n_db)) + np.array([[585000.0], [4477000.0]])
    utm_q = rng.uniform(0, 120, size=(2, n_q)) + np.array([[585000.0], [4477000.0]])
    write_dbstruct(
        root / "datasets" / f"pitts30k_{split}.mat",
        {
            "whichSet": split, "dbImageFns": _cell(db), "utmDb": utm_db, "qImageFns": _cell(q), "utmQ": utm_q,
            "numImages": float(n_db), "numQueries": float(n_q), "posDistThr": 25.0, "posDistSqThr": 625.0,
            "nonTrivPosDistSqThr": 100.0,
        },
    )
    if write_images:
        for f in db:
            _img(root / f)
        for f in q:
            _img(root / "queries_real" / f)
    return db, q, utm_db.T, utm_q.T


def brute_within(utm_q, utm_db, r):
    d = np.sqrt(((utm_q[:, None, :] - utm_db[None, :, :]) ** 2).sum(-1))
    return [np.flatnonzero(row <= r) for row in d]


def test_pitts_reader_and_ground_truth(tmp_path):
    rng = np.random.default_rng(0)
    db, q, utm_db, utm_q = make_pitts(tmp_path, "train", rng)
    split = load_pitts(tmp_path, "train")
    assert [r.relpath for r in split.database] == db
    assert [r.relpath for r in split.queries] == q
    assert split.queries[3].file == str(tmp_path / "queries_real" / q[3])
    assert np.allclose(split.utm_db, utm_db) and np.allclose(split.utm_q, utm_q)
    assert len({r.key for r in split.database + split.queries}) == len(db) + len(q)
    pos = split.potential_positives()
    train_pos = split.training_positives()
    for got, want in zip(pos, brute_within(utm_q, utm_db, 25.0)):
        assert np.array_equal(got, want)
    for got, want in zip(train_pos, brute_within(utm_q, utm_db, 10.0)):
        assert np.array_equal(got, want)
    assert any(len(p) for p in train_pos)
    assert all(len(a) <= len(b) for a, b in zip(train_pos, pos))


def test_ground_truth_within_matches_brute_force():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 200, (50, 2)), rng.uniform(0, 200, (300, 2))
    for got, want in zip(ground_truth_within(a, b, 17.0), brute_within(a, b, 17.0)):
        assert np.array_equal(got, want)


def test_wrong_field_named(tmp_path):
    rng = np.random.default_rng(0)
    make_pitts(tmp_path, "val", rng, write_images=False)
    mat = tmp_path / "datasets" / "pitts30k_val.mat"
    m = scipy.io.loadmat(str(mat))["dbStruct"]
    fields = dict(zip(m.dtype.names, m.item()))
    fields["utmDatabase"] = fields.pop("utmDb")
    write_dbstruct(mat, fields)
    with pytest.raises(DatasetFormatError, match=r"pitts30k_val\.mat.*'utmDb'"):
        read_dbstruct(mat)


def test_count_mismatch_named(tmp_path):
    rng = np.random.default_rng(0)
    make_pitts(tmp_path, "val", rng, write_images=False)
    mat = tmp_path / "datasets" / "pitts30k_val.mat"
    m = scipy.io.loadmat(str(mat))["dbStruct"]
    fields = dict(zip(m.dtype.names, m.item()))
    fields["utmQ"] = fields["utmQ"][:, :-1]
    write_dbstruct(mat, fields)
    with pytest.raises(DatasetFormatError, match=r"'utmQ'"):
        read_dbstruct(mat)


def test_missing_image_named(tmp_path):
    rng = np.random.default_rng(0)
    db, *_ = make_pitts(tmp_path, "test", rng)
    (tmp_path / db[5]).unlink()
    with pytest.raises(MissingImagesError, match=db[5].replace("/", ".")):
        load_pitts(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="pitts30k_train.mat"):
        load_dataset("pitts", tmp_path, splits=["train"])


def test_tokyo247_png_quirk_conditions_and_panoramas(tmp_path):
    rng = np.random.default_rng(2)
    pano_utm = rng.uniform(0, 300, size=(4, 2))
    db, utm_db = [], []
    for p in range(4):
        for yaw in range(12):
            name = f"{p:05d}/{p:05d}_{yaw * 30:03d}.jpg"
            db.append(name)
            utm_db.append(pano_utm[p])
            _img((tmp_path / "images" / name).with_suffix(".png"), "PNG")
    q = [f"{i:05d}_{c}.jpg" for i in range(3) for c in ("day", "sunset", "night")]
    for name in q:
        _img(tmp_path / "query" / name)
    write_dbstruct(
        tmp_path / "tokyo247.mat",
        {
            "whichSet": "test", "dbImageFns": _cell(db), "utmDb": np.array(utm_db).T, "qImageFns": _cell(q),
            "utmQ": rng.uniform(0, 300, size=(2, len(q))), "numImages": float(len(db)),
            "numQueries": float(len(q)), "posDistThr": 25.0, "posDistSqThr": 625.0, "nonTrivPosDistSqThr": 100.0,
        },
    )
    split = load_tokyo247(tmp_path)
    assert all(r.file.endswith(".png") for r in split.database)
    assert [r.condition for r in split.queries] == ["day", "sunset", "night"] * 3
    pano = panorama_ids(split)
    assert np.array_equal(pano, np.repeat(np.arange(4), 12))
    (tmp_path / "images" / db[7]).with_suffix(".png").unlink()
    with pytest.raises(MissingImagesError, match="tokyo247.mat"):
        load_tokyo247(tmp_path)


def test_tokyo_tm_excludes_same_timestamp(tmp_path):
    rng = np.random.default_rng(3)
    n_db, n_q = 30, 8
    utm_db = rng.uniform(0, 40, size=(2, n_db))
    ts_db = rng.integers(0, 3, size=n_db)
    q_idx = rng.choice(n_db, n_q, replace=False)
    db = [f"a/{i:04d}.jpg" for i in range(n_db)]
    write_dbstruct(
        tmp_path / "tokyoTM_val.mat",
        {
            "whichSet": "val", "dbImageFns": _cell(db), "utmDb": utm_db, "dbTimeStamp": ts_db.astype(float),
            "qImageFns": _cell([db[i] for i in q_idx]), "utmQ": utm_db[:, q_idx],
            "qTimeStamp": ts_db[q_idx].astype(float), "numImages": float(n_db), "numQueries": float(n_q),
            "posDistThr": 25.0, "posDistSqThr": 625.0, "nonTrivPosDistSqThr": 100.0,
        },
    )
    split = load_tokyo_tm(tmp_path, "val", check_files=False)
    for qi, pos in enumerate(split.potential_positives()):
        want = [j for j in brute_within(utm_db.T[q_idx[qi]][None], utm_db.T, 25.0)[0] if ts_db[j] != ts_db[q_idx[qi]]]
        assert list(pos) == want
    # the fields of Tokyo TM are not those of Pittsburgh: named, not misread
    with pytest.raises(DatasetFormatError, match="field 3 should be 'qImageFns'"):
        read_dbstruct(tmp_path / "tokyoTM_val.mat")
