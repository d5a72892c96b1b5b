"""Streaming reader: exactly-once passes across ranks and workers, shuffling, corruption,
transforms."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp
from gloo import gloo_group
from PIL import Image

from sfrs_dist.data.manifest import Manifest, ShardReadError
from sfrs_dist.data.random_access import ShardReader
from sfrs_dist.data.shards import build_shards, verify_shards
from sfrs_dist.data.streaming import BALANCE, expected_count, make_pass_dataset, make_pass_loader
from sfrs_dist.data.transforms import (
    MEAN,
    aspect_fit_size,
    denormalize,
    eval_transform,
    make_transform,
)

GROUPS = ["toy_train_db", "toy_train_q"]


@pytest.fixture
def seven_shard_set(tmp_path, make_jpeg_split):
    """Groups of 7 shards (26 samples, shard size 4) and 2 shards (5 samples)."""
    split = make_jpeg_split("toy", "train", 26, 5, seed=3)
    out = tmp_path / "shards"
    m = build_shards([split], out, shard_size=4, progress=False)
    assert len(m.groups["toy_train_db"].shards) == 7
    return out


def _rank_worker(rank: int, world_size: int, shard_dir: str, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world_size, init_file=init_file):
        from sfrs_dist.distributed import all_gather_object

        m = Manifest.load(Path(shard_dir))
        loader = make_pass_loader(m, GROUPS, eval_transform(8, 8), batch_size=3, num_workers=2)
        seen = []
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 8, 8)
            for k, img, meta in zip(batch["key"], batch["image"], batch["meta"]):
                assert meta["key"] == k
                seen.append((k, float(img.double().sum())))
        gathered = all_gather_object(seen)
        if rank == 0:
            torch.save(gathered, Path(out_dir) / "seen.pt")


def test_exactly_once_two_ranks_two_workers(seven_shard_set, tmp_path):
    """2 ranks x 2 DataLoader workers, real processes and gloo, 7 + 2 shards."""
    # forked rank processes (fast start on a loaded CI machine); spawn-started workers need the
    # pipeline to pickle, checked in test_pipeline_pickles
    tmp_mp.start_processes(_rank_worker, args=(2, str(seven_shard_set), str(tmp_path / "init"), str(tmp_path)),
                           nprocs=2, join=True, start_method="fork")
    gathered = torch.load(tmp_path / "seen.pt")
    m = Manifest.load(seven_shard_set)
    all_keys = m.group_keys(GROUPS[0]) + m.group_keys(GROUPS[1])
    keys = [k for per_rank in gathered for k, _ in per_rank]
    assert Counter(keys) == Counter(all_keys)  # every sample exactly once
    for rank, per_rank in enumerate(gathered):
        assert len(per_rank) == expected_count(m, GROUPS, rank, 2)
    # image contents equal the transform applied to the random-access read
    tf = eval_transform(8, 8)
    with ShardReader(seven_shard_set) as r:
        for k, s in [x for per_rank in gathered for x in per_rank][::5]:
            assert s == pytest.approx(float(tf(r.get(k)[0]).double().sum()), rel=1e-9)


def test_pipeline_pickles(seven_shard_set):
    """Spawn/forkserver DataLoader workers receive the pipeline pickled."""
    m = Manifest.load(seven_shard_set)
    ds = make_pass_dataset(m, GROUPS, eval_transform(8, 8), 0, 1, shuffle_seed=1, sample_shuffle=4)
    clone = pickle.loads(pickle.dumps(ds))
    assert sorted(x["key"] for x in clone) == sorted(m.group_keys(GROUPS[0]) + m.group_keys(GROUPS[1]))


def _fair(counts, total):
    """No part above an even share by more than BALANCE (whole shards) or one sample (ranges)."""
    parts = len(counts)
    return max(counts) <= max(BALANCE * total / parts, -(-total // parts))


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 2), (3, 2), (5, 2), (4, 3), (9, 2)])
def test_exactly_once_any_split(seven_shard_set, monkeypatch, world_size, num_workers):
    """Every (rank, worker) slice in turn, workers simulated through webdataset's WORKER env.

    7 shards of 26 samples: from 5 ranks on (or more workers than a rank's shards) shards are
    split by sample range, so no rank or worker is left idle."""
    m = Manifest.load(seven_shard_set)
    keys = []
    per_rank = []
    for rank in range(world_size):
        per_worker = []
        for worker in range(num_workers):
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", str(num_workers))
            got = [x["key"] for x in make_pass_dataset(m, GROUPS[0], None, rank, world_size)]
            keys += got
            per_worker.append(len(got))
        per_rank.append(sum(per_worker))
        assert per_rank[-1] == expected_count(m, GROUPS[0], rank, world_size)
        assert _fair(per_worker, per_rank[-1]) and (min(per_worker) > 0 or per_rank[-1] < num_workers)
    if world_size == num_workers == 1:
        assert keys == m.group_keys(GROUPS[0])  # manifest (.mat) order
    assert Counter(keys) == Counter(m.group_keys(GROUPS[0]))
    assert _fair(per_rank, 26) and min(per_rank) > 0


@pytest.fixture
def two_shard_set(tmp_path, make_jpeg_split):
    """A database group of 2 shards (14 samples, shard size 8) and a query group of 1."""
    out = tmp_path / "shards2"
    m = build_shards([make_jpeg_split("two", "train", 14, 3, seed=5)], out, shard_size=8, progress=False)
    assert len(m.groups["two_train_db"].shards) == 2
    return out


def test_fewer_shards_than_ranks_x_workers(two_shard_set, monkeypatch):
    """2 shards, 3 ranks x 2 workers: sample ranges, every slot busy, every sample once; the
    same with real DataLoader worker processes, and with a per-epoch shard shuffle."""
    m = Manifest.load(two_shard_set)
    group = "two_train_db"
    slots = {}
    for rank in range(3):
        for worker in range(2):
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            slots[rank, worker] = [x["key"] for x in make_pass_dataset(m, group, None, rank, 3)]
    assert sorted(len(v) for v in slots.values()) == [2, 2, 2, 2, 3, 3]
    assert [len(slots[r, 0]) + len(slots[r, 1]) for r in range(3)] == [expected_count(m, group, r, 3)
                                                                       for r in range(3)] == [4, 5, 5]
    assert [k for r in range(3) for w in range(2) for k in slots[r, w]] == m.group_keys(group)  # contiguous
    monkeypatch.delenv("WORKER")
    monkeypatch.delenv("NUM_WORKERS")
    real = []
    for rank in range(3):
        loader = make_pass_loader(m, group, eval_transform(8, 8), batch_size=2, num_workers=2, rank=rank,
                                  world_size=3)
        got = [k for batch in loader for k in batch["key"]]
        assert len(got) == expected_count(m, group, rank, 3)
        real += got
    assert Counter(real) == Counter(m.group_keys(group))
    shuffled = [x["key"] for r in range(3) for x in make_pass_dataset(m, group, None, r, 3, shuffle_seed=1, epoch=2)]
    assert Counter(shuffled) == Counter(m.group_keys(group))


def test_sample_range_read_detects_tampering(two_shard_set):
    """A partial shard is read by key through the index, digests checked as when streaming."""
    m = Manifest.load(two_shard_set)
    shard = m.groups["two_train_db"].shards[0]
    key = m.shard_keys(shard)[1]
    e = m.index[key]
    data = bytearray((two_shard_set / shard).read_bytes())
    data[e.offset + 520] ^= 0x55
    (two_shard_set / shard).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=f"{shard}.*{key}.*digest"):
        list(make_pass_dataset(m, "two_train_db", None, 0, 3))  # rank 0 of 3: samples 0-3 of the shard


def test_epoch_shuffle_deterministic(seven_shard_set):
    m = Manifest.load(seven_shard_set)

    def order(epoch, rank=0, world=1):
        ds = make_pass_dataset(m, GROUPS[0], None, rank, world, shuffle_seed=7, epoch=epoch, sample_shuffle=8)
        return [x["key"] for x in ds]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    assert sorted(a) == sorted(c) == sorted(m.group_keys(GROUPS[0]))
    assert a != m.group_keys(GROUPS[0])
    across = order(3, 0, 2) + order(3, 1, 2)
    assert Counter(across) == Counter(m.group_keys(GROUPS[0]))


def _truncate_at(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_streaming_detects_truncated_and_tampered(seven_shard_set):
    out = seven_shard_set
    m = Manifest.load(out)
    shards = m.groups[GROUPS[0]].shards

    def run():
        return [x["key"] for x in make_pass_dataset(m, GROUPS[0], None, 0, 1)]

    # truncated at a sample boundary: the tar reader ends quietly, the count check must not
    k = m.shard_keys(shards[1])[2]
    _truncate_at(out / shards[1], m.index[k].offset)
    with pytest.raises(ShardReadError, match=f"{shards[1]}.*2 samples read, manifest says 4.*{k}"):
        run()
    # truncated inside a member
    k = m.shard_keys(shards[1])[1]
    _truncate_at(out / shards[1], m.index[k].offset + 600)
    with pytest.raises(ShardReadError, match=f"{shards[1]}.*member {k}.jpg"):
        run()


def test_streaming_detects_flipped_bytes(seven_shard_set):
    out = seven_shard_set
    m = Manifest.load(out)
    shard = m.groups[GROUPS[0]].shards[3]
    key = m.shard_keys(shard)[2]
    e = m.index[key]
    data = bytearray((out / shard).read_bytes())
    data[e.offset + 520] ^= 0x55  # inside the image bytes: the tar still parses
    (out / shard).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=f"{shard}.*{key}.*digest"):
        list(make_pass_dataset(m, GROUPS[0], None, 0, 1))
    # a tampered header (checksum no longer matches) is named too
    data[e.offset + 520] ^= 0x55
    data[e.offset + 3] ^= 0x01
    (out / shard).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=f"{shard}"):
        list(make_pass_dataset(m, GROUPS[0], None, 0, 1))
    assert any(p.startswith(shard) for p in verify_shards(out))


def test_transforms():
    img = Image.fromarray(np.full((30, 40, 3), (10, 128, 250), dtype=np.uint8))
    t = eval_transform(12, 20)(img)
    assert t.shape == (3, 12, 20)
    expect = torch.tensor([10, 128, 250], dtype=torch.float32) - torch.tensor(MEAN) * 255
    torch.testing.assert_close(t[:, 5, 5], expect, rtol=0, atol=1e-3)
    torch.testing.assert_close(denormalize(t)[:, 0, 0], torch.tensor([10, 128, 250]) / 255.0)
    assert make_transform("train", 12, 20)(img).shape == (3, 12, 20)
    torch.manual_seed(0)
    jittered = make_transform("train", 12, 20)(img)
    assert not torch.allclose(jittered, t)  # colour jitter changes the colours
    # Tokyo fit_box: box turned like the image, aspect kept
    assert aspect_fit_size(480, 640, 480, 640) == (480, 640)
    assert aspect_fit_size(1080, 1920, 480, 640) == (360, 640)
    assert aspect_fit_size(2448, 1836, 480, 640) == (640, 480)
    portrait = Image.fromarray(np.zeros((200, 150, 3), dtype=np.uint8))
    assert make_transform("tokyo", 480, 640, "fit_box")(portrait).shape == (3, 640, 480)
    with pytest.raises(ValueError, match="kind"):
        make_transform("nope", 1, 1)
    with pytest.raises(ValueError, match="short_side"):
        make_transform("tokyo", 480, 640, "longest")


@pytest.mark.parametrize("hw, short_side, fit_box", [
    ((480, 640), (640, 853), (480, 640)),     # a 4:3 query (Tokyo 24/7's phones)
    ((1080, 1920), (640, 1137), (360, 640)),  # a 16:9 query: 0.56x the reference's scale under fit_box
    ((1836, 2448), (640, 853), (480, 640)),   # 4:3, larger than the box
    ((640, 480), (853, 640), (640, 480)),     # portrait 3:4
])
def test_tokyo_query_sizes_follow_the_reference(hw, short_side, fit_box):
    """The default rule is the reference's ``Resize(max(H, W))``: the shorter side becomes 640 at
    480x640; ``fit_box`` scales the longer side to 640 instead."""
    img = Image.fromarray(np.zeros((*hw, 3), dtype=np.uint8))
    assert tuple(make_transform("tokyo", 480, 640)(img).shape[1:]) == short_side
    assert tuple(make_transform("tokyo", 480, 640, "short_side")(img).shape[1:]) == short_side
    assert tuple(make_transform("tokyo", 480, 640, "fit_box")(img).shape[1:]) == fit_box


def test_synthetic_end_to_end(synthetic_raw, synthetic_shards):
    """Shards of the synthetic raw set: verified, ground truth preserved, every group streams."""
    from sfrs_dist.data.datasets import load_dataset

    assert verify_shards(synthetic_shards) == []
    m = Manifest.load(synthetic_shards)
    splits = load_dataset("synthetic", synthetic_raw)
    for s in splits:
        sd = m.split_data(f"{s.name}_{s.split}")
        assert [r.key for r in sd.queries] == [r.key for r in s.queries]
        for a, b in zip(sd.training_positives(), s.training_positives()):
            np.testing.assert_array_equal(a, b)
    q = "tokyo247_test_q"
    items = list(make_pass_dataset(m, q, make_transform("tokyo", 48, 64), 0, 1))
    assert [x["key"] for x in items] == m.group_keys(q)
    for x in items:
        assert min(x["image"].shape[1:]) == 64  # the reference's rule: shorter side = max(H, W)
