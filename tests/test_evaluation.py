"""Search, Recall@N, spatial NMS, PCA whitening and distributed descriptor gathering."""

from __future__ import annotations

import os
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from sfrs_dist.evaluation.pca import PCAWhitening
from sfrs_dist.evaluation.recall import evaluate_retrieval, recall_at_n, recall_table, spatial_nms
from sfrs_dist.evaluation.search import num_faiss_gpus, search_topk
from sfrs_dist.extraction.descriptors import extract_descriptors, gather_descriptors, order_descriptors


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n_places: int, per_place: int, dim: int, noise: float):
    centres = unit(rng.standard_normal((n_places, dim)))
    place = np.repeat(np.arange(n_places), per_place)
    return unit(centres[place] + noise * rng.standard_normal((place.size, dim))), place, centres


# ----------------------------------------------------------------------------- search


def test_search_topk_matches_bruteforce():
    rng = np.random.default_rng(0)
    db, queries = unit(rng.standard_normal((700, 24))), unit(rng.standard_normal((50, 24)))
    scores, idx = search_topk(db, queries, k=15, chunk=16)
    full = queries.astype(np.float64) @ db.T.astype(np.float64)
    ref = np.argsort(-full, axis=1)[:, :15]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(full, ref, axis=1), atol=1e-5)
    assert idx.dtype == np.int64 and scores.dtype == np.float32


def test_search_topk_pads_when_k_exceeds_database():
    rng = np.random.default_rng(1)
    db, queries = unit(rng.standard_normal((4, 8))), unit(rng.standard_normal((3, 8)))
    for bf16 in (False, True):
        scores, idx = search_topk(db, queries, k=6, bf16=bf16)
        assert idx.shape == (3, 6)
        assert (idx[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
        assert all(sorted(row[:4]) == [0, 1, 2, 3] for row in idx)


def test_bf16_search_equals_exact_up_to_near_ties():
    rng = np.random.default_rng(2)
    db, _, centres = clustered(rng, 60, 20, 128, 0.9)
    queries = unit(centres[rng.integers(0, 60, 80)] + 0.9 * rng.standard_normal((80, 128)))
    k = 10
    s_ex, i_ex = search_topk(db, queries, k)
    s_bf, i_bf = search_topk(db, queries, k, bf16=True, chunk=32)
    # Scores are exact fp32 re-scores of the returned images, sorted best first.
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), db[i_bf].astype(np.float64))
    np.testing.assert_allclose(s_bf, exact, atol=1e-5)
    assert (np.diff(s_bf, axis=1) <= 1e-7).all()
    # Same results as the exact search except where scores are tied to within bf16 error.
    differ = (i_ex != i_bf).any(axis=1)
    assert differ.mean() <= 0.05
    np.testing.assert_allclose(s_bf, s_ex, atol=5e-3)


def test_search_errors():
    a = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="dimension mismatch"):
        search_topk(a, np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="k must be"):
        search_topk(a, a, 0)
    if num_faiss_gpus() == 0:
        with pytest.raises(RuntimeError, match="no GPU"):
            search_topk(a, a, 2, use_gpu=True)


# ----------------------------------------------------------------------------- recall


def reference_recall(topk, gt, ns):
    """Per-query loop as in the reference evaluation."""
    correct = np.zeros(len(ns))
    for q, pred in enumerate(topk):
        for i, n in enumerate(ns):
            if np.any(np.isin(pred[:n], gt[q])):
                correct[i:] += 1
                break
    return {n: correct[i] / len(gt) for i, n in enumerate(ns)}


def test_recall_at_n_matches_reference_loop():
    rng = np.random.default_rng(3)
    n_q, n_db = 300, 400
    topk = np.stack([rng.permutation(n_db)[:25] for _ in range(n_q)])
    topk[rng.random(topk.shape) < 0.02] = -1
    gt = [rng.choice(n_db, size=rng.integers(0, 30), replace=False) for _ in range(n_q)]
    ns = (1, 5, 10, 20)
    got = recall_at_n(topk, gt, ns)
    ref = reference_recall(topk, gt, ns)
    assert got == pytest.approx(ref, abs=1e-12)
    assert any(len(g) == 0 for g in gt)  # queries without positives count as failures
    assert 0 < got[1] < got[20] < 1


def test_recall_at_n_small_case_and_errors():
    topk = np.array([[3, 1, 2], [0, 5, 6], [7, 8, 9]])
    gt = [np.array([2]), np.array([9]), np.array([], dtype=np.int64)]
    assert recall_at_n(topk, gt, ns=(1, 3)) == {1: 0.0, 3: pytest.approx(1 / 3)}
    assert recall_at_n(np.array([[4, 2]]), [np.array([4])], ns=(1, 2)) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="recall@5 needs 5"):
        recall_at_n(topk, gt, ns=(1, 5))
    with pytest.raises(ValueError, match="positive lists"):
        recall_at_n(topk, gt[:2], ns=(1,))


def reference_nms(row, pano, n):
    seen, out = set(), []
    for j in row:
        if j < 0 or pano[j] in seen:
            continue
        seen.add(pano[j])
        out.append(j)
    out = out[:n]
    return out + [-1] * (n - len(out))


def test_spatial_nms_matches_loop():
    rng = np.random.default_rng(4)
    n_db, n = 240, 5
    pano = rng.integers(0, 30, n_db)
    idx = np.stack([rng.permutation(n_db)[:12 * n] for _ in range(40)])
    idx[rng.random(idx.shape) < 0.05] = -1
    idx[0, :] = np.flatnonzero(pano == pano[0])[:1].repeat(12 * n)  # one panorama only: padding
    got = spatial_nms(idx, pano, n)
    ref = np.array([reference_nms(row, pano, n) for row in idx])
    np.testing.assert_array_equal(got, ref)
    assert (got[0, 1:] == -1).all()
    with pytest.raises(ValueError, match="out of range"):
        spatial_nms(np.array([[n_db]]), pano, 1)


def test_recall_table_per_condition():
    rng = np.random.default_rng(5)
    topk = np.stack([rng.permutation(50)[:20] for _ in range(30)])
    gt = [rng.choice(50, 3, replace=False) for _ in range(30)]
    cond = [("night", "day", "sunset")[i % 3] for i in range(30)]
    table = recall_table(topk, gt, cond)
    assert list(table) == ["all", "day", "sunset", "night"]
    assert table["all"] == reference_recall(topk, gt, (1, 5, 10, 20))
    for name in ("day", "sunset", "night"):
        sel = [i for i, c in enumerate(cond) if c == name]
        assert table[name] == pytest.approx(reference_recall(topk[sel], [gt[i] for i in sel], (1, 5, 10, 20)))
    assert list(recall_table(topk, gt)) == ["all"]


def test_evaluate_retrieval_with_panoramas():
    rng = np.random.default_rng(6)
    db, place, centres = clustered(rng, 40, 12, 32, 0.8)
    q_place = rng.integers(0, 40, 25)
    queries = unit(centres[q_place] + 0.8 * rng.standard_normal((25, 32)))
    gt = [np.flatnonzero(place == p) for p in q_place]
    pano = place.copy()  # 12 cutouts per panorama
    table = evaluate_retrieval(db, queries, gt, ns=(1, 2, 3), panorama_ids=pano)
    full = queries @ db.T
    ref_topk = []
    for row in np.argsort(-full, axis=1):  # brute force: best image per panorama
        ref_topk.append(reference_nms(row, pano, 3))
    assert table["all"] == pytest.approx(reference_recall(np.array(ref_topk), gt, (1, 2, 3)))


# ----------------------------------------------------------------------------- PCA


def anisotropic(rng, n, dim, rank=None):
    rank = rank or dim
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    scales = np.linspace(3.0, 0.3, rank)
    return (rng.standard_normal((n, rank)) * scales) @ basis.T + rng.standard_normal(dim)


@pytest.mark.parametrize("n,dim,dims", [(80, 200, 30), (400, 40, 25)])
def test_pca_whitening_matches_numpy_eigendecomposition(n, dim, dims):
    rng = np.random.default_rng(7)
    x = anisotropic(rng, n, dim, rank=min(n - 1, dim)).astype(np.float32)
    pca = PCAWhitening(dims=dims).fit(x)
    y = pca.transform(x, batch_size=17, normalize=False).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(dims), atol=1e-3)
    # Independent reference: eigendecomposition of the D x D covariance.
    lam, vec = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    lam, vec = lam[::-1][:dims], vec[:, ::-1][:, :dims]
    np.testing.assert_allclose(pca.lams, lam, rtol=1e-4)
    np.testing.assert_allclose(np.abs(pca.U.T.astype(np.float64) @ vec), np.eye(dims), atol=1e-3)
    ref = (x - x.mean(0)) @ vec / np.sqrt(lam)
    np.testing.assert_allclose(np.abs(y), np.abs(ref), atol=1e-3)
    z = pca.transform(torch.from_numpy(x))
    assert isinstance(z, torch.Tensor)
    np.testing.assert_allclose(np.linalg.norm(z.numpy(), axis=1), 1.0, atol=1e-5)


def test_pca_clamps_dims_to_rank():
    rng = np.random.default_rng(8)
    x = anisotropic(rng, 20, 64).astype(np.float32)
    assert PCAWhitening(dims=4096).fit(x).out_dim == 19
    low_rank = anisotropic(rng, 50, 64, rank=5).astype(np.float32)
    assert PCAWhitening(dims=30).fit(low_rank).out_dim == 5


def test_pca_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    x = anisotropic(rng, 60, 100).astype(np.float32)
    pca = PCAWhitening(dims=16).fit(x)
    path = str(tmp_path / "pca.h5")
    pca.save(path)
    assert sorted(os.listdir(tmp_path)) == ["pca.h5"]
    with h5py.File(path, "r") as f:
        assert f["U"].shape == (100, 16) and f["lams"].shape == (16,)
        assert f["mu"].shape == (100,) and f["Utmu"].shape == (16,)
    back = PCAWhitening.load(path)
    np.testing.assert_allclose(back.transform(x), pca.transform(x), atol=1e-6)
    np.testing.assert_allclose(PCAWhitening.load(path, dims=8).transform(x[:5], normalize=False),
                               pca.transform(x[:5], normalize=False)[:, :8], atol=1e-4)


def test_pca_loads_reference_layout(tmp_path):
    rng = np.random.default_rng(10)
    dim, d = 48, 12
    U = np.linalg.qr(rng.standard_normal((dim, d)))[0].astype(np.float32)
    lams = np.sort(rng.uniform(0.1, 2.0, d))[::-1].astype(np.float32)
    mu = rng.standard_normal((dim, 1)).astype(np.float32)
    path = str(tmp_path / "openibl_pca.h5")
    with h5py.File(path, "w") as f:  # column vectors, as written by the reference
        f.create_dataset("U", data=U)
        f.create_dataset("lams", data=lams)
        f.create_dataset("mu", data=mu)
        f.create_dataset("Utmu", data=U.T @ mu)
    x = rng.standard_normal((7, dim)).astype(np.float32)
    for dims in (d, 5):
        w = U[:, :dims].astype(np.float64) / np.sqrt(lams[:dims].astype(np.float64))
        y = x.astype(np.float64) @ w - (w.T @ mu.astype(np.float64)).ravel()
        ref = y / np.linalg.norm(y, axis=1, keepdims=True)
        got = PCAWhitening.load(path, dims=dims).transform(x)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_pca_load_errors(tmp_path):
    path = str(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("U", data=np.eye(4, 2, dtype=np.float32))
        f.create_dataset("mu", data=np.zeros(4, np.float32))
    with pytest.raises(KeyError, match=r"bad\.h5.*'lams', 'Utmu'"):
        PCAWhitening.load(path)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        PCAWhitening.load(str(tmp_path / "nope.h5"))


# ----------------------------------------------------------------------------- extraction


def make_batches(keys, images, batch_size):
    return [{"key": keys[i:i + batch_size], "image": images[i:i + batch_size]}
            for i in range(0, len(keys), batch_size)]


def test_extract_descriptors_single_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    images = torch.randn(10, 3, 4, 4)
    keys = [f"img{i}" for i in range(10)]
    got_keys, descs = extract_descriptors(model, make_batches(keys, images, 4), 6, torch.device("cpu"),
                                          progress=False)
    assert got_keys == keys and descs.dtype == np.float32
    np.testing.assert_allclose(descs, model(images).detach().numpy(), atol=1e-6)
    _, d16 = extract_descriptors(model, make_batches(keys, images, 4), 6, torch.device("cpu"),
                                 autocast_dtype=torch.bfloat16, progress=False)
    assert d16.dtype == np.float32 and not np.array_equal(d16, descs)
    np.testing.assert_allclose(d16, descs, atol=0.1)
    with pytest.raises(ValueError, match=r"expected \(4, 5\)"):
        extract_descriptors(model, make_batches(keys, images, 4), 5, torch.device("cpu"), progress=False)


def test_order_descriptors_errors():
    a = (["a", "b"], np.ones((2, 3), np.float32))
    b = (["c", "b"], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="more than once.*'b'"):
        order_descriptors([a, b], ["a", "b", "c"])
    with pytest.raises(ValueError, match="missing.*'d'"):
        order_descriptors([a, (["c"], np.zeros((1, 3), np.float32))], ["d", "a", "b", "c"])
    out = order_descriptors([a, (["c", "x"], np.full((2, 3), 2, np.float32))], ["c", "a"])
    np.testing.assert_array_equal(out, [[2, 2, 2], [1, 1, 1]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port=port):
        torch.manual_seed(0)  # same model on both ranks
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(11, 3, 4, 4, generator=gen)
        keys = [f"k{i:02d}" for i in range(11)]
        mine = list(range(rank, 11, world))  # disjoint parts
        got_keys, descs = extract_descriptors(
            model, make_batches([keys[i] for i in mine], images[mine], 2), 5, torch.device("cpu"),
            progress=False)
        order = [keys[i] for i in np.random.default_rng(2).permutation(11)]
        full = gather_descriptors(got_keys, descs, order)
        np.save(os.path.join(out_dir, f"gathered{rank}.npy"), full)
        ref = model(images).detach().numpy()[[int(k[1:]) for k in order]]
        np.save(os.path.join(out_dir, f"reference{rank}.npy"), ref)
        # Both ranks send "k00": every rank reports the duplicate.
        try:
            gather_descriptors(["k00"], descs[:1], ["k00"])
            msg = ""
        except ValueError as e:
            msg = str(e)
        with open(os.path.join(out_dir, f"dup{rank}.txt"), "w") as f:
            f.write(msg)


def test_gather_descriptors_two_gloo_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = np.load(tmp_path / f"gathered{rank}.npy")
        ref = np.load(tmp_path / f"reference{rank}.npy")
        assert got.shape == (11, 5)
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert "more than once" in (tmp_path / f"dup{rank}.txt").read_text()
        assert "'k00'" in (tmp_path / f"dup{rank}.txt").read_text()


# ----------------------------------------------------------------------------- sharded database


def test_merge_topk_orders_by_score_then_global_id():
    from sfrs_dist.evaluation.search import merge_topk

    a = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[7, 3, -1]]))
    b = (np.array([[0.9, 0.7, 0.5]], np.float32), np.array([[2, 8, 1]]))
    scores, ids = merge_topk([a, b], 5)
    np.testing.assert_array_equal(ids, [[2, 7, 8, 1, 3]])  # ties (0.9, 0.5): smaller id first
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.9, 0.7, 0.5, 0.5]], np.float32))
    scores, ids = merge_topk([a], 4)  # fewer results than k: padded
    np.testing.assert_array_equal(ids, [[7, 3, -1, -1]])
    assert np.isneginf(scores[0, 2:]).all()


def test_sharded_search_single_process_equals_full_search():
    """Shards of uneven size, one empty, rows not contiguous: merged top-k equals the full search."""
    from sfrs_dist.evaluation.search import merge_topk, search_shard, sharded_search_topk

    rng = np.random.default_rng(11)
    db, queries = unit(rng.standard_normal((90, 16))), unit(rng.standard_normal((20, 16)))
    owner = rng.integers(0, 3, 90)
    owner[owner == 2] = 1  # shard 2 empty
    for k in (7, 120):  # 120 > database: padding
        ref_s, ref_i = search_topk(db, queries, k)
        parts = [search_shard(db[owner == r], np.flatnonzero(owner == r), queries, k) for r in range(3)]
        s, i = merge_topk(parts, k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-6)
    s, i = sharded_search_topk(db, np.arange(90), queries, 7)  # no process group: one shard
    np.testing.assert_array_equal(i, search_topk(db, queries, 7)[1])


def test_recall_from_topk_uses_only_the_search_depth():
    rng = np.random.default_rng(12)
    n_db = 60
    pano = np.arange(n_db) // 3
    topk = np.stack([rng.permutation(n_db) for _ in range(10)])
    gt = [rng.choice(n_db, 4, replace=False) for _ in range(10)]
    from sfrs_dist.evaluation.recall import recall_from_topk

    ns = (1, 2)
    ref = recall_table(spatial_nms(topk[:, :24], pano, 2), gt, None, ns)
    assert recall_from_topk(topk, gt, ns, panorama_ids=pano) == ref
    assert recall_from_topk(topk[:, :24], gt, ns, panorama_ids=pano) == ref
    with pytest.raises(ValueError, match=">= 24"):
        recall_from_topk(topk[:, :20], gt, ns, panorama_ids=pano)


SHARD_NS = (1, 2, 5)  # Tokyo: 12 * 5 = 60 neighbours, more than its 48 database images


def _write_noise_jpeg(path, rng, size):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)


def _noise_split(root, name, n_db, n_q, per_pano, conditions, seed):
    from sfrs_dist.data.records import DATABASE, QUERY, Record, SplitData, make_key

    rng = np.random.default_rng(seed)
    recs = {}
    for role, n in ((DATABASE, n_db), (QUERY, n_q)):
        out = []
        for i in range(n):
            rel = f"{role}/{i:06d}.jpg"
            f = root / name / rel
            _write_noise_jpeg(f, rng, (24, 32) if role == DATABASE else (28, 40))
            place = i // per_pano if role == DATABASE else i * n_db / (n_q * per_pano)
            out.append(Record(key=make_key(name, "test", role, i), name=name, split="test", role=role, index=i,
                              relpath=rel, file=str(f), utm=(500000.0 + 9.0 * place, 4400000.0),
                              condition=conditions[i % len(conditions)] if role == QUERY and conditions else None))
        recs[role] = out
    return SplitData(name=name, split="test", database=recs[DATABASE], queries=recs[QUERY])


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    """A Pittsburgh-like split and a Tokyo 24/7-like one (4 cutouts per panorama), shards of 5."""
    from sfrs_dist.data.shards import build_shards

    root = tmp_path_factory.mktemp("noise")
    splits = [_noise_split(root / "raw", "pitts30k", 53, 17, 1, None, 0),
              _noise_split(root / "raw", "tokyo247", 48, 15, 4, ("day", "sunset", "night"), 1)]
    build_shards(splits, root / "shards", shard_size=5, workers=1, progress=False)
    return root / "shards"


class _NoiseNet(torch.nn.Module):
    """Pooled pixels through a fixed random projection, L2-normalised: ties-free descriptors."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.pool = torch.nn.AdaptiveAvgPool2d((4, 4))
        self.proj = torch.nn.Linear(48, dim, bias=False)
        self.output_dim = dim

    def forward(self, x):
        f = self.pool(x).flatten(1)
        return torch.nn.functional.normalize(self.proj(f - f.mean(1, keepdim=True)), dim=1)


def _noise_pca():
    return PCAWhitening(dims=10).fit(np.random.default_rng(6).standard_normal((200, 24)).astype(np.float32))


def _sharded_eval_runs(shard_dir: str, layouts=(True, False)) -> dict:
    """Tables and retrieved ids of the layouts (``shard_db`` values), without and with PCA.

    The PCA is fitted on rank 0 only: ``evaluate_splits`` broadcasts it in the sharded layout.
    """
    from sfrs_dist import distributed as du
    from sfrs_dist.config import DataConfig
    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.evaluation.pca import broadcast_pca
    from sfrs_dist.evaluation.runner import evaluate_splits, sharded_split_topk

    manifest = Manifest.load(shard_dir)
    data = DataConfig(shards=shard_dir, image_size=[24, 32], num_workers=0, extract_batch_size=4)
    net = _NoiseNet().eval()
    sids = ["pitts30k_test", "tokyo247_test"]
    pca0 = _noise_pca() if du.is_main_process() else None
    pca_all = broadcast_pca(pca0)
    probe = np.random.default_rng(7).standard_normal((5, 24)).astype(np.float32)
    out = {"pca_same": bool(np.array_equal(pca_all.transform(probe), _noise_pca().transform(probe)))}
    for shard_db in layouts:
        for with_pca in (False, True):
            ids = {}
            tables = evaluate_splits(net, 24, manifest, sids, data, torch.device("cpu"), SHARD_NS,
                                     pca=(pca0 if shard_db else pca_all) if with_pca else None,
                                     on_topk=lambda sid, topk, ids=ids: ids.update({sid: topk.tolist()}),
                                     shard_db=shard_db)
            key = f"{'sharded' if shard_db else 'gathered'}{'_pca' if with_pca else ''}"
            out[key] = {"tables": {sid: [{c: {str(n): v for n, v in row.items()} for c, row in t.items()}, counts]
                                   for sid, (t, counts) in tables.items()}, "ids": ids}
    if du.get_world_size() == 1:
        gaps = []  # between consecutive scores down to the first one past the search depth
        for sid, depth in (("pitts30k_test", 5), ("tokyo247_test", 60)):
            for pca in (None, pca_all):
                scores, _ = sharded_split_topk(net, 24, manifest, sid, data, torch.device("cpu"), depth + 1, pca=pca)
                scores = scores[:, np.isfinite(scores).all(axis=0)]
                gaps.append(float(np.min(scores[:, :-1] - scores[:, 1:])))
        out["min_gap"] = min(gaps)
    return out


def _sharded_eval_worker(rank: int, init_dir: str, shard_dir: str, out_dir: str) -> None:
    """The same processes form a world of 3, then ranks 0-1 a world of 2 (imports paid once)."""
    import json

    for world in (3, 2):
        if rank >= world:
            return
        with gloo_group(rank, world, init_file=f"{init_dir}/init{world}"):
            res = _sharded_eval_runs(shard_dir, layouts=(True,))
        with open(os.path.join(out_dir, f"world{world}_rank{rank}.json"), "w") as f:
            json.dump(res, f)


@pytest.fixture(scope="module")
def gathered_reference(noise_shards):
    """Both layouts in this process (one rank, no process group)."""
    return _sharded_eval_runs(str(noise_shards))


def test_sharded_evaluation_one_process_equals_gathered(gathered_reference):
    ref = gathered_reference
    assert ref["min_gap"] > 1e-6  # no ties among the scores (fp32 rounding: ~1e-7): the order is unambiguous
    assert 0.0 < ref["gathered"]["tables"]["pitts30k_test"][0]["all"]["5"] < 1.0
    assert list(ref["gathered"]["tables"]["tokyo247_test"][0]) == ["all", "day", "sunset", "night"]
    assert ref["gathered"]["tables"]["tokyo247_test"][1] == {"all": 15, "day": 5, "sunset": 5, "night": 5}
    assert ref["gathered_pca"]["ids"] != ref["gathered"]["ids"]  # the PCA runs compare something else
    for key in ("sharded", "sharded_pca"):
        assert ref[key] == ref[key.replace("sharded", "gathered")], key
    tokyo = np.array(ref["sharded"]["ids"]["tokyo247_test"])  # 60 wanted, 48 images: padding
    assert tokyo.shape == (15, 60) and (tokyo[:, 48:] == -1).all() and (tokyo[:, :48] >= 0).all()


def test_sharded_evaluation_two_and_three_gloo_ranks_equal_gathered(noise_shards, gathered_reference, tmp_path):
    import json

    (tmp_path / "init").mkdir()
    mp.spawn(_sharded_eval_worker, args=(str(tmp_path / "init"), str(noise_shards), str(tmp_path)), nprocs=3,
             join=True)
    ref = gathered_reference
    for world in (3, 2):
        for rank in range(world):
            got = json.loads((tmp_path / f"world{world}_rank{rank}.json").read_text())
            assert got["pca_same"]
            for key in ("sharded", "sharded_pca"):
                gathered = ref[key.replace("sharded", "gathered")]
                assert got[key]["tables"] == gathered["tables"], (world, rank, key)
                # the callback runs on rank 0: the same retrievals, padding included
                assert got[key]["ids"] == (gathered["ids"] if rank == 0 else {}), (world, rank, key)


def test_render_examples_from_merged_topk(noise_shards, gathered_reference, tmp_path):
    from PIL import Image

    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.evaluation.runner import render_examples

    manifest = Manifest.load(noise_shards)
    ids = np.array(gathered_reference["sharded"]["ids"]["tokyo247_test"])
    written = render_examples(manifest, "tokyo247_test", ids, tmp_path / "examples")
    keys = manifest.group_keys("tokyo247_test_q")
    assert [os.path.basename(p) for p in written] == [f"{keys[i]}_top5.png" for i in (0, 7, 14)]
    assert all(Image.open(p).size[0] > Image.open(p).size[1] for p in written)  # query + 5 retrievals in a row
