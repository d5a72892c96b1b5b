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
