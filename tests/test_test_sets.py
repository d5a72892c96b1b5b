"""Test splits found across several shard sets (data.shards + data.test_shards)."""

from __future__ import annotations

import pytest

from sfrs_dist.config import ConfigError, DataConfig
from sfrs_dist.data.test_sets import group_by_manifest, locate_splits


def test_splits_are_found_in_their_own_shard_set(split_shard_sets):
    pitts, tokyo = split_shard_sets
    data = DataConfig(shards=str(pitts), test_shards=[str(tokyo)])
    located = locate_splits(data, ["pitts30k_test", "tokyo247_test"])
    assert located["pitts30k_test"].root == pitts and located["tokyo247_test"].root == tokyo
    groups = group_by_manifest(located)
    assert [(m.root, sids) for m, sids in groups] == [(pitts, ["pitts30k_test"]), (tokyo, ["tokyo247_test"])]


def test_a_split_in_none_or_in_two_sets_is_a_config_error(split_shard_sets, synthetic_shards, tmp_path):
    pitts, tokyo = split_shard_sets
    with pytest.raises(ConfigError, match="'tokyo247_test' is in none"):
        locate_splits(DataConfig(shards=str(pitts)), ["tokyo247_test"])
    with pytest.raises(ConfigError, match="'tokyo247_test' is in two shard sets"):
        locate_splits(DataConfig(shards=str(synthetic_shards), test_shards=[str(tokyo)]), ["tokyo247_test"])
    with pytest.raises(ConfigError, match="data.test_shards: .*no manifest"):
        locate_splits(DataConfig(shards=str(pitts), test_shards=[str(tmp_path / "nowhere")]), ["pitts30k_test"])
    # the same folder twice is one shard set
    same = locate_splits(DataConfig(shards=str(pitts), test_shards=[str(pitts)]), ["pitts30k_test"])
    assert same["pitts30k_test"].root == pitts


def test_train_with_a_missing_shard_folder_stops_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "launch" / "train.py"), "--config", str(repo / "configs" / "tiny.yaml"),
                           "--set", f"data.shards={tmp_path / 'nowhere'}", "--set", f"run.out_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("config error: data.shards: ") and "nowhere" in lines[0] and "build_shards" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written
