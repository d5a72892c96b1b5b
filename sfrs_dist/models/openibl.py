"""Import (and export) OpenIBL checkpoints of VGG16 + NetVLAD models.

OpenIBL stores ``state_dict`` (optionally inside a dict with ``epoch`` etc., optionally
with a ``module.`` prefix) with keys::

    base_model.base.<i>.weight / .bias   VGG16 features[:-2] layer i (conv1_1 .. conv5_3)
    net_vlad.conv.weight                 soft-assignment 1x1 conv (K x D x 1 x 1, no bias)
    net_vlad.centroids                   K x D

which map one to one onto ``SFRSNet`` (``backbone.<i>.*``, ``netvlad.conv.weight``,
``netvlad.centroids``) built with the ``vgg16`` backbone.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, Optional

import torch

from .backbones import OPENIBL_BACKBONE_PREFIX, TrainableSpec, read_state_file
from .network import SFRSNet, build_model

log = logging.getLogger(__name__)

OPENIBL_NETVLAD_PREFIX = "net_vlad."
SFRS_BACKBONE_PREFIX = "backbone."
SFRS_NETVLAD_PREFIX = "netvlad."


def openibl_to_sfrs_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename OpenIBL keys (``module.`` prefix optional) to ``SFRSNet`` keys.

    Keys outside ``base_model.base.`` and ``net_vlad.`` are kept unchanged, so that a
    subsequent strict load reports them as unexpected.
    """
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(OPENIBL_BACKBONE_PREFIX):
            k = SFRS_BACKBONE_PREFIX + k[len(OPENIBL_BACKBONE_PREFIX):]
        elif k.startswith(OPENIBL_NETVLAD_PREFIX):
            k = SFRS_NETVLAD_PREFIX + k[len(OPENIBL_NETVLAD_PREFIX):]
        out[k] = value
    return out


def sfrs_to_openibl_state_dict(model: SFRSNet, prefix: str = "module.") -> Dict[str, torch.Tensor]:
    """Export an ``SFRSNet`` state dict under OpenIBL key names (with ``prefix``)."""
    return OrderedDict((prefix + _sfrs_to_openibl_key(k), v.detach().cpu()) for k, v in model.state_dict().items())


def load_openibl_checkpoint(model: SFRSNet, path: str) -> None:
    """Load an OpenIBL checkpoint file into ``model`` (VGG16 backbone + NetVLAD).

    Raises ``ValueError`` naming the file and listing missing and unexpected keys, or
    the shapes that differ.
    """
    load_openibl_state(model, read_state_file(path), source=path)


def _sfrs_to_openibl_key(key: str) -> str:
    if key.startswith(SFRS_BACKBONE_PREFIX):
        return OPENIBL_BACKBONE_PREFIX + key[len(SFRS_BACKBONE_PREFIX):]
    if key.startswith(SFRS_NETVLAD_PREFIX):
        return OPENIBL_NETVLAD_PREFIX + key[len(SFRS_NETVLAD_PREFIX):]
    return key


def load_openibl_state(model: SFRSNet, state: Dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load an OpenIBL-named state dict into ``model``; ``source`` names it in errors.

    Missing and unexpected keys are reported with OpenIBL names (without ``module.``).
    """
    renamed = openibl_to_sfrs_state_dict(state)
    expected = model.state_dict()
    missing = sorted(_sfrs_to_openibl_key(k) for k in set(expected) - set(renamed))
    unexpected = sorted(_sfrs_to_openibl_key(k) for k in set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"OpenIBL checkpoint {source} does not match a VGG16 + NetVLAD({model.netvlad.num_clusters}) model: "
            f"missing keys {missing}; unexpected keys {unexpected}"
        )
    bad = [f"{_sfrs_to_openibl_key(k)}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in renamed.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"OpenIBL checkpoint {source} has tensors of the wrong shape: {bad}")
    model.load_state_dict(renamed, strict=True)
    log.info("loaded OpenIBL weights from %s", source)


def build_model_from_openibl(
    path: str,
    trainable: TrainableSpec = None,
    checkpointing: bool = False,
    num_clusters: Optional[int] = None,
) -> SFRSNet:
    """Build a VGG16 ``SFRSNet`` and load an OpenIBL checkpoint into it.

    The number of clusters is read from ``net_vlad.centroids`` unless given.
    """
    raw = read_state_file(path)
    key = SFRS_NETVLAD_PREFIX + "centroids"
    centroids = openibl_to_sfrs_state_dict(raw).get(key)
    if centroids is None or centroids.dim() != 2:
        raise ValueError(f"OpenIBL checkpoint {path} has no 2-d 'net_vlad.centroids' tensor")
    k = num_clusters if num_clusters is not None else int(centroids.shape[0])
    model = build_model("vgg16", weights=None, num_clusters=k, trainable=trainable, checkpointing=checkpointing)
    load_openibl_state(model, raw, source=path)
    return model
