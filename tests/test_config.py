"""Typed config: layering, strict validation, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sfrs_dist.config import ConfigError, check_resume, load_config, resume_conflicts, save_config

REPO = Path(__file__).resolve().parent.parent


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
    with pytest.raises(ConfigError, match=r"b\.yaml: trainer: unknown section; did you mean train\?"):
        load_config(p)
    p = _write(tmp_path, {"train": {"epoch": 3}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.epoch: unknown key; did you mean train\.epochs\?"):
        load_config(p)
    p = _write(tmp_path, {"mining": {"zzzz": 1}}, "d.yaml")
    with pytest.raises(ConfigError, match=r"mining\.zzzz: unknown key \(valid"):  # nothing close: no guess
        load_config(p)


def test_wrong_type_and_bad_value(tmp_path):
    p = _write(tmp_path, {"train": {"generations": "four"}})
    with pytest.raises(ConfigError, match=r"train\.generations: expected an integer"):
        load_config(p)
    p = _write(tmp_path, {"train": {"engine": "horovod"}})
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.engine"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"mining\.neg_pol: unknown key; did you mean mining\.neg_pool\?"):
        load_config(None, ["mining.neg_pol=5"])
    with pytest.raises(ConfigError, match=r"--set 'minnig\.k1=5': minnig: unknown section; did you mean mining\?"):
        load_config(None, ["minnig.k1=5"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(None, ["model.grad_checkpointing=3"])
    with pytest.raises(ConfigError, match=r"data\.color_jitter.*hue <= 0\.5.*0\.9"):
        load_config(None, ["data.color_jitter=[0.7, 0.7, 0.7, 0.9]"])
    with pytest.raises(ConfigError, match=r"data\.color_jitter"):
        load_config(None, ["data.color_jitter=[0.7, 0.7]"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["train.seed=7", "loss.temperatures=[0.07, 0.05]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.temperature(5) == 0.05
    assert cfg.flat()["train.seed"] == 7


def test_resume_conflicts_name_what_changed_and_allow_what_may():
    old = load_config(None, ["train.epochs=2", "data.color_jitter=[0.7, 0.7, 0.7, 0.5]"])
    same_job = load_config(None, ["train.epochs=2", "data.color_jitter=[0.7, 0.7, 0.7, 0.5]",
                                  "train.generations=6", "data.num_workers=0", "run.out_dir=elsewhere",
                                  "eval.bf16=true", "tracking.experiment=x"])
    assert resume_conflicts(old, same_job) == []
    other_job = load_config(None, ["train.epochs=3", "data.color_jitter=[0, 0, 0, 0]"])
    conflicts = resume_conflicts(old, other_job)
    assert conflicts == ["data.color_jitter: [0.7, 0.7, 0.7, 0.5] -> [0.0, 0.0, 0.0, 0.0]", "train.epochs: 2 -> 3"]


def test_check_resume_only_when_auto_and_checkpoints_exist(tmp_path):
    save_config(load_config(None, ["train.epochs=2"]), tmp_path / "config.yaml")
    new = load_config(None, ["train.epochs=3"])
    check_resume(new, tmp_path, has_checkpoints=False)  # nothing to resume from
    check_resume(load_config(None, ["train.epochs=3", "run.resume=none"]), tmp_path, has_checkpoints=True)
    with pytest.raises(ConfigError, match=r"another configuration.*train\.epochs: 2 -> 3"):
        check_resume(new, tmp_path, has_checkpoints=True)


def test_train_refuses_to_resume_another_job_before_starting(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "ckpt_g00_e001_s0000.pt"
    ckpt.write_bytes(b"earlier job")
    save_config(load_config(REPO / "configs" / "tiny.yaml", [f"run.out_dir={run}", "train.lr=0.5"]),
                run / "config.yaml")
    before = (run / "config.yaml").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                           str(REPO / "configs" / "tiny.yaml"), "--set", f"run.out_dir={run}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "train.lr: 0.5 -> " in proc.stderr and str(run) in proc.stderr
    assert proc.stderr.count("config error") == 1
    assert (run / "config.yaml").read_bytes() == before and ckpt.read_bytes() == b"earlier job"


def test_triplet_hinge_margin_is_the_square_root_as_in_the_reference():
    from sfrs_dist.config import LossConfig

    assert LossConfig(margin=0.1).hinge_margin == pytest.approx(0.31623, abs=1e-5)
    assert LossConfig(margin=0.0).hinge_margin == 0.0
    with pytest.raises(ConfigError, match="loss.margin"):
        LossConfig(margin=-0.1)
