"""The @UTM-named layout of VPR-datasets-downloader: names, reader errors, the same synthetic city
read from both layouts (same splits, same recall tables through launch/evaluate.py, the suite
table and the descriptors written out), a training split from this layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from vpr_convert import to_vpr_layout

from sfrs_dist.config import ConfigError, DataConfig
from sfrs_dist.data.datasets import DatasetFormatError, panorama_ids
from sfrs_dist.data.manifest import MANIFEST_NAME, Manifest
from sfrs_dist.data.random_access import ShardReader
from sfrs_dist.data.test_sets import locate_splits
from sfrs_dist.data.vpr_layout import load_vpr_layout, parse_name, split_from_names
from sfrs_dist.evaluation.protocols import frame_positives, positives, protocol_note
from sfrs_dist.evaluation.recall import recall_at_n
from sfrs_dist.models import build_model
from sfrs_dist.training.checkpoint import atomic_torch_save
from sfrs_dist.training.trainer import TrainSplit

REPO = Path(__file__).resolve().parent.parent
BUILD = str(REPO / "launch" / "build_shards.py")
EVALUATE = str(REPO / "launch" / "evaluate.py")
TINY = str(REPO / "configs" / "tiny.yaml")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _build(root: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BUILD, "--dataset", "utm", "--root", str(root), "--out", str(out),
                           "--shard-size", "16", "--no-progress", *more], capture_output=True, text=True, env=_env())


def test_parse_name_fields_and_errors():
    f = parse_name("@0584735.48@4477038.99@17@T@040.44086@-079.99931@000546@05@@@@@@pitch1_yaw6@.jpg")
    assert f == {"utm_east": "584735.48", "utm_north": "4477038.99", "utm_zone": "17", "utm_letter": "T",
                 "lat": "040.44086", "lon": "-079.99931", "pano_id": "000546", "tile_num": "05",
                 "note": "pitch1_yaw6"}
    assert parse_name("sub/@1.5@-2@.png") == {"utm_east": "1.5", "utm_north": "-2.0"}
    assert parse_name("@1@2@@@@@@@@@@@@@@x@.jpg") == {"utm_east": "1.0", "utm_north": "2.0", "field16": "x"}
    with pytest.raises(DatasetFormatError, match=r"000546_pitch1_yaw6\.jpg: not an @UTM"):
        parse_name("000/000546_pitch1_yaw6.jpg")
    with pytest.raises(DatasetFormatError, match=r"@12a@4@\.jpg: field utm_east is '12a'"):
        parse_name("@12a@4@.jpg")
    with pytest.raises(DatasetFormatError, match="field utm_north is ''"):
        parse_name("@12@@17@T@.jpg")


def _tiny_layout(root: Path) -> None:
    for split in ("train", "test"):
        for role in ("database", "queries"):
            d = root / "images" / split / role
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"@{500000 + 30 * i}.0@{4400000 + i}.5@17@T@@@@@@@@@@@.jpg").write_bytes(b"x")


def test_reader_errors_are_one_line_and_nothing_is_left_under_the_final_name(tmp_path):
    root = tmp_path / "city"
    _tiny_layout(root)
    s = {f"{x.name}_{x.split}": x for x in load_vpr_layout(root)}
    assert sorted(s) == ["city_test", "city_train"]
    assert s["city_train"].nontriv_pos_dist_sq_thr == 100.0 and s["city_test"].pos_dist_thr == 25.0
    assert s["city_test"].database[1].utm == (500030.0, 4400001.5)
    assert [x.name for x in load_vpr_layout(root, name="pitts30k")] == ["pitts30k", "pitts30k"]

    bad = root / "images" / "test" / "queries" / "IMG_0001.jpg"
    bad.write_bytes(b"x")
    for f in (root / "images" / "train" / "queries").iterdir():
        f.unlink()
    cases = [(bad, "not an @UTM"), (root / "images" / "train" / "queries", "no images")]
    for path, what in cases:
        out = tmp_path / "shards"
        res = _build(root, out, "--splits", path.relative_to(root / "images").parts[0])
        err = res.stderr.strip()
        assert res.returncode == 2 and len(err.splitlines()) == 1, err
        assert str(path) in err and what in err, err
        assert not out.exists()
    (root / "images" / "test" / "queries").rename(root / "images" / "test" / "query")
    res = _build(root, tmp_path / "shards", "--splits", "test")
    assert res.returncode == 2 and str(root / "images" / "test" / "queries") in res.stderr
    assert "queries/ folder missing" in res.stderr


def test_a_build_that_fails_midway_leaves_only_the_partial_folder(tmp_path):
    root = tmp_path / "city"
    _tiny_layout(root)  # the images are not JPEGs: the build stops at the first one
    out = tmp_path / "shards"
    res = _build(root, out)
    assert res.returncode == 2 and "neither JPEG nor PNG" in res.stderr
    assert not out.exists() and (tmp_path / ".shards.partial").is_dir()


@pytest.fixture(scope="module")
def both_layouts(synthetic_raw, split_shard_sets, tmp_path_factory):
    """The synthetic city's shard sets from the .mat layouts and from the @UTM layout."""
    base = tmp_path_factory.mktemp("vpr")
    names = to_vpr_layout(synthetic_raw, base / "raw")
    vpr = {}
    for city in ("pitts30k", "tokyo247"):
        res = _build(base / "raw" / city, base / city, "--workers", "1")
        assert res.returncode == 0, res.stderr
        vpr[city] = base / city
    return {"mat": dict(zip(("pitts30k", "tokyo247"), split_shard_sets)), "vpr": vpr, "names": names}


def _by_file(m: Manifest, sid: str, role: str):
    """Sorted (utm, sha256 of the stored image) of a role: what the split holds, whatever its order or keys."""
    col = m.splits[sid].role(role)
    with ShardReader(m.root, m) as reader:
        return sorted((tuple(u), hashlib.sha256(reader.get(k, decode=False)[0]).hexdigest())
                      for u, k in zip(col.utm, col.keys))


def test_same_splits_from_both_layouts_and_training_positives(both_layouts):
    mat, vpr = both_layouts["mat"], both_layouts["vpr"]
    for city in ("pitts30k", "tokyo247"):
        a, b = Manifest.load(mat[city]), Manifest.load(vpr[city])
        assert sorted(a.splits) == sorted(b.splits)
        for sid in a.splits:
            for role in ("db", "q"):
                # same images (their bytes, digested in the index) at the same positions
                assert _by_file(a, sid, role) == _by_file(b, sid, role), (sid, role)
            sa, sb = a.split_data(sid), b.split_data(sid)
            assert (sa.pos_dist_thr, sa.nontriv_pos_dist_sq_thr) == (sb.pos_dist_thr, sb.nontriv_pos_dist_sq_thr)
    # Tokyo: pano_id groups the same cutouts as the .mat's shared UTM positions
    ta, tb = Manifest.load(mat["tokyo247"]).split_data("tokyo247_test"), \
        Manifest.load(vpr["tokyo247"]).split_data("tokyo247_test")
    pa, pb = panorama_ids(ta), panorama_ids(tb)
    groups_a = {frozenset(tuple(r.utm) for r, p in zip(ta.database, pa) if p == g) for g in set(pa)}
    groups_b = {frozenset(tuple(r.utm) for r, p in zip(tb.database, pb) if p == g) for g in set(pb)}
    assert groups_a == groups_b and len(groups_b) == len(set(pb)) > 1
    assert all(r.extra["pano_id"] for r in tb.database)
    assert sorted(r.condition for r in tb.queries) == sorted(r.condition for r in ta.queries)
    # a training split from this layout: the same queries kept, the same positives (as positions)
    tr_a = TrainSplit.from_manifest(Manifest.load(mat["pitts30k"]), "pitts30k_train")
    tr_b = TrainSplit.from_manifest(Manifest.load(vpr["pitts30k"]), "pitts30k_train")
    for tr, m in ((tr_a, Manifest.load(mat["pitts30k"])), (tr_b, Manifest.load(vpr["pitts30k"]))):
        sd = m.split_data("pitts30k_train")
        tr.pos_sets = sorted((sd.queries[q].utm, tuple(sorted(sd.database[j].utm for j in tr.train_pos[q])))
                             for q in tr.queries)
    assert len(tr_b.queries) == len(tr_a.queries) > 0 and tr_a.pos_sets == tr_b.pos_sets


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = build_model("smallcnn", num_clusters=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from sfrs_dist.config import load_config

    atomic_torch_save({"model": net.state_dict(), "generation": 0, "config": load_config(TINY).to_dict()}, path)
    return path


def _evaluate(shards: dict, ckpt: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, EVALUATE, "--config", TINY, "--checkpoint", str(ckpt), "--out", str(out),
           "--set", f"data.shards={shards['pitts30k']}", "--set", f"data.test_shards=[{shards['tokyo247']}]",
           "--set", "data.test_sets=[pitts30k_test,tokyo247_test,pitts30k_val]",
           # exact fp32 search: the bf16 short list is not exact at the near-ties of an untrained network
           "--set", "eval.bf16=false", "--set", "eval.bf16_search=false", *more]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_same_recall_tables_from_both_layouts_and_descriptors_out(both_layouts, tmp_path):
    ckpt = _checkpoint(tmp_path / "generation00_final.pt")
    _evaluate(both_layouts["mat"], ckpt, tmp_path / "mat" / "eval.json")
    res = _evaluate(both_layouts["vpr"], ckpt, tmp_path / "vpr" / "eval.json",
                    "--save-descriptors", str(tmp_path / "desc"))
    mat = json.loads((tmp_path / "mat" / "eval_table.json").read_text())
    vpr = json.loads((tmp_path / "vpr" / "eval_table.json").read_text())
    assert mat["rows"] == vpr["rows"] and list(vpr["rows"]) == ["generation00_final"]
    assert [c["split"] for c in vpr["columns"]] == ["pitts30k_test"] * 3 + ["tokyo247_test"] * 3 + ["pitts30k_val"] * 3
    assert "spatial NMS" in vpr["protocols"]["tokyo247_test"] and "25 m" in vpr["protocols"]["pitts30k_test"]
    full = {k: v for k, v in json.loads((tmp_path / "vpr" / "eval.json").read_text())[str(ckpt)].items()}
    assert full == json.loads((tmp_path / "mat" / "eval.json").read_text())[str(ckpt)]  # conditions too
    md = (tmp_path / "vpr" / "eval_table.md").read_text()
    assert md.splitlines()[0].startswith("| network | pitts30k_test R@1 |") and md in res.stdout
    r1 = vpr["rows"]["generation00_final"]["pitts30k_test"]["R@1"]
    assert f"| generation00_final | {r1:.1f} |" in md

    # the descriptors written out: numpy arrays faiss searches, names and UTMs of the manifest
    d = tmp_path / "desc" / "generation00_final" / "pitts30k_test"
    db, q = np.load(d / "database.npy"), np.load(d / "queries.npy")
    m = Manifest.load(both_layouts["vpr"]["pitts30k"])
    entry = m.splits["pitts30k_test"]
    assert db.dtype == np.float32 and db.shape[0] == len(entry.database.keys) and q.shape[0] == len(entry.queries.keys)
    assert (d / "database_names.txt").read_text().splitlines() == entry.database.relpath
    assert np.array_equal(np.load(d / "queries_utm.npy"), np.asarray(entry.queries.utm))
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    _, topk = index.search(q, 10)
    rec = recall_at_n(topk, m.split_data("pitts30k_test").potential_positives(), (1, 5, 10))
    assert 100 * rec[1] == pytest.approx(r1) and 100 * rec[10] == pytest.approx(
        vpr["rows"]["generation00_final"]["pitts30k_test"]["R@10"])
    assert (tmp_path / "desc" / "generation00_final" / "tokyo247_test" / "queries.npy").is_file()


def test_suite_tests_only_the_sets_present(both_layouts, tmp_path):
    vpr = both_layouts["vpr"]
    data = DataConfig(shards=str(vpr["pitts30k"]), test_shards=[str(vpr["tokyo247"]), str(tmp_path / "msls")],
                      test_sets=["pitts30k_test", "msls_val", "tokyo247_test"], test_sets_present_only=True)
    assert list(locate_splits(data, data.test_sets)) == ["pitts30k_test", "tokyo247_test"]
    data.test_sets_present_only = False
    with pytest.raises(ConfigError, match="msls.*no manifest"):
        locate_splits(data, data.test_sets)
    data.test_sets_present_only = True
    with pytest.raises(ConfigError, match="none of"):
        locate_splits(data, ["msls_val"])
    assert (vpr["pitts30k"] / MANIFEST_NAME).is_file()


def test_frame_positives():
    q = np.array([0, 5, 9])
    db = np.array([9, 0, 1, 2, 4, 6, 8])
    got = frame_positives(q, db, 1)
    assert [g.tolist() for g in got] == [[1, 2], [4, 5], [0, 6]]
    assert [g.tolist() for g in frame_positives(q, db, 0)] == [[1], [], [0]]


def test_training_on_the_vpr_layout_tests_the_sets_present(both_layouts, tmp_path):
    """A train split of this layout trains as a .mat one does; every generation is tested on the
    listed sets that are built (a missing one skipped), logged to MLflow, and the final table printed."""
    vpr = both_layouts["vpr"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "launch" / "train.py"), "--config", TINY]
    for s in (f"data.shards={vpr['pitts30k']}", f"data.test_shards=[{vpr['tokyo247']},{tmp_path / 'msls'}]",
              "data.test_sets=[pitts30k_test,msls_val,tokyo247_test]", "data.test_sets_present_only=true",
              "train.generations=1", "train.max_steps_per_epoch=2", f"run.out_dir={out}"):
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfrs").experiment_id])
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    m = child.data.metrics
    assert m["loss_hard"] > 0
    assert 0 <= m["pitts30k_test/all/recall_1"] <= 100 and 0 <= m["tokyo247_test/night/recall_5"] <= 100
    assert not any(k.startswith("msls_val") for k in m)
    assert "msls_val is in none of the shard sets present: skipped" in res.stderr
    head = next(line for line in res.stdout.splitlines() if line.startswith("| network |"))
    assert head.startswith("| network | pitts30k_test R@1 | pitts30k_test R@5 | pitts30k_test R@10 | tokyo247_test R@1")
    row = next(line for line in res.stdout.splitlines() if line.startswith("| generation 0 |"))
    assert row.split("|")[2].strip() == f"{m['pitts30k_test/all/recall_1']:.1f}"


def test_nordland_protocol_from_names():
    names = [f"@0.00@{2.4 * i:.2f}@33@V@@@@@@@@@@images-{i:05d}@.jpg" for i in range(6)]
    split = split_from_names("nordland", "test", names, names[::2])
    assert [p.tolist() for p in positives(split, 1)] == [[0, 1], [1, 2, 3], [3, 4, 5]]
    assert [p.tolist() for p in positives(split, 0)] == [[0], [2], [4]]
    assert protocol_note(split, 1) == "3 queries, 6 database images; positives within +-1 frame(s)"
    assert "positives within 25 m" in protocol_note(split_from_names("pitts30k", "test", names, names), 1)
    off = split_from_names("nordland", "test", names, ["@0@3.6@.jpg"])
    with pytest.raises(ValueError, match=r"nordland_test: @0@3\.6@\.jpg has UTM north 3\.6, not on the 2\.4 m"):
        positives(off, 1)
