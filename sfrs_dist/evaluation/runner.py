"""Evaluate a descriptor function on manifest splits: distributed extraction and search.

Two layouts of the descriptors, the same recall tables:

* sharded (the default): every rank keeps the database rows it extracted, with their
  global ids in manifest order (``extract_group_local``), applies the PCA-whitening to them
  and searches them for every query (``sharded_search_topk``: faiss on the rank's GPU where
  faiss has GPUs, CPU otherwise, or the bf16 path). Queries are few: each rank whitens its
  own, then they are all-gathered. The per-rank top-K (scores, global ids) are all-gathered
  and merged, ties by the smaller global id. No rank holds more than its share of the
  database (Pitts250k-test at 32768 dims is 11 GB).
* gathered (``shard_db=False``): every descriptor is all-gathered on every rank, rank 0
  whitens and searches the whole database.

The recall table (spatial NMS for Tokyo 24/7, per-condition rows) is computed on rank 0
from the merged top-K by ``recall_from_topk`` in both layouts and broadcast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import distributed as du
from ..config import DataConfig
from ..data.datasets import panorama_ids
from ..data.manifest import Manifest
from ..data.random_access import ShardReader
from ..data.records import record_keys
from ..extraction.descriptors import gather_rows
from ..extraction.passes import extract_group, extract_group_local, transform_kind
from . import protocols
from .pca import PCAWhitening, broadcast_pca
from .recall import recall_from_topk, search_depth
from .search import search_topk, sharded_search_topk
from .visualize import visualize_queries

log = logging.getLogger(__name__)

Table = Dict[str, Dict[int, float]]
#: Retrievals per drawn query (``render_examples``).
DRAW_K = 5


@dataclass
class SplitTruth:
    """What the recall table of a split needs besides the retrievals."""

    positives: List[np.ndarray]
    panorama_ids: Optional[np.ndarray] = None
    conditions: Optional[List[str]] = None
    counts: Dict[str, int] = field(default_factory=dict)


def is_spatial(manifest: Manifest, sid: str) -> bool:
    """Whether the split's retrievals pass spatial NMS (Tokyo 24/7: one image per panorama)."""
    return protocols.is_spatial(manifest.splits[sid].name)


def split_truth(manifest: Manifest, sid: str, nordland_frames: int = 1) -> SplitTruth:
    """Positives (the split's protocol: ``evaluation/protocols.py``), panorama ids (Tokyo 24/7),
    query conditions and query counts of a split."""
    split = manifest.split_data(sid)
    conditions = [r.condition for r in split.queries]
    conditions = conditions if any(c is not None for c in conditions) else None
    if conditions is not None:
        conditions = [c or "unknown" for c in conditions]
    pano = panorama_ids(split) if is_spatial(manifest, sid) else None
    counts = {"all": len(split.queries)}
    for c in conditions or []:
        counts[c] = counts.get(c, 0) + 1
    return SplitTruth(protocols.positives(split, nordland_frames), pano, conditions, counts)


def table_from_topk(topk: np.ndarray, truth: SplitTruth, ns: Sequence[int]) -> Tuple[Table, Dict[str, int]]:
    """(recall table, query counts) of a split from its retrieved database ids."""
    table = recall_from_topk(topk, truth.positives, ns, panorama_ids=truth.panorama_ids,
                             conditions=truth.conditions)
    return table, truth.counts


def split_descriptors(fn: Callable[[torch.Tensor], torch.Tensor], dim: int, manifest: Manifest, sid: str,
                      data: DataConfig, device: torch.device, bf16: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(database, query) descriptors of split ``sid``, on every rank, in manifest order."""
    name = manifest.splits[sid].name
    db = extract_group(fn, dim, manifest, sid, "db", data, device, bf16=bf16)
    q = extract_group(fn, dim, manifest, sid, "q", data, device, kind=transform_kind(name, data.aspect_preserving, "q"),
                      bf16=bf16)
    return db, q


def recall_of_split(db: np.ndarray, q: np.ndarray, manifest: Manifest, sid: str, ns: Sequence[int],
                    bf16: bool = False) -> Tuple[Table, Dict[str, int]]:
    """Recall table of a split from all its descriptors (Tokyo 24/7: spatial NMS per panorama)."""
    _, topk = search_topk(db, q, search_depth(ns, is_spatial(manifest, sid)), bf16=bf16)
    return table_from_topk(topk, split_truth(manifest, sid), ns)


def sharded_split_topk(fn: Callable[[torch.Tensor], torch.Tensor], dim: int, manifest: Manifest, sid: str,
                       data: DataConfig, device: torch.device, k: int, pca: Optional[PCAWhitening] = None,
                       bf16: bool = False, bf16_search: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, database ids in manifest order) of every query, database kept sharded.

    ``bf16``: extraction autocast; ``bf16_search`` (default: ``bf16``): the bf16 candidate
    search, on ``device``. A collective; every rank returns the same arrays. ``pca`` must be
    the same on every rank.
    """
    name = manifest.splits[sid].name
    db_ids, db = extract_group_local(fn, dim, manifest, sid, "db", data, device, bf16=bf16)
    q_ids, q = extract_group_local(fn, dim, manifest, sid, "q", data, device,
                                   kind=transform_kind(name, data.aspect_preserving, "q"), bf16=bf16)
    if pca is not None:
        db, q = pca.transform(db), pca.transform(q)
    q = gather_rows(q_ids, q, len(manifest.group_keys(f"{sid}_q")))
    log.debug("%s: searching %d database rows of this rank for %d queries, top %d", sid, len(db_ids), len(q), k)
    return sharded_search_topk(db, db_ids, q, k, bf16=bf16 if bf16_search is None else bf16_search, device=device)


def _same_pca_everywhere(pca: Optional[PCAWhitening]) -> Optional[PCAWhitening]:
    """``pca`` on every rank: rank 0's is broadcast where only rank 0 has one (a collective)."""
    if not du.is_distributed():
        return pca
    have = du.all_gather_object(pca is not None)
    if all(have) or not any(have):
        return pca
    if not have[0]:
        raise ValueError(f"evaluate_splits: a PCA was given on ranks {[r for r, h in enumerate(have) if h]} "
                         f"but not on rank 0")
    log.info("evaluate_splits: PCA given on rank 0 only, broadcasting it")
    return broadcast_pca(pca)


def evaluate_splits(fn: Callable[[torch.Tensor], torch.Tensor], dim: int, manifest: Manifest,
                    sids: Sequence[str], data: DataConfig, device: torch.device, ns: Sequence[int],
                    pca: Optional[PCAWhitening] = None, bf16: bool = False,
                    on_topk: Optional[Callable[[str, np.ndarray], None]] = None,
                    shard_db: bool = True, bf16_search: Optional[bool] = None,
                    on_descriptors: Optional[Callable[[str, np.ndarray, np.ndarray], None]] = None,
                    ) -> Dict[str, Tuple[Table, Dict[str, int]]]:
    """Recall tables (and query counts) of several splits, on every rank.

    Args:
        bf16: bf16 autocast of the extraction.
        bf16_search: bf16 candidate search (exact re-scoring) on ``device`` instead of faiss
            (default: ``bf16``).
        shard_db: keep the database descriptors sharded across ranks (the module docstring);
            False gathers them all on every rank and searches on rank 0. Same tables.
        on_descriptors: ``on_descriptors(sid, db, q)`` is called on rank 0 with each split's
            final (PCA-whitened where ``pca`` is given) database and query descriptors in
            manifest order; it needs them all on rank 0, so it implies ``shard_db=False``.
        pca: applied to database and query descriptors before the search. In the sharded
            layout every rank needs it; one given on rank 0 only is broadcast.
        on_topk: ``on_topk(sid, ids)`` is called on rank 0 with each split's retrieved
            database ids, (Q, K) best first before spatial NMS, ``K >= 5`` (e.g. to draw
            retrievals with ``render_examples``).
    """
    shard_db = shard_db and on_descriptors is None
    if shard_db:
        pca = _same_pca_everywhere(pca)
    search_bf16 = bf16 if bf16_search is None else bool(bf16_search)
    out: Dict[str, Tuple[Table, Dict[str, int]]] = {}
    for sid in sids:
        depth = search_depth(ns, is_spatial(manifest, sid))
        k = max(depth, DRAW_K) if on_topk is not None else depth
        if shard_db:
            _, topk = sharded_split_topk(fn, dim, manifest, sid, data, device, k, pca=pca, bf16=bf16,
                                         bf16_search=search_bf16)
        else:
            db, q = split_descriptors(fn, dim, manifest, sid, data, device, bf16)
            topk = None
            if du.is_main_process():
                if pca is not None:
                    db, q = pca.transform(db), pca.transform(q)
                _, topk = search_topk(db, q, k, bf16=search_bf16, device=device)
                if on_descriptors is not None:
                    on_descriptors(sid, db, q)
            del db, q
        if du.is_main_process():
            out[sid] = table_from_topk(topk, split_truth(manifest, sid, data.nordland_frames), ns)
            if on_topk is not None:
                on_topk(sid, topk)
    return du.broadcast_object(out)


def render_examples(manifest: Manifest, sid: str, topk: np.ndarray, out_dir: Path,
                    num_queries: int = 3, k: int = DRAW_K) -> List[str]:
    """Retrieval strips (top-k framed green/red by ground truth) for a few evenly spread queries.

    ``topk``: (Q, >= k) retrieved database ids of every query of the split, best first (as
    given to ``evaluate_splits``' ``on_topk``).
    """
    split = manifest.split_data(sid)
    picks = np.linspace(0, len(split.queries) - 1, num=min(num_queries, len(split.queries))).astype(int)
    with ShardReader(manifest.root, manifest) as reader:
        return visualize_queries(
            picks, None, None, split.utm_q, split.utm_db, record_keys(split.queries),
            record_keys(split.database), lambda keys: {key: reader.get(key)[0] for key in keys}, str(out_dir),
            k=k, radius=split.pos_dist_thr, topk=np.asarray(topk)[picks],
        )


def flat_metrics(tables: Dict[str, Tuple[Table, Dict[str, int]]], ns: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """``<split>/<condition>/recall_<N>`` metric names for MLflow (percentages)."""
    out = {}
    for sid, (table, _) in tables.items():
        for cond, row in table.items():
            for n in ns:
                if n in row:
                    out[f"{sid}/{cond}/recall_{n}"] = 100.0 * float(row[n])
    return out
