"""Checkpoint naming, latest resolution, pruning and atomic writes."""

import torch

from sfrs_dist.training.checkpoint import (
    atomic_torch_save,
    checkpoint_name,
    latest_checkpoint,
    prune_subset_checkpoints,
    resolve_resume,
)
from sfrs_dist.training.engine import lr_at


def test_latest_and_pruning(tmp_path):
    order = [(0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2), (1, 0, 0), (1, 0, 3)]
    for g, e, s in order:
        path = tmp_path / checkpoint_name(g, e, s)
        atomic_torch_save({"pos": (g, e, s)}, path)
        prune_subset_checkpoints(tmp_path, path)
        assert latest_checkpoint(tmp_path) == path
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [checkpoint_name(0, 0, 2), checkpoint_name(0, 1, 0), checkpoint_name(0, 1, 2),
                    checkpoint_name(1, 0, 0), checkpoint_name(1, 0, 3)]
    assert torch.load(latest_checkpoint(tmp_path), weights_only=False)["pos"] == (1, 0, 3)
    assert not list(tmp_path.glob(".*tmp*"))


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("none", tmp_path) is None
    atomic_torch_save({}, tmp_path / checkpoint_name(2, 0, 0))
    assert resolve_resume("auto", tmp_path) == tmp_path / checkpoint_name(2, 0, 0)
    try:
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    except FileNotFoundError as exc:
        assert "missing.pt" in str(exc)
    else:
        raise AssertionError("a missing checkpoint must raise")


def test_step_decay():
    assert [lr_at(e, 0.001, 5, 0.5) for e in (0, 4, 5, 9, 10)] == [0.001, 0.001, 0.0005, 0.0005, 0.00025]


def test_deepspeed_tags_go_with_their_checkpoints(tmp_path):
    from sfrs_dist.training.checkpoint import deepspeed_dir

    def save(pos, tag):
        path = tmp_path / checkpoint_name(*pos)
        (deepspeed_dir(tmp_path) / tag).mkdir(parents=True)
        atomic_torch_save({"deepspeed_tag": tag}, path)
        prune_subset_checkpoints(tmp_path, path, keep_tag=tag)

    (deepspeed_dir(tmp_path) / "ckpt_g00_e000_s0002.dead").mkdir(parents=True)  # an interrupted save
    save((0, 0, 1), "ckpt_g00_e000_s0001.a")
    save((0, 0, 2), "ckpt_g00_e000_s0002.b")
    save((0, 1, 0), "ckpt_g00_e001_s0000.c")
    save((0, 1, 1), "ckpt_g00_e001_s0001.d")
    assert sorted(d.name for d in deepspeed_dir(tmp_path).iterdir()) == [
        "ckpt_g00_e000_s0002.b", "ckpt_g00_e001_s0000.c", "ckpt_g00_e001_s0001.d"]


def test_the_checkpoint_before_the_newest_is_kept_and_stops_inside_a_subset_sort_by_step(tmp_path):
    from sfrs_dist.training.checkpoint import checkpoints_newest_first

    for pos in [(0, 0, 1), (0, 0, 2), (0, 0, 2, 3), (0, 0, 3)]:
        path = tmp_path / checkpoint_name(*pos)
        atomic_torch_save({"pos": pos}, path)
        prune_subset_checkpoints(tmp_path, path)
    # a stop after step 3 of subset 2 sorts between the checkpoints before subsets 2 and 3
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == [checkpoint_name(0, 0, 3),
                                                                     checkpoint_name(0, 0, 2, 3)]
    assert checkpoint_name(0, 0, 2, 3) == "ckpt_g00_e000_s0002_k00003.pt"


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from sfrs_dist.training.checkpoint import NoLoadableCheckpoint, load_resume

    for s in (1, 2):
        atomic_torch_save({"pos": s, "weights": torch.arange(1000.0)}, tmp_path / checkpoint_name(0, 0, s))
    newest = tmp_path / checkpoint_name(0, 0, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a node lost mid-write, no atomic rename
    with caplog.at_level("WARNING"):
        path, ckpt = load_resume("auto", tmp_path)
    assert path == tmp_path / checkpoint_name(0, 0, 1) and ckpt["pos"] == 1
    assert any(newest.name in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)
    older = tmp_path / checkpoint_name(0, 0, 1)
    older.write_bytes(b"")
    try:
        load_resume("auto", tmp_path)
    except NoLoadableCheckpoint as exc:
        assert "\n" not in str(exc) and "none of the 2 checkpoints" in str(exc) and newest.name in str(exc)
    else:
        raise AssertionError("no readable checkpoint must raise")
    assert load_resume("auto", tmp_path / "empty") == (None, None)


class _FullDisk:
    """Pickling it fails as a write to a full disk does, after part of the file is written."""

    def __reduce__(self):
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_atomic_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / checkpoint_name(0, 0, 1)
    atomic_torch_save({"v": 1}, path)
    try:
        atomic_torch_save({"weights": torch.zeros(10000), "tail": _FullDisk()}, path)
    except OSError as exc:
        assert "No space left on device" in str(exc)
    else:
        raise AssertionError("the write must fail")
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
