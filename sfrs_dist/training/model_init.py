"""Building a generation's student: backbone weights plus the cached NetVLAD initialisation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import numpy as np
import torch

from .. import distributed as du
from ..config import Config
from ..data.manifest import Manifest
from ..data.random_access import ShardReader
from ..data.records import record_keys
from ..data.transforms import make_transform
from ..extraction.passes import eval_mode
from ..mining.knn import shard_range
from ..models import (
    SFRSNet,
    build_model,
    load_or_compute_init,
    read_centroid_file,
    sample_local_descriptors,
    state_fingerprint,
)
from ..models.netvlad import kmeans_init

log = logging.getLogger(__name__)


def init_image_keys(manifest: Manifest, sid: str, count: int, seed: int) -> List[str]:
    """``count`` keys drawn at random (seeded) from the split's training queries and database.

    The reference clusters descriptors of images drawn at random from both sets; the same
    list on every rank, in draw order.
    """
    split = manifest.split_data(sid)
    keys = record_keys(split.queries) + record_keys(split.database)
    if not keys:
        raise ValueError(f"split {sid}: no images to initialise NetVLAD from")
    rng = np.random.default_rng(seed)
    return [keys[i] for i in rng.choice(len(keys), size=min(count, len(keys)), replace=False)]


def seed_for_image(seed: int, index: int) -> int:
    """The position-sampling seed of the ``index``-th initialisation image: the same whichever
    rank reads it, so the NetVLAD init does not depend on the number of ranks."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _sample_descriptors(net: SFRSNet, cfg: Config, manifest: Manifest, sid: str, device: torch.device) -> torch.Tensor:
    """Local descriptors of this rank's share of the randomly drawn initialisation images."""
    keys = init_image_keys(manifest, sid, cfg.model.init_images, cfg.train.seed)
    start, end = shard_range(len(keys), du.get_rank(), du.get_world_size())
    per_image = max(1, cfg.model.init_descriptors // len(keys))
    reader = ShardReader(manifest.root, manifest)
    h, w = (int(v) for v in cfg.data.image_size)
    transform = make_transform("test", h, w)
    out = []
    bs = cfg.data.extract_batch_size
    with eval_mode(net), torch.no_grad():
        for b0 in range(start, end, bs):
            images = torch.stack([transform(reader.get(k)[0]) for k in keys[b0:min(end, b0 + bs)]]).to(device)
            seeds = [seed_for_image(cfg.train.seed, i) for i in range(b0, min(end, b0 + bs))]
            out.append(sample_local_descriptors(net.features, images, per_image, image_seeds=seeds).cpu())
    dim = net.netvlad.dim
    return torch.cat(out) if out else torch.zeros(0, dim)


def build_student(cfg: Config, manifest: Manifest, sid: str, cache_dir: Path, device: torch.device) -> SFRSNet:
    """A freshly initialised network: seeded backbone (or its weights file) and cached NetVLAD init.

    With ``model.netvlad_init`` the centroids come from that file. Otherwise the init is
    computed once (descriptors sampled on every rank and gathered, k-means++ and k-means on
    rank 0), stored under ``cache_dir`` keyed by the backbone weights, data and K, and
    reused by every later generation and restart.
    """
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    net = build_model(m.backbone, weights=m.weights, num_clusters=m.num_clusters, trainable=m.trainable,
                      layer=m.layer, checkpointing=m.grad_checkpointing, input_norm=m.input_norm,
                      freeze_batchnorm=m.freeze_batchnorm).to(device)
    if m.netvlad_init:
        init = read_centroid_file(m.netvlad_init, m.num_clusters, net.netvlad.dim)  # every rank: errors everywhere
        log.info("NetVLAD init: centroids from %s (alpha %.3f)", m.netvlad_init, init.alpha)
        net.netvlad.apply_init(init)
        return net
    fingerprint = state_fingerprint(net.backbone, m.num_clusters, cfg.train.seed, manifest.source,
                                    sid, tuple(cfg.data.image_size), m.init_descriptors, m.init_images,
                                    "random queries+database", net.input_adapter.mode, "kmeans++ all, per-image seeds")
    path = Path(cache_dir) / f"netvlad_init_{fingerprint[:16]}.pt"
    descs = None
    if du.broadcast_object(not path.is_file()):  # rank 0 decides: the cache may live on its node only
        parts = du.all_gather_object(_sample_descriptors(net, cfg, manifest, sid, device))
        descs = torch.cat(parts)
    init = None
    if du.is_main_process():
        init = load_or_compute_init(str(path), lambda: kmeans_init(descs, m.num_clusters, seed=cfg.train.seed),
                                    fingerprint)
    init = du.broadcast_object(init)
    log.info("NetVLAD init: k-means++ seeds + k-means over every sampled descriptor (%s; %d images, up to %d "
             "descriptors), alpha %.3f", "computed" if descs is not None else f"cached in {path.name}",
             m.init_images, m.init_descriptors, init.alpha)
    net.netvlad.apply_init(init)
    return net
