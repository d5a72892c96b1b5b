"""Typed config: layering, strict validation, clear errors."""

import pytest
import yaml

from sfrs_dist.config import ConfigError, load_config, save_config


def _write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_layering_defaults_file_overrides(tmp_path):
    p = _write(tmp_path, {"train": {"lr": 0.01, "generations": 3}, "model": {"backbone": "smallcnn"}})
    cfg = load_config(p, ["train.generations=2", "data.image_size=[96, 128]"])
    assert cfg.train.lr == 0.01
    assert cfg.train.generations == 2
    assert cfg.data.image_size == [96, 128]
    assert cfg.train.momentum == 0.9  # default kept
    assert cfg.model.backbone == "smallcnn"


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {"train": {"learning_rate": 0.01}})
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.learning_rate"):
        load_config(p)
    p = _write(tmp_path, {"trainer": {}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml.*unknown section 'trainer'"):
        load_config(p)


def test_wrong_type_and_bad_value(tmp_path):
    p = _write(tmp_path, {"train": {"generations": "four"}})
    with pytest.raises(ConfigError, match=r"train\.generations: expected an integer"):
        load_config(p)
    p = _write(tmp_path, {"train": {"engine": "horovod"}})
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.engine"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'mining\.k3'"):
        load_config(None, ["mining.k3=5"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(None, ["model.grad_checkpointing=3"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["train.seed=7", "loss.temperatures=[0.07, 0.05]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.temperature(5) == 0.05
    assert cfg.flat()["train.seed"] == 7
