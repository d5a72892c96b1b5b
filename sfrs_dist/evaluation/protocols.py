"""Per-dataset evaluation protocols: which database images are positives, spatial NMS, notes.

- Default: positives are the database images within the split's ``pos_dist_thr`` (25 m) of
  the query (KD-tree).
- Tokyo 24/7 (dataset name ``tokyo247``): retrievals pass spatial NMS, one image per panorama
  (``pano_id`` where the names carry it, else cutouts sharing a UTM position).
- Nordland (dataset name ``nordland``): positives by frame distance, ``|f_q - f_db| <= F``
  with ``F = data.nordland_frames`` (default 1; Patch-NetVLAD and the VPR-datasets-downloader
  convention count 10). Frames come from the positions VPR-datasets-downloader writes: every
  image on one line, ``NORDLAND_SPACING_M`` (2.4 m) apart, so the frame is
  ``UTM_north / 2.4``; a position off that grid stops the evaluation naming the image.
- Mapillary SLS validation (``msls_val``): the queries are those of the shard set; the
  builders keep only the official evaluation's 740 unless told otherwise.
"""

from __future__ import annotations

from typing import List

import numpy as np

from ..data.records import SplitData

NORDLAND_SPACING_M = 2.4
MSLS_OFFICIAL_QUERIES = 740


def is_spatial(name: str) -> bool:
    """Whether a dataset's retrievals pass spatial NMS per panorama (Tokyo 24/7)."""
    return name == "tokyo247"


def nordland_frames(split: SplitData, role_records) -> np.ndarray:
    """Frame number of each image: ``UTM_north / 2.4`` (the downloader's grid), checked."""
    north = np.asarray([r.utm[1] for r in role_records], dtype=np.float64)
    frames = np.rint(north / NORDLAND_SPACING_M)
    off = np.flatnonzero(np.abs(north - frames * NORDLAND_SPACING_M) > 0.05)
    if off.size:
        r = role_records[int(off[0])]
        raise ValueError(f"{split.name}_{split.split}: {r.relpath} has UTM north {r.utm[1]}, not on the "
                         f"{NORDLAND_SPACING_M} m frame grid of the Nordland layout ({off.size} such images)")
    return frames.astype(np.int64)


def frame_positives(q_frames: np.ndarray, db_frames: np.ndarray, tolerance: int) -> List[np.ndarray]:
    """Per query, sorted database indices whose frame lies within ``tolerance`` frames."""
    if tolerance < 0:
        raise ValueError(f"frame tolerance must be >= 0, got {tolerance}")
    db_frames = np.asarray(db_frames, dtype=np.int64)
    order = np.argsort(db_frames, kind="stable")
    sorted_frames = db_frames[order]
    lo = np.searchsorted(sorted_frames, np.asarray(q_frames) - tolerance, side="left")
    hi = np.searchsorted(sorted_frames, np.asarray(q_frames) + tolerance, side="right")
    return [np.sort(order[a:b]) for a, b in zip(lo, hi)]


def positives(split: SplitData, nordland_tolerance: int = 1) -> List[np.ndarray]:
    """Per query, the positives of the split's evaluation protocol (module docstring)."""
    if split.name == "nordland":
        return frame_positives(nordland_frames(split, split.queries), nordland_frames(split, split.database),
                               nordland_tolerance)
    return split.potential_positives()


def protocol_note(split: SplitData, nordland_tolerance: int = 1) -> str:
    """One line saying how a split is evaluated, for the results table."""
    n_q, n_db = len(split.queries), len(split.database)
    if split.name == "nordland":
        rule = f"positives within +-{nordland_tolerance} frame(s)"
    else:
        rule = f"positives within {split.pos_dist_thr:g} m"
    if is_spatial(split.name):
        rule += ", spatial NMS (one image per panorama)"
    if split.name == "msls" and split.split == "val":
        official = "the official evaluation's queries" if n_q <= MSLS_OFFICIAL_QUERIES else "all downloaded queries"
        rule += f", {official}"
    return f"{n_q} queries, {n_db} database images; {rule}"
