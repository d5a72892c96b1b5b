"""Building a generation's student: backbone weights plus the cached NetVLAD initialisation."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import distributed as du
from ..config import Config
from ..data.manifest import Manifest
from ..models import SFRSNet, build_model, load_or_compute_init, sample_local_descriptors, state_fingerprint
from ..models.netvlad import kmeans_init
from .passes import eval_mode, pass_loader

log = logging.getLogger(__name__)


def _sample_descriptors(net: SFRSNet, cfg: Config, manifest: Manifest, sid: str, device: torch.device) -> torch.Tensor:
    """Local descriptors from this rank's share of the training database images."""
    want_images = max(1, cfg.model.init_images // du.get_world_size())
    per_image = max(1, cfg.model.init_descriptors // max(1, cfg.model.init_images))
    gen = torch.Generator().manual_seed(cfg.train.seed + du.get_rank())
    loader = pass_loader(manifest, sid, "db", cfg.data, num_workers=0)  # stops early: no workers to spin up
    out, seen = [], 0
    with eval_mode(net), torch.no_grad():
        for batch in loader:
            images = batch["image"][: want_images - seen].to(device)
            out.append(sample_local_descriptors(net.backbone, images, per_image, generator=gen).cpu())
            seen += images.shape[0]
            if seen >= want_images:
                break
    dim = net.netvlad.dim
    return torch.cat(out) if out else torch.zeros(0, dim)


def build_student(cfg: Config, manifest: Manifest, sid: str, cache_dir: Path, device: torch.device) -> SFRSNet:
    """A freshly initialised network: seeded backbone (or its weights file) and cached NetVLAD init.

    The init is computed once (descriptors sampled on every rank and gathered, k-means on
    rank 0), stored under ``cache_dir`` keyed by the backbone weights, data and K, and
    reused by every later generation and restart.
    """
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    net = build_model(m.backbone, weights=m.weights, num_clusters=m.num_clusters, trainable=m.trainable,
                      layer=m.layer, checkpointing=m.grad_checkpointing).to(device)
    fingerprint = state_fingerprint(net.backbone, m.num_clusters, cfg.train.seed, manifest.source,
                                    sid, tuple(cfg.data.image_size), m.init_descriptors, m.init_images)
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
    net.netvlad.apply_init(init)
    return net
