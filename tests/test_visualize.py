"""Retrieval strips and region-similarity heat maps: sizes, frame colours, colour order."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sfrs_dist.evaluation.visualize import (
    CORRECT_COLOR,
    QUERY_COLOR,
    WRONG_COLOR,
    render_query_positive_regions,
    render_region_similarity,
    render_retrievals,
)

ROOT = Path(__file__).resolve().parents[1]


def solid(color, size=(30, 40)):
    return np.full((*size, 3), color, dtype=np.uint8)


def cell_box(i, tile, border, gap, label_h):
    th, tw = tile
    cw = tw + 2 * border
    return gap + i * (cw + gap), gap + label_h, cw, th + 2 * border


def check_strip(img: Image.Image, flags, tile, border, gap, label_h, fills=None):
    arr = np.asarray(img)
    th, tw = tile
    n = 1 + len(flags)
    assert img.size == (n * (tw + 2 * border + gap) + gap, label_h + th + 2 * border + 2 * gap)
    expected = [QUERY_COLOR] + [CORRECT_COLOR if f else WRONG_COLOR for f in flags]
    for i, color in enumerate(expected):
        x0, y0, cw, ch = cell_box(i, tile, border, gap, label_h)
        # the four sides of the frame, sampled at their middles and at a corner
        for x, y in [(x0 + cw // 2, y0 + border // 2), (x0 + cw // 2, y0 + ch - 1 - border // 2),
                     (x0 + border // 2, y0 + ch // 2), (x0 + cw - 1 - border // 2, y0 + ch // 2), (x0, y0)]:
            assert tuple(arr[y, x]) == color, (i, x, y)
        if fills is not None:  # the image inside the frame
            assert tuple(arr[y0 + border + th // 2, x0 + border + tw // 2]) == fills[i]


def test_render_retrievals_frames(tmp_path):
    fills = [(200, 200, 0), (10, 20, 30), (90, 90, 250), (128, 0, 128)]
    flags = [True, False, True]
    path = str(tmp_path / "sub" / "q.png")
    tile, border, gap, label_h = (60, 80), 5, 4, 14
    out = render_retrievals(solid(fills[0]), [Image.fromarray(solid(c)) for c in fills[1:]], flags, path,
                            tile=tile, border=border, gap=gap, label_h=label_h)
    assert out == path and Path(path).exists()
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["q.png"]
    img = Image.open(path)
    assert img.format == "PNG"
    check_strip(img.convert("RGB"), flags, tile, border, gap, label_h, fills)


def test_render_retrievals_accepts_float_and_chw_arrays(tmp_path):
    q = np.zeros((3, 20, 20), np.float32)
    q[1] = 1.0  # green channel-first float image
    path = str(tmp_path / "q.png")
    render_retrievals(q, [np.ones((20, 20, 3), np.float32)], [False], path, tile=(20, 20), border=3,
                      gap=2, label_h=10)
    img = Image.open(path).convert("RGB")
    check_strip(img, [False], (20, 20), 3, 2, 10, fills=[(0, 255, 0), (255, 255, 255)])
    with pytest.raises(ValueError, match="2 retrieved images but 1 flags"):
        render_retrievals(q, [q, q], [True], path)


def test_region_heatmap_monotonic(tmp_path):
    rng = np.random.default_rng(0)
    sim = rng.permutation(81).reshape(9, 9) / 80.0 * 1.4 - 0.4  # 81 distinct values in [-0.4, 1.0]
    cell, label_w, header_h, title_h = 30, 70, 20, 20
    path = str(tmp_path / "heat.png")
    render_region_similarity(sim, path, title="query vs positive", cell=cell, label_w=label_w,
                             header_h=header_h, title_h=title_h)
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    assert arr.shape == (title_h + header_h + 9 * cell + 4, label_w + 9 * cell + 4, 3)
    lum = np.empty((9, 9))
    for i in range(9):
        for j in range(9):
            y, x = title_h + header_h + i * cell + 2, label_w + j * cell + 2  # away from the value text
            lum[i, j] = arr[y, x] @ np.array([0.299, 0.587, 0.114])
    order = np.argsort(sim.ravel())
    assert (np.diff(lum.ravel()[order]) > 0).all()


def test_query_positive_panel(tmp_path):
    sims = [np.eye(9), np.full((9, 9), 0.5)]
    path = str(tmp_path / "panel.png")
    render_query_positive_regions(solid((1, 2, 3)), [solid((4, 5, 6)), solid((7, 8, 9))], sims, path,
                                  tile=(50, 60))
    one = Image.open(path)
    render_query_positive_regions(solid((1, 2, 3)), [solid((4, 5, 6))], sims[:1], str(tmp_path / "one.png"),
                                  tile=(50, 60))
    assert one.size[1] == 2 * Image.open(tmp_path / "one.png").size[1]


def _png_bytes(color):
    buf = io.BytesIO()
    Image.fromarray(solid(color, (24, 32))).save(buf, format="PNG")
    return buf.getvalue()


def test_launch_visualize_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("launch_visualize", ROOT / "launch" / "visualize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    rng = np.random.default_rng(1)
    n_db, dim = 12, 16
    db = rng.standard_normal((n_db, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[[3, 7]] + 0.05 * rng.standard_normal((2, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    db_utm = np.stack([np.arange(n_db) * 20.0, np.zeros(n_db)], axis=1)  # 20 m apart on a line
    q_utm = db_utm[[3, 7]] + [[1.0, 0.0], [-2.0, 0.0]]
    db_keys = [f"city_test_db_{i:06d}" for i in range(n_db)]
    q_keys = ["city_test_q_000000", "city_test_q_000001"]
    colors = {k: (i * 20 % 256, 100, 200 - i * 10) for i, k in enumerate(db_keys + q_keys)}
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s, keys in enumerate([db_keys[:7], db_keys[7:] + q_keys]):
        with wds.TarWriter(str(shard_dir / f"test-{s:06d}.tar")) as w:
            for k in keys:
                w.write({"__key__": k, "png": _png_bytes(colors[k]), "json": json.dumps({"key": k}).encode()})
    desc = str(tmp_path / "desc.npz")
    np.savez(desc, db=db, queries=queries, db_keys=np.array(db_keys), query_keys=np.array(q_keys),
             db_utm=db_utm, query_utm=q_utm)
    regions = str(tmp_path / "regions.npz")
    reg_keys = q_keys + db_keys
    np.savez(regions, keys=np.array(reg_keys), regions=rng.standard_normal((len(reg_keys), 9, 4)))
    out = tmp_path / "vis"
    written = script.main(["--shards", str(shard_dir), "--descriptors", desc, "--query-keys", q_keys[1],
                           "--topk", "4", "--regions", regions, "--out", str(out)])
    assert [Path(p).name for p in written] == [f"{q_keys[1]}_top4.png", f"{q_keys[1]}_regions.png"]
    # Expected retrievals and ground truth, computed independently.
    top = np.argsort(-(db @ queries[1]))[:4]
    flags = [abs(db_utm[j, 0] - q_utm[1, 0]) <= 25.0 for j in top]
    assert True in flags and False in flags
    img = Image.open(written[0]).convert("RGB")
    check_strip(img, flags, (180, 240), 6, 6, 30)
    with pytest.raises(KeyError, match="query keys not in"):
        script.main(["--shards", str(shard_dir), "--descriptors", desc, "--query-keys", "nope",
                     "--out", str(out)])
