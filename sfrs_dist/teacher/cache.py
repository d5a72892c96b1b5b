"""The teacher's soft labels, computed once per generation and cached.

For every training query q and every one of its training positives j (the images a
difficult positive can be drawn from), the cache holds the teacher's similarities between
q's global descriptor and the 9 region descriptors of j: a (9,) vector. Stored in CSR form
over queries: ``offsets`` (Q+1), ``pos`` (nnz database indices, sorted per query) and
``sims`` (nnz, 9).

Every rank writes its part; rank 0 writes the done file after a barrier. Ranks on other nodes
may not see a file another node just wrote (NFS caches directory lookups, a missing name
included, for up to a minute by default), so ``load_cache`` waits a bounded time
(``wait_s``, ``VISIBLE_WAIT_S`` in the teacher pass) for each file before it fails naming it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np


class TeacherCacheError(RuntimeError):
    """A teacher cache entry is missing or does not match what the training step asks for."""


def invert_positives(positives: Sequence[np.ndarray], num_db: int) -> List[np.ndarray]:
    """For every database image, the queries that have it among their positives."""
    buckets: List[List[int]] = [[] for _ in range(num_db)]
    for q, pos in enumerate(positives):
        for j in pos:
            buckets[int(j)].append(q)
    return [np.asarray(b, dtype=np.int64) for b in buckets]


def region_query_similarities(
    db_ids: np.ndarray, db_regions: np.ndarray, q_globals: np.ndarray, queries_of_db: Sequence[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarities between the regions of some database images and the queries that see them.

    Args:
        db_ids: (B,) database indices of the images in ``db_regions``.
        db_regions: (B, 9, D) region descriptors of those images.
        q_globals: (Q, D) global descriptors of all training queries.
        queries_of_db: per database index, the queries having it as a training positive.

    Returns:
        ``(q, j, sims)``: query indices, database indices and (n, 9) similarities.
    """
    qs, js, sims = [], [], []
    for b, j in enumerate(db_ids):
        owners = queries_of_db[int(j)]
        if owners.size == 0:
            continue
        s = q_globals[owners] @ db_regions[b].T  # (n_owners, 9)
        qs.append(owners)
        js.append(np.full(owners.size, int(j), dtype=np.int64))
        sims.append(s.astype(np.float32))
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 9), np.float32)
    return np.concatenate(qs), np.concatenate(js), np.concatenate(sims)


@dataclass
class TeacherCache:
    """Teacher similarities in CSR form over training queries."""

    offsets: np.ndarray
    pos: np.ndarray
    sims: np.ndarray
    key: str

    @classmethod
    def from_triplets(cls, q: np.ndarray, j: np.ndarray, sims: np.ndarray, num_queries: int, key: str) -> "TeacherCache":
        order = np.lexsort((j, q))
        q, j, sims = q[order], j[order], sims[order]
        if q.size > 1 and np.any((q[1:] == q[:-1]) & (j[1:] == j[:-1])):
            raise TeacherCacheError("teacher cache has duplicate (query, positive) entries")
        offsets = np.zeros(num_queries + 1, dtype=np.int64)
        np.add.at(offsets, q + 1, 1)
        return cls(np.cumsum(offsets), j, sims, key)

    def lookup(self, query: int, positives: Sequence[int]) -> np.ndarray:
        """(len(positives), 9) teacher similarities of ``query`` to each of ``positives``."""
        lo, hi = self.offsets[query], self.offsets[query + 1]
        row = self.pos[lo:hi]
        positives = np.asarray(positives, dtype=np.int64)
        idx = np.searchsorted(row, positives)
        ok = idx < row.size
        ok[ok] = row[idx[ok]] == positives[ok]
        if not np.all(ok):
            missing = [int(p) for p, o in zip(positives, ok) if not o]
            raise TeacherCacheError(
                f"teacher cache {self.key}: no entry for query {query} and database image(s) {missing}"
            )
        return self.sims[lo + idx]

    def covers(self, positives: Sequence[np.ndarray]) -> bool:
        """True when every (query, positive) pair of ``positives`` has an entry."""
        for q, pos in enumerate(positives):
            lo, hi = self.offsets[q], self.offsets[q + 1]
            if not np.array_equal(self.pos[lo:hi], np.asarray(pos)):
                return False
        return True


def soft_label_entropy(cache: TeacherCache, tau: float) -> np.ndarray:
    """Per training query, the normalised entropy of its teacher soft labels at temperature ``tau``.

    The softmax of ``sims / tau`` over all of the query's cached (positive, region) entries, its
    entropy divided by the log of their number: 1 for uniform labels (nothing to distil), 0
    for all mass on one region. Queries with fewer than two entries are left out.
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive; got {tau}")
    out = []
    for q in range(len(cache.offsets) - 1):
        v = cache.sims[cache.offsets[q]:cache.offsets[q + 1]].astype(np.float64).ravel() / tau
        if v.size < 2:
            continue
        p = np.exp(v - v.max())
        p /= p.sum()
        out.append(float(-(p * np.log(np.clip(p, 1e-300, None))).sum() / np.log(v.size)))
    return np.asarray(out)


def shard_file(cache_dir: Path, key: str, rank: int, world: int) -> Path:
    return Path(cache_dir) / f"teacher_{key}_rank{rank:03d}of{world:03d}.npz"


def done_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"teacher_{key}.done.json"


def save_shard(cache_dir: Path, key: str, rank: int, world: int, q: np.ndarray, j: np.ndarray, sims: np.ndarray) -> None:
    """This rank's entries, written under a temporary name and renamed."""
    path = shard_file(cache_dir, key, rank, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, q=q, j=j, sims=sims)
    os.replace(tmp, path)


def mark_done(cache_dir: Path, key: str, world: int, info: Dict) -> None:
    path = done_file(cache_dir, key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "world": world, **info}))
    os.replace(tmp, path)


def is_done(cache_dir: Path, key: str) -> bool:
    return done_file(cache_dir, key).is_file()


#: Seconds a rank waits for a cache file written on another node to become visible.
VISIBLE_WAIT_S = 60.0


def wait_visible(path: Path, wait_s: float) -> bool:
    """True once ``path`` can be opened, retrying for up to ``wait_s`` seconds; False after."""
    deadline = time.monotonic() + max(0.0, wait_s)
    delay = 0.05
    while True:
        try:
            with open(path, "rb"):  # an open revalidates NFS attributes (close-to-open), a stat may not
                return True
        except FileNotFoundError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            os.listdir(path.parent)  # a directory read refreshes the client's cached entries
        except OSError:
            pass
        time.sleep(min(delay, left))
        delay = min(2 * delay, 2.0)


def load_cache(cache_dir: Path, key: str, num_queries: int, wait_s: float = 0.0) -> TeacherCache:
    """All rank shards of a finished cache merged into one ``TeacherCache``.

    ``wait_s``: how long to retry opening each file (the done file, then every rank part)
    before failing; for readers that know the cache was finished, possibly on another node.
    """
    waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
    done = done_file(cache_dir, key)
    if not wait_visible(done, wait_s):
        raise TeacherCacheError(f"teacher cache {key} not found in {cache_dir} (no {done.name}{waited})")
    world = json.loads(done.read_text())["world"]
    parts = []
    for r in range(world):
        f = shard_file(cache_dir, key, r, world)
        if not wait_visible(f, wait_s):
            raise TeacherCacheError(f"teacher cache {key}: shard file missing{waited}: {f}")
        with np.load(f) as z:
            parts.append((z["q"], z["j"], z["sims"]))
    q = np.concatenate([p[0] for p in parts])
    j = np.concatenate([p[1] for p in parts])
    sims = np.concatenate([p[2] for p in parts]).reshape(-1, 9)
    return TeacherCache.from_triplets(q, j, sims, num_queries, key)
