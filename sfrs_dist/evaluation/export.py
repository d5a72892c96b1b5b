"""Descriptors out: the final descriptors of a split in files numpy and faiss read directly.

``save_split_descriptors(folder, manifest, sid, db, q)`` writes, under ``folder/<sid>/``::

    database.npy  queries.npy            float32 (N, D), C order, rows in manifest order
    database_utm.npy  queries_utm.npy    float64 (N, 2): UTM east, north
    database_names.txt  queries_names.txt  one file name per row, as the dataset names it

``np.load("database.npy", mmap_mode="r")`` reads a descriptor matrix without loading it,
and ``faiss.IndexFlatIP(d).add(np.load(...))`` indexes it. Every file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import numpy as np

from ..data.manifest import Manifest

ROLES = (("db", "database"), ("q", "queries"))


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _atomic_text(path: Path, lines: List[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def save_split_descriptors(folder: Path, manifest: Manifest, sid: str, db: np.ndarray, q: np.ndarray) -> Path:
    """Write the split's descriptors, UTMs and file names under ``folder/<sid>/``; returns that folder."""
    entry = manifest.splits[sid]
    out = Path(folder) / sid
    out.mkdir(parents=True, exist_ok=True)
    for (role, stem), desc in zip(ROLES, (db, q)):
        col = entry.role(role)
        desc = np.ascontiguousarray(desc, dtype=np.float32)
        if desc.shape[0] != len(col.keys):
            raise ValueError(f"{sid} {stem}: {desc.shape[0]} descriptors for {len(col.keys)} images")
        _atomic_npy(out / f"{stem}.npy", desc)
        _atomic_npy(out / f"{stem}_utm.npy", np.asarray(col.utm, dtype=np.float64).reshape(-1, 2))
        _atomic_text(out / f"{stem}_names.txt", list(col.relpath))
    return out
