"""The run files in configs/ and the Slurm launcher.

Every YAML validates against the strict schema and states only what differs from the
defaults; the Pitts30k reference file resolves to DESIGN.md's hyper-parameters; the
evaluation files build the network the training file trains; the Slurm script hands torchrun
the right rendezvous for the allocation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml

from sfrs_dist.config import Config, load_config
from sfrs_dist.data.manifest import split_id
from sfrs_dist.models.backbones import build_backbone

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
REFERENCE = [REPO / "configs" / n for n in ("pitts30k_sfrs.yaml", "pitts30k_sfrs_deepspeed.yaml",
                                            "pitts250k_eval.yaml", "tokyo247_eval.yaml")]
SLURM = REPO / "launch" / "slurm_train.sh"


def _yaml(path: Path) -> Dict[str, Dict[str, Any]]:
    return yaml.safe_load(path.read_text()) or {}


def test_config_folder_holds_the_run_files():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "demo.yaml", "pitts30k_sfrs.yaml", "pitts30k_sfrs_deepspeed.yaml",
            "pitts250k_eval.yaml", "tokyo247_eval.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_through_the_strict_schema(path):
    resolved = load_config(path).to_dict()
    for section, values in _yaml(path).items():
        for key, value in values.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"


@pytest.mark.parametrize("path", REFERENCE, ids=[p.name for p in REFERENCE])
def test_real_data_configs_state_only_what_differs(path):
    defaults = Config().to_dict()
    for section, values in _yaml(path).items():
        for key, value in values.items():
            assert value != defaults[section][key], f"{path.name}: {section}.{key} repeats the default {value!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_input_size_gives_an_even_feature_map(path):
    """Regions split the feature map in 2x2 quarters: shape-only forward on the meta device."""
    m, (h, w) = load_config(path).model, load_config(path).data.image_size
    module, channels, _ = build_backbone(m.backbone, weights=None, trainable="none", layer=m.layer)
    feats = module.to("meta")(torch.empty(1, 3, h, w, device="meta"))
    assert feats.shape[1] == channels
    assert feats.shape[2] % 2 == 0 and feats.shape[3] % 2 == 0, f"{path.name}: {h}x{w} -> {tuple(feats.shape)}"


def test_pitts30k_reference_values_match_design():
    cfg = load_config(REPO / "configs" / "pitts30k_sfrs.yaml")
    # model: VGG16 (conv5 trained) + NetVLAD K=64, the reference's MatConvNet-converted ImageNet weights
    assert cfg.model.backbone == "vgg16" and cfg.model.layer is None
    assert cfg.model.trainable in (None, "conv5")
    assert cfg.model.weights == "/data/weights/vd16_offtheshelf_conv5_3_max.pth"
    assert cfg.model.num_clusters == 64
    assert cfg.model.init_descriptors == 50000
    assert cfg.model.grad_checkpointing is False
    # data: 480x640, pitts30k shards, Tokyo queries aspect-preserving
    assert cfg.data.image_size == [480, 640]
    assert cfg.data.shards == "shards/pitts30k"
    assert cfg.data.train_set == "pitts30k_train" and cfg.data.val_set == "pitts30k_val"
    # the paper's test sets in every generation, two of them from shard sets of their own
    assert cfg.data.test_sets == ["pitts30k_test", "pitts250k_test", "tokyo247_test"]
    assert cfg.data.test_shards == ["shards/pitts250k", "shards/tokyo247"]
    assert cfg.data.aspect_preserving == ["tokyo247"] and cfg.data.aspect_resize == "short_side"
    assert cfg.data.color_jitter == [0.7, 0.7, 0.7, 0.5]
    # optimiser and schedule
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.001, 0.9, 0.001)
    assert (cfg.train.lr_step, cfg.train.lr_gamma) == (5, 0.5)
    assert (cfg.train.generations, cfg.train.epochs, cfg.train.gen0_epochs) == (4, 5, 1)
    assert cfg.train.batch_size == 1 and cfg.train.max_steps_per_epoch == 0
    # float32 as the reference computes (the system default stays auto: tests/test_config.py)
    assert (cfg.train.engine, cfg.train.precision) == ("ddp", "fp32")
    assert cfg.eval.bf16 is False and cfg.eval.bf16_search is False
    default = Config()
    assert (default.train.precision, default.eval.bf16, default.mining.bf16_search) == ("auto", "auto", "auto")
    # losses
    assert cfg.loss.kind == "sare_ind"
    assert cfg.loss.temperatures == [0.07, 0.07, 0.06, 0.05]
    assert [cfg.temperature(g) for g in range(4)] == [0.07, 0.07, 0.06, 0.05]
    assert cfg.loss.soft_weight == 0.5
    # mining
    mc = cfg.mining
    assert (mc.cache_subset_size, mc.neg_pool, mc.num_negatives) == (1000, 1000, 10)
    assert (mc.num_difficult, mc.difficult_candidates) == (10, 20)
    assert (mc.k1, mc.k2, mc.lam) == (20, 1, 0.1)
    assert mc.bf16_search is False
    # evaluation
    assert cfg.eval.pca_dim == 4096
    assert cfg.eval.recall_ns == [1, 5, 10, 20]


def test_deepspeed_file_differs_only_in_engine_precision_and_run_dir():
    ref = load_config(REPO / "configs" / "pitts30k_sfrs.yaml").flat()
    ds = load_config(REPO / "configs" / "pitts30k_sfrs_deepspeed.yaml").flat()
    differ = {k for k in ref if ref[k] != ds[k]}
    assert differ == {"train.engine", "train.zero_stage", "train.precision", "run.out_dir"}
    assert (ds["train.engine"], ds["train.zero_stage"], ds["train.precision"]) == ("deepspeed", 1, "bf16")


@pytest.mark.parametrize("name, dataset, split", [("pitts250k_eval.yaml", "pitts250k", "test"),
                                                  ("tokyo247_eval.yaml", "tokyo247", "test")])
def test_eval_files_build_the_trained_network_on_their_own_shards(name, dataset, split):
    train = load_config(REPO / "configs" / "pitts30k_sfrs.yaml")
    ev = load_config(REPO / "configs" / name)
    # launch/evaluate.py builds the architecture from cfg.model, then loads the checkpoint
    for key in ("backbone", "layer", "num_clusters", "trainable"):
        assert getattr(ev.model, key) == getattr(train.model, key)
    assert ev.data.image_size == train.data.image_size
    assert ev.data.aspect_preserving == train.data.aspect_preserving
    # the split id the shard builder gives this dataset, in a shard set of its own
    assert ev.data.test_sets == [split_id(dataset, split)]
    assert ev.data.shards == f"shards/{dataset}" != train.data.shards
    assert ev.run.out_dir != train.run.out_dir


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SLURM)], check=True, timeout=30)
    # srun gets the task's CPUs explicitly (Slurm >= 22.05 does not pass sbatch's on to srun)
    srun = SLURM.read_text().split("\nsrun ", 1)[1].split("torch.distributed.run", 1)[0]
    assert '"$SLURM_CPUS_PER_TASK"' in SLURM.read_text() and "SRUN_CPUS[@]" in srun


def _fake_slurm_bin(folder: Path) -> Path:
    """``scontrol`` printing two hosts and an ``srun`` recording its command line."""
    folder.mkdir()
    (folder / "scontrol").write_text(
        '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[017-018]" ] || exit 3\n'
        'printf "gpu017\\ngpu018\\n"\n')
    (folder / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n'
                                 'echo "$OMP_NUM_THREADS" > "$SRUN_ARGS.omp"\n')
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def test_slurm_script_starts_one_agent_per_node_with_c10d_rendezvous(tmp_path):
    fake = _fake_slurm_bin(tmp_path / "bin")
    record = tmp_path / "srun_args"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SRUN_ARGS=str(record),
               SLURM_JOB_NODELIST="gpu[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(REPO),
               SFRS_PYTHON=sys.executable)
    for name in ("GPUS", "SFRS_REPO", "OMP_NUM_THREADS", "RDZV_PORT", "MAX_RESTARTS"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(SLURM), "configs/pitts30k_sfrs.yaml", "--set", "run.out_dir=/shared/x",
                           "--set", "data.shards=/shared/shards/pitts30k"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert value("--nodes") == "2" and value("--ntasks-per-node") == "1"
    assert value("--cpus-per-task") == "32" and args.index("--cpus-per-task") < args.index("-m")  # srun's
    assert args[args.index("-m") - 1] == sys.executable and value("-m") == "torch.distributed.run"
    assert value("--nnodes") == "2" and value("--nproc_per_node") == "4"
    assert value("--rdzv_backend") == "c10d"
    assert value("--rdzv_endpoint") == "gpu017:29500"
    assert value("--rdzv_id") == "sfrs-4242"
    assert int(value("--max-restarts")) >= 1
    assert (tmp_path / "srun_args.omp").read_text().strip() == "8"  # 32 CPUs shared by 4 processes
    script = args.index(str(REPO / "launch" / "train.py"))
    assert args[script + 1:] == ["--config", "configs/pitts30k_sfrs.yaml", "--set", "run.out_dir=/shared/x",
                                 "--set", "data.shards=/shared/shards/pitts30k"]


def test_slurm_script_without_config_stops_with_usage(tmp_path):
    proc = subprocess.run(["bash", str(SLURM)], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env=dict(os.environ, SFRS_PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(REPO)))
    assert proc.returncode == 2 and "usage: sbatch launch/slurm_train.sh CONFIG" in proc.stderr
