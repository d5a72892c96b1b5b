"""Teacher cache: sharded computation equals a brute-force one; lookups; missing entries named."""

import threading
import time

import numpy as np
import pytest

from sfrs_dist.teacher import cache as tc


def _setup(seed=0, nq=15, ndb=40, dim=16):
    rng = np.random.default_rng(seed)
    positives = [np.sort(rng.choice(ndb, rng.integers(0, 6), replace=False)) for _ in range(nq)]
    qg = rng.normal(size=(nq, dim)).astype(np.float32)
    regions = rng.normal(size=(ndb, 9, dim)).astype(np.float32)
    return positives, qg, regions


def test_sharded_cache_matches_brute_force(tmp_path):
    positives, qg, regions = _setup()
    inv = tc.invert_positives(positives, regions.shape[0])
    # two "ranks" each see an uneven, interleaved part of the database
    shards = [np.arange(0, 40, 3), np.setdiff1d(np.arange(40), np.arange(0, 40, 3))]
    for r, ids in enumerate(shards):
        q, j, s = tc.region_query_similarities(ids, regions[ids], qg, inv)
        tc.save_shard(tmp_path, "abc", r, 2, q, j, s)
    tc.mark_done(tmp_path, "abc", 2, {})
    cache = tc.load_cache(tmp_path, "abc", len(positives))
    assert cache.covers(positives)
    for qi, pos in enumerate(positives):
        if len(pos) == 0:
            continue
        want = np.stack([regions[j] @ qg[qi] for j in pos])
        got = cache.lookup(qi, list(pos[::-1]))
        np.testing.assert_allclose(got, want[::-1], rtol=1e-5, atol=1e-5)


def test_missing_entry_and_shard_named(tmp_path):
    positives, qg, regions = _setup(1)
    inv = tc.invert_positives(positives, regions.shape[0])
    q, j, s = tc.region_query_similarities(np.arange(40), regions, qg, inv)
    cache = tc.TeacherCache.from_triplets(q, j, s, len(positives), "k1")
    qi = next(i for i, p in enumerate(positives) if len(p) > 0)
    outsider = next(x for x in range(40) if x not in set(positives[qi]))
    with pytest.raises(tc.TeacherCacheError, match=rf"k1.*query {qi}.*\[{outsider}\]"):
        cache.lookup(qi, [outsider])
    with pytest.raises(tc.TeacherCacheError, match="not found"):
        tc.load_cache(tmp_path, "nokey", len(positives))
    tc.save_shard(tmp_path, "k2", 0, 2, q, j, s)
    tc.mark_done(tmp_path, "k2", 2, {})
    with pytest.raises(tc.TeacherCacheError, match="rank001of002"):
        tc.load_cache(tmp_path, "k2", len(positives))


def test_load_waits_for_a_part_that_appears_late(tmp_path):
    """A rank part another node wrote may become visible late (NFS): the reader retries."""
    positives, qg, regions = _setup(2)
    inv = tc.invert_positives(positives, regions.shape[0])
    q, j, s = tc.region_query_similarities(np.arange(40), regions, qg, inv)
    half = q < len(positives) // 2
    tc.save_shard(tmp_path, "k3", 0, 2, q[half], j[half], s[half])
    tc.mark_done(tmp_path, "k3", 2, {})
    late = threading.Timer(0.4, tc.save_shard, (tmp_path, "k3", 1, 2, q[~half], j[~half], s[~half]))
    t0 = time.monotonic()
    late.start()
    try:
        cache = tc.load_cache(tmp_path, "k3", len(positives), wait_s=20)
    finally:
        late.join()
    assert 0.4 <= time.monotonic() - t0 < 10
    assert cache.covers(positives)
    with pytest.raises(tc.TeacherCacheError, match=r"after waiting 0\.3 s.*teacher_k4_rank000of002\.npz"):
        tc.mark_done(tmp_path, "k4", 2, {})
        tc.load_cache(tmp_path, "k4", len(positives), wait_s=0.3)


def test_soft_label_entropy_from_uniform_to_peaked():
    # query 0: identical similarities (uniform labels); query 1: one region far above the rest;
    # query 2: no positives (left out)
    q = np.array([0, 0, 1, 1])
    j = np.array([3, 4, 3, 4])
    sims = np.full((4, 9), 0.5, dtype=np.float32)
    sims[2, 4] = 1.5
    cache = tc.TeacherCache.from_triplets(q, j, sims, num_queries=3, key="k")
    ent = tc.soft_label_entropy(cache, tau=0.07)
    assert ent.shape == (2,) and ent[0] == pytest.approx(1.0)
    assert ent[1] < 0.05
    # a higher temperature flattens the labels
    assert tc.soft_label_entropy(cache, tau=1.0)[1] > ent[1]
    with pytest.raises(ValueError, match="tau"):
        tc.soft_label_entropy(cache, tau=0.0)


def test_cached_similarities_are_the_teacher_checkpoints_and_follow_it(synthetic_shards, tmp_path, caplog):
    """Guards what the teacher pass caches: for a few (query, positive) pairs, the similarities
    recomputed from the teacher checkpoint (its network built anew, both images read and forwarded
    one at a time) equal the cached ones; a changed checkpoint gets a new teacher pass and other
    values, the same one is reused. Caching another network's or another image's similarities, or
    keying the cache without the checkpoint, made this fail."""
    import logging
    from pathlib import Path

    import torch

    from sfrs_dist.checkpoint_io import atomic_torch_save
    from sfrs_dist.config import load_config
    from sfrs_dist.data.manifest import Manifest
    from sfrs_dist.data.random_access import ShardReader
    from sfrs_dist.data.transforms import make_transform
    from sfrs_dist.models import build_model
    from sfrs_dist.teacher import run_teacher_pass
    from sfrs_dist.training.trainer import TrainSplit

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml",
                      [f"data.shards={synthetic_shards}"])
    manifest = Manifest.load(synthetic_shards)
    split = TrainSplit.from_manifest(manifest, cfg.data.train_set)
    m = cfg.model
    torch.manual_seed(0)
    net = build_model(m.backbone, num_clusters=m.num_clusters)
    with torch.no_grad():  # random NetVLAD parameters: similarities that differ from pair to pair
        for p in net.netvlad.parameters():
            p.normal_()
    ckpt = tmp_path / "generation00_final.pt"
    atomic_torch_save({"model": net.state_dict(), "config": cfg.to_dict()}, ckpt)
    cache, key = run_teacher_pass(cfg, manifest, split.train_pos, ckpt, tmp_path / "cache", torch.device("cpu"))

    teacher = build_model(m.backbone, num_clusters=m.num_clusters)
    teacher.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    teacher.eval()
    reader = ShardReader(synthetic_shards, manifest)
    transform = make_transform("test", *cfg.data.image_size)
    pairs = [(q, int(p[0])) for q, p in enumerate(split.train_pos) if len(p)][:4]
    assert len(pairs) == 4
    with torch.no_grad():
        for q, j in pairs:
            qi = transform(reader.get(split.q_keys[q])[0]).unsqueeze(0)
            dj = transform(reader.get(split.db_keys[j])[0]).unsqueeze(0)
            want = torch.einsum("d,rd->r", teacher(qi, regions=True)[0, 0], teacher(dj, regions=True)[0]).numpy()
            np.testing.assert_allclose(cache.lookup(q, [j])[0], want, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    atomic_torch_save({"model": net.state_dict(), "config": cfg.to_dict()}, ckpt)
    with caplog.at_level(logging.INFO):
        changed, key2 = run_teacher_pass(cfg, manifest, split.train_pos, ckpt, tmp_path / "cache", torch.device("cpu"))
    assert key2 != key and "teacher pass skipped" not in caplog.text
    q, j = pairs[0]
    assert not np.allclose(changed.lookup(q, [j]), cache.lookup(q, [j]))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, key3 = run_teacher_pass(cfg, manifest, split.train_pos, ckpt, tmp_path / "cache", torch.device("cpu"))
    assert key3 == key2 and "teacher pass skipped" in caplog.text
