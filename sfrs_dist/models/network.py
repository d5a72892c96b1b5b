"""The SFRS region network: backbone + NetVLAD, global and 9 region descriptors.

From one backbone pass the NetVLAD residual sums of the 2x2 quarters of the feature map
are computed; halves are sums of two quarters, the global descriptor is the sum of all
four. Region order (``REGION_NAMES``)::

    [global, top, bottom, left, right, top-left, top-right, bottom-left, bottom-right]

Each region's residual sums are intra-normalised per cluster, flattened and L2-normalised.
Similarities are dot products of these unit vectors.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from ..losses import float32_compute
from .backbones import TrainableSpec, build_backbone
from .netvlad import NetVLAD, normalize_vlad

log = logging.getLogger(__name__)

REGION_NAMES = (
    "global", "top", "bottom", "left", "right",
    "top_left", "top_right", "bottom_left", "bottom_right",
)
NUM_REGIONS = len(REGION_NAMES)


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
    """

    def __init__(
        self,
        backbone: nn.Module,
        netvlad: NetVLAD,
        stride: Optional[int] = None,
        checkpointing: bool = False,
        checkpoint_segments: int = 4,
    ) -> None:
        super().__init__()
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
                if isinstance(m, nn.ReLU):
                    m.inplace = False
        self.checkpointing = bool(enabled)

    @property
    def output_dim(self) -> int:
        return self.netvlad.output_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (B, D, h, w)."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W); got {tuple(x.shape)}")
        if self.checkpointing and self.training and torch.is_grad_enabled():
            segments = min(self.checkpoint_segments, len(self.backbone))
            return checkpoint_sequential(self.backbone, segments, x, use_reentrant=False)
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
) -> SFRSNet:
    """Build an :class:`SFRSNet`.

    Args:
        backbone: ``vgg16`` (default), ``resnet18``, ``resnet50`` or ``smallcnn``.
        weights: backbone weights: ``None`` (random), ``"imagenet"`` (torchvision) or a
            local file (torchvision state dict or OpenIBL checkpoint). To load a whole
            OpenIBL model (backbone and NetVLAD) use
            :func:`sfrs_dist.models.openibl.build_model_from_openibl`.
        num_clusters: NetVLAD clusters K; the descriptor has K * channels values.
        trainable: trainable layers, see :func:`build_backbone` (default: conv5 for VGG16).
        layer: cut point, see :func:`build_backbone`.
        checkpointing: gradient checkpointing of the backbone in training.
        alpha: soft-assignment sharpness before k-means initialisation replaces it.

    The NetVLAD layer starts random; initialise it with
    :func:`sfrs_dist.models.init_netvlad_from_descriptors` before training.
    """
    module, channels, stride = build_backbone(backbone, weights=weights, trainable=trainable, layer=layer)
    netvlad = NetVLAD(num_clusters=num_clusters, dim=channels, alpha=alpha)
    return SFRSNet(module, netvlad, stride=stride, checkpointing=checkpointing)
