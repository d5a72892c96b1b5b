"""Evaluate a descriptor function on manifest splits: distributed extraction, rank-0 search."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import distributed as du
from ..config import DataConfig
from ..data.datasets import panorama_ids
from ..data.manifest import Manifest
from ..data.random_access import ShardReader
from ..training.passes import extract_group, transform_kind
from .pca import PCAWhitening
from .recall import evaluate_retrieval
from .visualize import visualize_queries

log = logging.getLogger(__name__)

Table = Dict[str, Dict[int, float]]


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
    """Recall table of a split from its descriptors (Tokyo 24/7: spatial NMS per panorama)."""
    split = manifest.split_data(sid)
    conditions = [r.condition for r in split.queries]
    conditions = conditions if any(c is not None for c in conditions) else None
    if conditions is not None:
        conditions = [c or "unknown" for c in conditions]
    pano = panorama_ids(split) if split.name == "tokyo247" else None
    table = evaluate_retrieval(db, q, split.potential_positives(), ns, panorama_ids=pano,
                               conditions=conditions, bf16=bf16)
    counts = {"all": len(split.queries)}
    for c in conditions or []:
        counts[c] = counts.get(c, 0) + 1
    return table, counts


def evaluate_splits(fn: Callable[[torch.Tensor], torch.Tensor], dim: int, manifest: Manifest,
                    sids: Sequence[str], data: DataConfig, device: torch.device, ns: Sequence[int],
                    pca: Optional[PCAWhitening] = None, bf16: bool = False,
                    on_descriptors: Optional[Callable[[str, np.ndarray, np.ndarray], None]] = None,
                    ) -> Dict[str, Table]:
    """Recall tables of several splits; extraction on all ranks, search on rank 0, result on all.

    ``on_descriptors(sid, db, queries)`` is called on rank 0 with each split's final
    descriptors (after PCA), e.g. to draw retrievals.
    """
    out: Dict[str, Tuple[Table, Dict[str, int]]] = {}
    for sid in sids:
        db, q = split_descriptors(fn, dim, manifest, sid, data, device, bf16)
        if du.is_main_process():
            if pca is not None:
                db, q = pca.transform(db), pca.transform(q)
            out[sid] = recall_of_split(db, q, manifest, sid, ns, bf16)
            if on_descriptors is not None:
                on_descriptors(sid, db, q)
    return du.broadcast_object(out)


def render_examples(manifest: Manifest, sid: str, db: np.ndarray, q: np.ndarray, out_dir: Path,
                    num_queries: int = 3, k: int = 5) -> List[str]:
    """Retrieval strips (top-k framed green/red by ground truth) for a few evenly spread queries."""
    split = manifest.split_data(sid)
    picks = np.linspace(0, len(split.queries) - 1, num=min(num_queries, len(split.queries))).astype(int)
    with ShardReader(manifest.root, manifest) as reader:
        return visualize_queries(
            picks, q, db, split.utm_q, split.utm_db, [r.key for r in split.queries], [r.key for r in split.database],
            lambda keys: {key: reader.get(key)[0] for key in keys}, str(out_dir), k=k, radius=split.pos_dist_thr,
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
