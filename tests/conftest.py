"""Shared fixtures: small JPEG splits built in the test, and a synthetic raw set + shards
generated once per test session."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
from PIL import Image

from sfrs_dist.data.records import DATABASE, QUERY, Record, SplitData, make_key


def write_jpeg(path: Path, rng: np.random.Generator, size=(32, 32)) -> None:
    """A small JPEG of smooth random content (h, w = size)."""
    h, w = size
    base = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def jpeg_split(root: Path, name: str, split: str, n_db: int, n_q: int, seed: int = 0,
               size=(32, 32)) -> SplitData:
    """A split whose images are random JPEGs written under ``root``; UTMs on a line."""
    rng = np.random.default_rng(seed)
    recs = {}
    for role, n in ((DATABASE, n_db), (QUERY, n_q)):
        out = []
        for i in range(n):
            rel = f"{role}/{i:03d}/{i:06d}.jpg"
            f = root / name / split / rel
            write_jpeg(f, rng, size)
            cond = ("day", "night")[i % 2] if role == QUERY else None
            out.append(Record(key=make_key(name, split, role, i), name=name, split=split, role=role,
                              index=i, relpath=rel, file=str(f), utm=(500000.0 + 7.0 * i, 4400000.0),
                              condition=cond))
        recs[role] = out
    return SplitData(name=name, split=split, database=recs[DATABASE], queries=recs[QUERY])


@pytest.fixture
def make_jpeg_split(tmp_path: Path) -> Callable[..., SplitData]:
    """Factory: ``make_jpeg_split(name, split, n_db, n_q, seed=0)`` under ``tmp_path/raw``."""

    def make(name: str, split: str, n_db: int, n_q: int, seed: int = 0, size=(32, 32)) -> SplitData:
        return jpeg_split(tmp_path / "raw", name, split, n_db, n_q, seed, size)

    return make


def _have_synthetic() -> bool:
    return importlib.util.find_spec("sfrs_dist.data.synthetic") is not None


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """Raw Pittsburgh/Tokyo-format data of the ``tiny`` synthetic preset (generated once)."""
    if not _have_synthetic():
        pytest.skip("sfrs_dist.data.synthetic not available")
    from sfrs_dist.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_raw")
    generate(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_raw: Path, tmp_path_factory) -> Path:
    """Shard set built from ``synthetic_raw`` (shard size 16), built once per session."""
    from sfrs_dist.data.datasets import load_dataset
    from sfrs_dist.data.shards import build_shards

    out = tmp_path_factory.mktemp("synthetic_shards")
    splits: List[SplitData] = load_dataset("synthetic", synthetic_raw)
    build_shards(splits, out, shard_size=16, workers=1, progress=False,
                 source={"dataset": "synthetic", "root": str(Path(synthetic_raw).resolve()), "scale": "30k"})
    return out


@pytest.fixture(scope="session")
def split_shard_sets(synthetic_raw: Path, tmp_path_factory):
    """The synthetic data as two shard sets: Pittsburgh-style splits, and Tokyo 24/7 alone."""
    from sfrs_dist.data.datasets import load_dataset
    from sfrs_dist.data.shards import build_shards

    splits: List[SplitData] = load_dataset("synthetic", synthetic_raw)
    out = []
    for name, keep in (("pitts", lambda s: s.name != "tokyo247"), ("tokyo", lambda s: s.name == "tokyo247")):
        folder = tmp_path_factory.mktemp(f"{name}_shards")
        build_shards([s for s in splits if keep(s)], folder, shard_size=16, workers=1, progress=False,
                     source={"dataset": "synthetic", "root": str(Path(synthetic_raw).resolve()), "part": name})
        out.append(folder)
    return tuple(out)
