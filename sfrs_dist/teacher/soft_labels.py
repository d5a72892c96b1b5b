"""The teacher pass: the previous generation's final network run once over the training data.

It produces the soft labels of a generation (see ``teacher.cache``), sharded by rank and
keyed by the teacher checkpoint's hash, the shard manifest and the input size, so training
steps never run the teacher and a restart, or another job with the same teacher, reuses it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from .. import distributed as du
from ..checkpoint_io import file_hash, load_checkpoint
from ..config import Config
from ..data.manifest import MANIFEST_NAME, Manifest
from ..data.streaming import expected_count
from ..extraction.passes import eval_mode, extract_group, pass_loader
from ..models import SFRSNet, build_model, config_freeze_batchnorm, config_input_norm
from ..progress import Progress
from . import cache as tc

log = logging.getLogger(__name__)


def load_network(cfg: Config, path: Path, device: torch.device) -> SFRSNet:
    """A network of ``cfg.model``'s architecture with the weights of checkpoint ``path``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    m = cfg.model
    ckpt = load_checkpoint(path)
    net = build_model(m.backbone, weights=None, num_clusters=m.num_clusters, trainable=m.trainable, layer=m.layer,
                      input_norm=config_input_norm(m, ckpt.get("config")),
                      freeze_batchnorm=config_freeze_batchnorm(m, ckpt.get("config")))
    net.load_state_dict(ckpt["model"])
    return net.requires_grad_(False).to(device).eval()


def cache_key(teacher_ckpt: Path, manifest: Manifest, image_size) -> str:
    """Teacher checkpoint hash + manifest hash + input size."""
    h = hashlib.sha256()
    h.update(file_hash(teacher_ckpt).encode())
    h.update(file_hash(Path(manifest.root) / MANIFEST_NAME).encode())
    h.update(repr(tuple(image_size)).encode())
    return h.hexdigest()[:20]


def compute_shard(net: SFRSNet, cfg: Config, manifest: Manifest, sid: str, train_pos: List[np.ndarray],
                  device: torch.device) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """This rank's (query, positive, 9 similarities) entries and the number of images forwarded."""
    q_globals = extract_group(net, net.output_dim, manifest, sid, "q", cfg.data, device)
    db_keys = manifest.group_keys(f"{sid}_db")
    row = {k: i for i, k in enumerate(db_keys)}
    owners = tc.invert_positives(train_pos, len(db_keys))
    loader = pass_loader(manifest, sid, "db", cfg.data)
    parts = []
    forwarded = 0
    group = f"{sid}_db"
    with Progress(expected_count(manifest, group, du.get_rank(), du.get_world_size()), f"teacher {group}",
                  unit="img") as bar, torch.no_grad():
        for batch in loader:
            ids = np.asarray([row[k] for k in batch["key"]], dtype=np.int64)
            regions = net(batch["image"].to(device), regions=True).float().cpu().numpy()
            forwarded += len(ids)
            parts.append(tc.region_query_similarities(ids, regions, q_globals, owners))
            bar.update(len(ids))
    forwarded += int(np.ceil(len(train_pos) / du.get_world_size()))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 9), np.float32), forwarded
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), forwarded)


def run_teacher_pass(cfg: Config, manifest: Manifest, train_pos: List[np.ndarray], teacher_ckpt: Path,
                     cache_dir: Path, device: torch.device) -> Tuple[tc.TeacherCache, str]:
    """Compute (or reuse) the teacher cache of ``teacher_ckpt``; a collective over all ranks."""
    key = du.broadcast_object(cache_key(teacher_ckpt, manifest, cfg.data.image_size) if du.is_main_process() else None)
    # rank 0 decides whether the cache is finished: other nodes may not see its done file yet
    if du.broadcast_object(tc.is_done(cache_dir, key) if du.is_main_process() else None):
        log.info("teacher cache %s found in %s: teacher pass skipped", key, cache_dir)
        return tc.load_cache(cache_dir, key, len(train_pos), wait_s=tc.VISIBLE_WAIT_S), key
    net = load_network(cfg, teacher_ckpt, device)
    with eval_mode(net):
        q, j, sims, forwarded = compute_shard(net, cfg, manifest, cfg.data.train_set, train_pos, device)
    tc.save_shard(cache_dir, key, du.get_rank(), du.get_world_size(), q, j, sims)
    total = du.all_reduce_int_sum(forwarded)
    du.barrier()
    if du.is_main_process():
        tc.mark_done(cache_dir, key, du.get_world_size(), {"teacher": str(teacher_ckpt), "forwarded": total})
    du.barrier()
    cache = tc.load_cache(cache_dir, key, len(train_pos), wait_s=tc.VISIBLE_WAIT_S)  # parts from other nodes
    if not cache.covers(train_pos):
        raise tc.TeacherCacheError(f"teacher cache {key} does not cover every training positive")
    log.info("teacher pass: %d images forwarded, cache %s", total, key)
    return cache, key
