"""Dataset records and geographic ground truth.

A ``Record`` is one image of a dataset split (database or query) with its UTM position;
a ``SplitData`` is one split (e.g. ``pitts30k`` ``train``) with its thresholds and the
ground truth computed through a KD-tree, never an all-pairs distance matrix.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from scipy.spatial import cKDTree

QUERY = "q"
DATABASE = "db"
ROLES = (QUERY, DATABASE)


def make_key(name: str, split: str, role: str, index: int) -> str:
    """Sample key, unique across a shard set: ``<name>_<split>_<q|db>_<index:06d>``.

    Keys contain no dot (WebDataset splits a member name at its first dot).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return f"{name}_{split}_{role}_{index:06d}"


@dataclass(frozen=True)
class Record:
    """One image of a split.

    Attributes:
        key: unique sample key (see ``make_key``).
        name: dataset name, e.g. ``pitts30k``, ``tokyo247``, ``tokyoTM``.
        split: ``train``, ``val`` or ``test``.
        role: ``q`` (query) or ``db`` (database).
        index: position of the image in its role list of the .mat file.
        relpath: path as written in the .mat (relative to the role's folder).
        file: resolved absolute path on disk ("" when the raw folder is not at hand).
        utm: (east, north) in metres.
        condition: light condition (``day``/``sunset``/``night``) where the data says it.
        timestamp: capture time stamp where the format has one (Tokyo Time Machine).
        extra: further per-image fields of the source format where it has them (the
            ``@``-named layout: ``pano_id``, ``tile_num``, ``heading``, ``timestamp``, ``note``,
            ...; Mapillary SLS: ``view_direction``, ``city``), strings, empty fields left out.
    """

    key: str
    name: str
    split: str
    role: str
    index: int
    relpath: str
    file: str
    utm: tuple
    condition: Optional[str] = None
    timestamp: Optional[int] = None
    extra: Optional[Dict[str, str]] = None

    def meta(self) -> Dict:
        """JSON-able metadata stored next to the image in a shard (``extra`` only where set)."""
        out = {
            "key": self.key,
            "name": self.name,
            "split": self.split,
            "role": self.role,
            "index": self.index,
            "relpath": self.relpath,
            "utm": [float(self.utm[0]), float(self.utm[1])],
            "condition": self.condition,
            "timestamp": self.timestamp,
        }
        if self.extra is not None:
            out["extra"] = dict(self.extra)
        return out


class RecordTable(SequenceABC):
    """Records of one role held as columns, each ``Record`` built when it is read.

    What ``Manifest.split_data`` returns for a role: at a million images a list of
    ``Record`` objects costs seconds and a gigabyte per rank, while the columns (memory-mapped
    arrays of a schema-2 manifest) cost neither. ``keys`` and ``utm`` give whole columns at
    once (see ``record_keys`` and ``record_utm``).
    """

    def __init__(self, name: str, split: str, role: str, keys: Sequence[str], index: Sequence[int],
                 relpath: Sequence[str], utm: Any, condition: Sequence[Optional[str]],
                 timestamp: Sequence[Optional[int]], extra: Optional[Sequence[Optional[Dict[str, str]]]] = None):
        self.name, self.split, self.role = name, split, role
        self.keys, self.index, self.relpath = keys, index, relpath
        self.utm = utm
        self.condition, self.timestamp, self.extra = condition, timestamp, extra or None
        n = len(keys)
        for what, col in (("index", index), ("relpath", relpath), ("utm", utm), ("condition", condition),
                          ("timestamp", timestamp), ("extra", extra or [None] * n)):
            if len(col) != n:
                raise ValueError(f"{name}_{split} {role}: column {what} has {len(col)} rows, keys {n}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: Union[int, slice]) -> Union[Record, List[Record]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        u = self.utm[i]
        t = self.timestamp[i]
        return Record(
            key=self.keys[i], name=self.name, split=self.split, role=self.role, index=int(self.index[i]),
            relpath=self.relpath[i], file="", utm=(float(u[0]), float(u[1])), condition=self.condition[i],
            timestamp=None if t is None else int(t), extra=None if self.extra is None else self.extra[i],
        )

    def __add__(self, other: Sequence[Record]) -> List[Record]:
        return list(self) + list(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SequenceABC):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def record_keys(records: Sequence[Record]) -> List[str]:
    """The keys of a sequence of records, read from the key column where it is one."""
    if isinstance(records, RecordTable):
        return list(records.keys)
    return [r.key for r in records]


def record_utm(records: Sequence[Record]) -> np.ndarray:
    """(N, 2) float64 UTM positions of a sequence of records."""
    if isinstance(records, RecordTable):
        return np.asarray(records.utm, dtype=np.float64).reshape(-1, 2)
    return np.asarray([r.utm for r in records], dtype=np.float64).reshape(-1, 2)


@dataclass
class SplitData:
    """One dataset split: database and query records plus ground-truth thresholds.

    Attributes:
        name: dataset name (``pitts30k``, ``pitts250k``, ``tokyo247``, ``tokyoTM``).
        split: split name.
        database: database records, in .mat order.
        queries: query records, in .mat order.
        pos_dist_thr: potential-positive radius in metres (25).
        nontriv_pos_dist_sq_thr: squared radius of training positives (100, i.e. 10 m).
        exclude_same_timestamp: positives must come from another time stamp (Tokyo TM).
    """

    name: str
    split: str
    database: Sequence[Record]
    queries: Sequence[Record]
    pos_dist_thr: float = 25.0
    nontriv_pos_dist_sq_thr: float = 100.0
    exclude_same_timestamp: bool = False
    _tree: Optional[cKDTree] = field(default=None, repr=False, compare=False)

    @property
    def utm_db(self) -> np.ndarray:
        return record_utm(self.database)

    @property
    def utm_q(self) -> np.ndarray:
        return record_utm(self.queries)

    def _db_tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = cKDTree(self.utm_db)
        return self._tree

    def _within(self, radius: float) -> List[np.ndarray]:
        hits = self._db_tree().query_ball_point(self.utm_q, r=radius)
        out = []
        if self.exclude_same_timestamp:
            q_ts, db_ts = _timestamps(self.queries), _timestamps(self.database)
        for qi, idx in enumerate(hits):
            idx = np.asarray(sorted(idx), dtype=np.int64)
            if self.exclude_same_timestamp and idx.size:
                ts = q_ts[qi]
                keep = [db_ts[j] != ts for j in idx]
                idx = idx[np.asarray(keep, dtype=bool)]
            out.append(idx)
        return out

    def potential_positives(self) -> List[np.ndarray]:
        """Per query, sorted database indices within ``pos_dist_thr`` metres."""
        return self._within(self.pos_dist_thr)

    def training_positives(self) -> List[np.ndarray]:
        """Per query, sorted database indices within sqrt(``nontriv_pos_dist_sq_thr``) metres."""
        return self._within(float(np.sqrt(self.nontriv_pos_dist_sq_thr)))


def _timestamps(records: Sequence[Record]) -> Sequence[Optional[int]]:
    return records.timestamp if isinstance(records, RecordTable) else [r.timestamp for r in records]


def ground_truth_within(utm_q: np.ndarray, utm_db: np.ndarray, radius: float) -> List[np.ndarray]:
    """Sorted database indices within ``radius`` of each query, through a KD-tree."""
    tree = cKDTree(np.asarray(utm_db, dtype=np.float64).reshape(-1, 2))
    hits = tree.query_ball_point(np.asarray(utm_q, dtype=np.float64).reshape(-1, 2), r=radius)
    return [np.asarray(sorted(h), dtype=np.int64) for h in hits]


def records_by_key(records: Sequence[Record]) -> Dict[str, Record]:
    return {r.key: r for r in records}
