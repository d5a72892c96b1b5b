"""Models of sfrs_dist: backbones, NetVLAD and the SFRS region network.

Typical use::

    from sfrs_dist.models import build_model, sample_local_descriptors, init_netvlad_from_descriptors

    model = build_model("vgg16", weights="vgg16_imagenet.pth")       # conv5 trainable
    descs = sample_local_descriptors(model.backbone, images, per_image=100)
    init_netvlad_from_descriptors(model.netvlad, descs, seed=0)      # k-means, alpha

    g = model(images)                      # (B, K*D) global descriptors
    r = model(images, regions=True)        # (B, 9, K*D) region descriptors, r[:, 0] == g
    s = region_similarity(r_query, r_gallery)              # (..., 9, 9)
    s = global_region_similarity(g_query, r_positives)     # (B, N, 9)

Region order: ``REGION_NAMES`` = global, top, bottom, left, right, top-left, top-right,
bottom-left, bottom-right. OpenIBL checkpoints load with
:func:`build_model_from_openibl` / :func:`load_openibl_checkpoint`.
"""

from .backbones import BACKBONES, build_backbone, freeze_layers, load_backbone_weights, read_state_file
from .netvlad import (
    NetVLAD,
    NetVLADInit,
    alpha_from_centroids,
    init_netvlad_from_descriptors,
    kmeans_init,
    load_or_compute_init,
    normalize_vlad,
    sample_local_descriptors,
    state_fingerprint,
)
from .network import (
    NUM_REGIONS,
    REGION_NAMES,
    SFRSNet,
    build_model,
    global_region_similarity,
    region_similarity,
    regions_from_quarters,
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
    "NUM_REGIONS",
    "REGION_NAMES",
    "NetVLAD",
    "NetVLADInit",
    "SFRSNet",
    "alpha_from_centroids",
    "build_backbone",
    "build_model",
    "build_model_from_openibl",
    "freeze_layers",
    "global_region_similarity",
    "init_netvlad_from_descriptors",
    "kmeans_init",
    "load_backbone_weights",
    "load_openibl_checkpoint",
    "load_openibl_state",
    "load_or_compute_init",
    "normalize_vlad",
    "openibl_to_sfrs_state_dict",
    "read_state_file",
    "region_similarity",
    "regions_from_quarters",
    "sample_local_descriptors",
    "sfrs_to_openibl_state_dict",
    "state_fingerprint",
]
