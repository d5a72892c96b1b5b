"""Tests of the synthetic city: determinism, real on-disk formats, geometry of the views."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sfrs_dist.data import synthetic as syn

SMALL = dict(
    pitts_places=20, pitts_query_positions=3, query_views=2, tokyo_panoramas=2, tokyo_query_positions=1
)
SMALL_SIZE = (36, 48)


def _tree_bytes(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_tiny")
    syn.generate(root, preset="tiny", seed=0)
    return root


def _grey(path: Path, size=None) -> np.ndarray:
    """Grey image as float, optionally resized to ``size`` (W, H)."""
    with Image.open(path) as im:
        im = im.convert("L")
        return np.asarray(im.resize(size, Image.BILINEAR) if size else im, dtype=np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))


def _shift_corr(a: np.ndarray, b: np.ndarray, max_shift: int, step: int = 2) -> float:
    """Best correlation over horizontal shifts of the overlapping columns of a and b."""
    w = a.shape[1]
    best = -1.0
    for s in range(-max_shift, max_shift + 1, step):
        if s >= 0:
            best = max(best, _corr(a[:, s:], b[:, : w - s]))
        else:
            best = max(best, _corr(a[:, : w + s], b[:, -s:]))
    return best


def _place_score(q: np.ndarray, root: Path, views: list, cache: Dict[str, np.ndarray]) -> float:
    """Best shift-tolerant correlation of query ``q`` with any of a place's views (80x60)."""
    best = -1.0
    for name in views:
        if name not in cache:
            cache[name] = _grey(root / name, (80, 60))
        best = max(best, _shift_corr(q, cache[name], max_shift=20))
    return best


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    s1 = syn.generate(tmp_path / "a", seed=3, image_size=SMALL_SIZE, workers=1, **SMALL)
    syn.generate(tmp_path / "b", seed=3, image_size=SMALL_SIZE, workers=2, **SMALL)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert set(a) == set(b)
    images = [k for k in a if k.endswith((".jpg", ".png"))]
    assert len(images) == s1["total_images"]
    mats = [k for k in a if k.endswith(".mat")]
    assert len(mats) == 7  # pitts30k x3, pitts250k x3, tokyo247
    differing = [k for k in a if a[k] != b[k] and not k.endswith(".json")]
    assert differing == []
    # regenerating into the same folder (idempotent) keeps the bytes and leaves no temp files
    syn.generate(tmp_path / "a", seed=3, image_size=SMALL_SIZE, workers=1, **SMALL)
    assert _tree_bytes(tmp_path / "a") == a


def test_different_seed_gives_different_data(tmp_path):
    syn.generate(tmp_path / "a", seed=3, image_size=SMALL_SIZE, **SMALL)
    syn.generate(tmp_path / "b", seed=4, image_size=SMALL_SIZE, **SMALL)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    common = [k for k in set(a) & set(b) if k.endswith((".jpg", ".png", ".mat"))]
    assert common
    assert sum(a[k] != b[k] for k in common) >= 0.9 * len(common)


def test_pittsburgh_mat_files_load_positionally(tiny):
    root = tiny / "pitts"
    x_ranges = []
    for split in syn.SPLITS:
        path = root / "datasets" / f"pitts30k_{split}.mat"
        raw = scipy.io.loadmat(str(path))["dbStruct"]
        assert raw.dtype.names == syn.PITTS_FIELDS
        m = raw.item()
        assert len(m) == 10
        db = [f[0].item() for f in m[1]]
        q = [f[0].item() for f in m[3]]
        assert str(m[0].item()) == split
        assert m[2].shape == (2, len(db)) and m[4].shape == (2, len(q))
        assert m[5].item() == len(db) and m[6].item() == len(q)
        assert (m[7].item(), m[8].item(), m[9].item()) == (25.0, 625.0, 100.0)
        assert len(db) % syn.NUM_YAWS == 0 and len(q) > 0
        for name in db:
            assert (root / name).is_file(), name
            assert name.split("/")[1].split("_")[1] == "pitch1"
        for name in q:
            assert (root / "queries_real" / name).is_file(), name
        # cutouts of one place share their position; yaw runs 1..12
        places: Dict[str, set] = {}
        for name, (e, n) in zip(db, m[2].T):
            stem, _, yaw = Path(name).stem.partition("_pitch1_yaw")
            places.setdefault(stem, set()).add((int(yaw), e, n))
        for views in places.values():
            assert sorted(v[0] for v in views) == list(range(1, 13))
            assert len({v[1:] for v in views}) == 1
        assert np.all(m[2][0] > syn.PITTS_UTM_ORIGIN[0] - 1) and np.all(m[2][1] > syn.PITTS_UTM_ORIGIN[1] - 1)
        x_ranges.append((m[2][0].min(), m[2][0].max()))
        # the pitts250k files name the same images
        m250 = syn.read_dbstruct(root / "datasets" / f"pitts250k_{split}.mat")
        assert m250["dbImageFns"] == db and m250["qImageFns"] == q
    # train / val / test lie in disjoint west-to-east regions
    assert x_ranges[0][1] < x_ranges[1][0] and x_ranges[1][1] < x_ranges[2][0]


def test_tokyo_format_and_quirks(tiny):
    root = tiny / "tokyo247"
    m = syn.read_dbstruct(root / "tokyo247.mat")
    assert m["whichSet"] == "test"
    assert m["numImages"] == len(m["dbImageFns"]) == 12 * (len(m["dbImageFns"]) // 12)
    for name in m["dbImageFns"]:
        assert name.endswith(".jpg")
        assert not (root / "images" / name).exists()
        png = (root / "images" / name).with_suffix(".png")
        with Image.open(png) as im:
            assert im.format == "PNG"
    # cutouts of a panorama share a folder (the panorama id) and a position
    by_folder: Dict[str, set] = {}
    for name, utm in zip(m["dbImageFns"], m["utmDb"]):
        by_folder.setdefault(name.split("/")[0], set()).add(tuple(utm))
    assert all(len(v) == 1 for v in by_folder.values())
    assert len(by_folder) == m["numImages"] // 12
    # queries: .jpg, one per light condition per position, same position in the 3 conditions
    by_pos: Dict[str, dict] = {}
    for name, utm in zip(m["qImageFns"], m["utmQ"]):
        with Image.open(root / "query" / name) as im:
            assert im.format == "JPEG"
        pos, cond = Path(name).stem.split("_")
        by_pos.setdefault(pos, {})[cond] = tuple(utm)
    for conds in by_pos.values():
        assert set(conds) == set(syn.CONDITIONS)
        assert len(set(conds.values())) == 1
    # night is much darker than day
    day = np.mean([_grey(root / "query" / f"{p}_day.jpg").mean() for p in by_pos])
    night = np.mean([_grey(root / "query" / f"{p}_night.jpg").mean() for p in by_pos])
    assert night < 0.7 * day


def test_training_queries_have_database_images_within_10m(tiny):
    m = syn.read_dbstruct(tiny / "pitts" / "datasets" / "pitts30k_train.mat")
    d2 = ((m["utmQ"][:, None, :] - m["utmDb"][None, :, :]) ** 2).sum(-1)
    has_pos = (d2 <= m["nonTrivPosDistSqThr"]).any(axis=1)
    assert has_pos.mean() >= 0.9
    # and every training query has true negatives beyond 25 m
    assert ((d2 > m["posDistSqThr"]).sum(axis=1) > 0).all()


def test_views_30_degrees_apart_overlap_and_opposite_views_do_not(tiny):
    root = tiny / "pitts"
    db = syn.read_dbstruct(root / "datasets" / "pitts30k_train.mat")["dbImageFns"]
    stems = sorted({n.split("_pitch1")[0] for n in db})
    near, opposite = [], []
    for stem in stems:
        for yaw in (1, 4, 7, 10):
            a = _grey(root / f"{stem}_pitch1_yaw{yaw}.jpg")
            b = _grey(root / f"{stem}_pitch1_yaw{yaw % 12 + 1}.jpg")
            c = _grey(root / f"{stem}_pitch1_yaw{(yaw + 5) % 12 + 1}.jpg")
            half = a.shape[1] // 2
            # yaw y+1 is rotated 30 degrees to the left: its right half shows a's left half
            near.append(_corr(a[:, :half], b[:, half:]))
            opposite.append(_corr(a[:, :half], c[:, half:]))
    near, opposite = np.array(near), np.array(opposite)
    assert near.mean() > 0.9
    assert near.mean() > opposite.mean() + 0.4
    assert (near > opposite).mean() > 0.95


def test_query_is_closer_to_its_nearest_place_than_to_a_far_place(tiny):
    """Best shift-tolerant correlation of a query with the views of its nearest place beats
    the same score against a place more than 50 m away (the query shares scene content)."""
    root = tiny / "pitts"
    rng = np.random.default_rng(0)
    near_scores, far_scores = [], []
    for split in syn.SPLITS:
        m = syn.read_dbstruct(root / "datasets" / f"pitts30k_{split}.mat")
        views_of: Dict[tuple, list] = {}
        for name, utm in zip(m["dbImageFns"], m["utmDb"]):
            views_of.setdefault(tuple(utm), []).append(name)
        place_xy = np.array(list(views_of))
        cache: Dict[str, np.ndarray] = {}
        for qname, qutm in zip(m["qImageFns"], m["utmQ"]):
            dist = np.linalg.norm(place_xy - qutm, axis=1)
            far_idx = np.nonzero(dist > 50.0)[0]
            if far_idx.size == 0:
                continue
            q = _grey(root / "queries_real" / qname, (80, 60))
            near_scores.append(_place_score(q, root, views_of[tuple(place_xy[np.argmin(dist)])], cache))
            far_scores.append(_place_score(q, root, views_of[tuple(place_xy[rng.choice(far_idx)])], cache))
    near_scores, far_scores = np.array(near_scores), np.array(far_scores)
    assert len(near_scores) >= 10
    assert near_scores.mean() > far_scores.mean() + 0.03
    assert (near_scores > far_scores).mean() > 0.65


def test_rotation_by_30_degrees_is_an_exact_half_image_shift():
    city = syn.build_city(np.random.default_rng(1), 3, 3)
    place = syn.sample_places(np.random.default_rng(2), city)[3]
    light = syn.Light("day", noise=0.0)
    cam = syn.Camera(place.x, place.y, place.street_angle)
    a = syn.render_view(city, cam, light, (60, 80)).astype(int)
    b = syn.render_view(
        city, syn.Camera(place.x, place.y, place.street_angle + math.radians(30)), light, (60, 80)
    ).astype(int)
    c = syn.render_view(
        city, syn.Camera(place.x, place.y, place.street_angle + math.pi), light, (60, 80)
    ).astype(int)
    assert np.abs(a[:, :40] - b[:, 40:]).max() <= 1
    assert np.abs(a[:, :40] - c[:, 40:]).mean() > 10
    # the scene has structure: sky on top (blue dominant), darker road at the bottom
    assert a[0, :, 2].mean() > a[0, :, 0].mean()
    assert a[-1].mean() < a[0].mean()


def test_write_dbstruct_round_trip_and_is_deterministic(tmp_path):
    db = [f"000/{i:06d}_pitch1_yaw1.jpg" for i in range(3)]
    q = ["000/000000_pitch1_yaw2.jpg"]
    utm_db = np.array([[1.0, 2.0], [3.0, 4.0], [5.5, 6.5]])
    utm_q = np.array([[7.0, 8.0]])
    syn.write_dbstruct(tmp_path / "a.mat", "val", db, utm_db, q, utm_q)
    syn.write_dbstruct(tmp_path / "b.mat", "val", db, utm_db, q, utm_q)
    assert (tmp_path / "a.mat").read_bytes() == (tmp_path / "b.mat").read_bytes()
    m = syn.read_dbstruct(tmp_path / "a.mat")
    assert m["whichSet"] == "val" and m["dbImageFns"] == db and m["qImageFns"] == q
    np.testing.assert_array_equal(m["utmDb"], utm_db)
    np.testing.assert_array_equal(m["utmQ"], utm_q)
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="2 database names for 3 positions"):
        syn.write_dbstruct(tmp_path / "c.mat", "val", db[:2], utm_db, q, utm_q)


def test_recall_at_n_matches_brute_force():
    rng = np.random.default_rng(5)
    db = rng.normal(size=(60, 8)).astype(np.float32)
    q = rng.normal(size=(15, 8)).astype(np.float32)
    utm_db = np.repeat(rng.uniform(0, 200, (5, 2)), 12, axis=0)
    utm_q = rng.uniform(0, 200, (15, 2))
    groups = np.repeat(np.arange(5), 12)
    for use_groups in (False, True):
        got = syn.recall_at_n(q, db, utm_q, utm_db, ns=(1, 2, 3), db_groups=groups if use_groups else None)
        sims = q @ db.T
        near = np.linalg.norm(utm_q[:, None] - utm_db[None], axis=-1) <= 25.0
        for n in (1, 2, 3):
            hits = 0
            for i in range(len(q)):
                order = list(np.argsort(-sims[i], kind="stable"))
                if use_groups:
                    seen, kept = set(), []
                    for j in order:
                        if groups[j] not in seen:
                            seen.add(groups[j])
                            kept.append(j)
                    order = kept
                hits += bool(near[i, order[:n]].any())
            assert got[n] == pytest.approx(100.0 * hits / len(q))


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        syn.generate(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="unknown synthetic options"):
        syn.resolve_config("tiny", colour="red")
    with pytest.raises(ValueError, match="query_views"):
        syn.resolve_config("tiny", query_views=13)
    with pytest.raises(ValueError, match="condition"):
        syn.Light("dusk")
    cfg = syn.resolve_config("tiny", places=48)
    assert (
        cfg.pitts_places == 48 and cfg.pitts_query_positions == 2 * syn.PRESETS["tiny"].pitts_query_positions
    )


def test_project_reader_reads_the_synthetic_city(tiny):
    datasets = pytest.importorskip("sfrs_dist.data.datasets")
    splits = datasets.load_dataset("synthetic", tiny)
    names = {(s.name, s.split) for s in splits}
    assert {("pitts30k", "train"), ("pitts30k", "val"), ("pitts30k", "test"), ("tokyo247", "test")} <= names
    tokyo = next(s for s in splits if s.name == "tokyo247")
    assert all(Path(r.file).suffix == ".png" and Path(r.file).is_file() for r in tokyo.database)
    assert {r.condition for r in tokyo.queries} == set(syn.CONDITIONS)


def test_validation_queries_take_their_own_light_mix():
    """The demo city's validation queries are mostly at sunset (a harder split that can rank
    networks); the training and test splits keep the preset's mix."""
    from sfrs_dist.data.synthetic import plan_pittsburgh, resolve_config

    cfg = resolve_config("tiny", pitts_query_positions=30, val_query_conditions=(0.0, 1.0, 0.0))
    _, splits, _ = plan_pittsburgh(np.random.default_rng(0), cfg)
    assert set(splits["val"]["q_conditions"]) == {"sunset"}
    assert {"day"} <= set(splits["test"]["q_conditions"]) <= {"day", "sunset"}
    assert splits["train"]["q_conditions"].count("day") > splits["train"]["q_conditions"].count("sunset")
    demo = resolve_config("demo")
    assert demo.val_query_conditions is not None and demo.val_query_conditions[1] > demo.pitts_query_conditions[1]
    with pytest.raises(ValueError, match="val_query_conditions"):
        resolve_config("tiny", val_query_conditions=(1.0, -1.0, 0.0))
