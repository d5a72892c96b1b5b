"""The synthetic city: a raw-pixel descriptor baseline (a hardness check of a generated city)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .city import (
    CONDITIONS,
    NUM_YAWS,
    POS_DIST_THR,
)
from .writers import (
    read_dbstruct,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Hardness check: a raw-pixel descriptor baseline
# ----------------------------------------------------------------------------------------


def raw_pixel_descriptors(files: Iterable[Path], size: Tuple[int, int] = (12, 16)) -> np.ndarray:
    """Grey image downsampled to ``size`` (H, W), mean-subtracted, L2-normalised (float32)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            g = np.asarray(
                im.convert("L").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32
            ).ravel()
        g = g - g.mean()
        out.append(g / max(float(np.linalg.norm(g)), 1e-6))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size[0] * size[1]), np.float32)


def recall_at_n(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    utm_q: np.ndarray,
    utm_db: np.ndarray,
    ns: Sequence[int] = (1, 5),
    thr: float = POS_DIST_THR,
    db_groups: Optional[np.ndarray] = None,
) -> Dict[int, float]:
    """Recall@N of cosine retrieval (faiss ``IndexFlatIP``): a query is correct when one of
    its top-N database images lies within ``thr`` metres. With ``db_groups`` (panorama id
    per database image) the ranking keeps only the best image per group (spatial NMS)."""
    import faiss
    from scipy.spatial import cKDTree

    index = faiss.IndexFlatIP(db_desc.shape[1])
    index.add(np.ascontiguousarray(db_desc, dtype=np.float32))
    n_max = max(ns)
    k = min(len(db_desc), n_max * (NUM_YAWS if db_groups is not None else 1))
    _, idx = index.search(np.ascontiguousarray(q_desc, dtype=np.float32), k)
    tree = cKDTree(utm_db)
    gt = tree.query_ball_point(utm_q, r=thr)
    hits = {n: 0 for n in ns}
    for qi in range(len(q_desc)):
        ranked = [int(i) for i in idx[qi] if i >= 0]
        if db_groups is not None:
            seen, kept = set(), []
            for i in ranked:
                if db_groups[i] not in seen:
                    seen.add(db_groups[i])
                    kept.append(i)
            ranked = kept
        pos = set(gt[qi])
        for n in ns:
            if pos.intersection(ranked[:n]):
                hits[n] += 1
    return {n: 100.0 * hits[n] / max(len(q_desc), 1) for n in ns}


def chance_recall_at_1(
    utm_q: np.ndarray, utm_db: np.ndarray, thr: float = POS_DIST_THR, db_groups: Optional[np.ndarray] = None
) -> float:
    """Expected Recall@1 (percent) of a random ranking: the mean share of database images
    (or of groups, with ``db_groups``) lying within ``thr`` metres of the query."""
    from scipy.spatial import cKDTree

    if len(utm_q) == 0:
        return 0.0
    gt = cKDTree(utm_db).query_ball_point(utm_q, r=thr)
    if db_groups is None:
        return 100.0 * float(np.mean([len(g) / len(utm_db) for g in gt]))
    n_groups = len(np.unique(db_groups))
    return 100.0 * float(np.mean([len(set(db_groups[g])) / n_groups for g in gt]))


def raw_pixel_baseline(root: Path, ns: Sequence[int] = (1, 5)) -> Dict[str, Dict[str, float]]:
    """Raw-pixel Recall@N on the synthetic Pittsburgh test split and on Tokyo day/sunset/night.

    ``root`` is the folder written by ``generate`` (holding ``pitts/`` and ``tokyo247/``).
    Returns per query set ``{"R@N": ..., "chance@1": ..., "queries": ...}`` (percentages).
    """
    root = Path(root)
    results: Dict[str, Dict[str, float]] = {}

    def entry(q, db, utm_q, utm_db, groups=None) -> Dict[str, float]:
        rec = recall_at_n(q, db, utm_q, utm_db, ns, db_groups=groups)
        out = {f"R@{n}": rec[n] for n in ns}
        out["chance@1"] = chance_recall_at_1(utm_q, utm_db, db_groups=groups)
        out["queries"] = float(len(utm_q))
        return out

    pr = root / "pitts"
    p = read_dbstruct(pr / "datasets" / "pitts30k_test.mat")
    db = raw_pixel_descriptors(pr / f for f in p["dbImageFns"])
    q = raw_pixel_descriptors(pr / "queries_real" / f for f in p["qImageFns"])
    results["pitts30k_test"] = entry(q, db, p["utmQ"], p["utmDb"])
    tr = root / "tokyo247"
    t = read_dbstruct(tr / "tokyo247.mat")
    db = raw_pixel_descriptors((tr / "images" / f).with_suffix(".png") for f in t["dbImageFns"])
    groups = np.array([int(f.split("/")[0]) for f in t["dbImageFns"]])
    for cond in CONDITIONS:
        sel = [i for i, f in enumerate(t["qImageFns"]) if Path(f).stem.endswith("_" + cond)]
        q = raw_pixel_descriptors(tr / "query" / t["qImageFns"][i] for i in sel)
        results[f"tokyo247_{cond}"] = entry(q, db, t["utmQ"][sel], t["utmDb"], groups)
    return results
