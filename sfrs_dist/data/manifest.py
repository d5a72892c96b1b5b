"""The manifest of a shard set: splits, groups, shards, checksums and the per-sample index.

A shard set is a folder of WebDataset tar shards plus ``manifest.json``. Shards are grouped
per (dataset name, split, role), e.g. ``pitts30k_train_db-000003.tar`` is the fourth shard of
the pitts30k train database. The manifest holds everything a reader needs without opening
the raw dataset or scanning a tar:

- ``splits``: per split, the thresholds and, per role, the ordered keys (.mat order, skipped
  samples left out) with their UTM positions, .mat indices, relative paths, light conditions
  and time stamps;
- ``groups``: per group, its split, role, ordered shard list and sample count;
- ``shards``: per shard, its group, position of its first sample in the group's key list,
  sample count, byte size and sha256;
- ``index``: per key, ``[shard, offset, size, digest]``: the byte range of the sample's tar
  members and a CRC-32 of their contents (``sample_digest``);
- ``skipped``: samples left out with ``--skip-bad`` (key, file, reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from sfrs_dist.data.records import DATABASE, QUERY, Record, SplitData

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLE_FIELDS = {DATABASE: "database", QUERY: "queries"}
IMAGE_EXTS = ("jpg", "png")


class ManifestError(ValueError):
    """A manifest that cannot be read or does not match its shard set."""


class SchemaVersionError(ManifestError):
    """A manifest written with another schema version."""


class ShardReadError(RuntimeError):
    """A shard that does not match its manifest (truncated, tampered, missing)."""


def split_id(name: str, split: str) -> str:
    """Identifier of a split inside a manifest, e.g. ``pitts30k_train``."""
    return f"{name}_{split}"


def group_name(name: str, split: str, role: str) -> str:
    """Identifier of a shard group, e.g. ``pitts30k_train_db``."""
    return f"{name}_{split}_{role}"


def shard_name(group: str, number: int) -> str:
    """File name of a shard: ``<group>-<number:06d>.tar``."""
    return f"{group}-{number:06d}.tar"


def sample_digest(members: Mapping[str, bytes]) -> str:
    """CRC-32 of a sample's member names, sizes and contents (extension -> bytes), as 8 hex digits.

    A fast corruption check run on every sample a reader yields; the per-shard sha256 is the
    strong check (``verify_shards``).
    """
    crc = 0
    for ext in sorted(members):
        data = members[ext]
        crc = zlib.crc32(ext.encode("utf-8") + len(data).to_bytes(8, "little"), crc)
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass
class RoleEntry:
    """Ordered samples of one role of one split (columns of ``Record`` fields)."""

    keys: List[str] = field(default_factory=list)
    index: List[int] = field(default_factory=list)
    relpath: List[str] = field(default_factory=list)
    utm: List[List[float]] = field(default_factory=list)
    condition: List[Optional[str]] = field(default_factory=list)
    timestamp: List[Optional[int]] = field(default_factory=list)
    extra: List[Optional[Dict[str, str]]] = field(default_factory=list)
    """Per-sample ``Record.extra``; empty when no sample has any (formats without extra fields)."""

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "RoleEntry":
        out = cls()
        for r in records:
            out.keys.append(r.key)
            out.index.append(int(r.index))
            out.relpath.append(r.relpath)
            out.utm.append([float(r.utm[0]), float(r.utm[1])])
            out.condition.append(r.condition)
            out.timestamp.append(None if r.timestamp is None else int(r.timestamp))
            out.extra.append(None if r.extra is None else dict(r.extra))
        if all(e is None for e in out.extra):
            out.extra = []
        return out

    def extra_at(self, i: int) -> Optional[Dict[str, str]]:
        """``extra`` of sample ``i`` (None where the format has none)."""
        return self.extra[i] if self.extra else None

    def records(self, name: str, split: str, role: str) -> List[Record]:
        extra = self.extra or [None] * len(self.keys)
        return [
            Record(
                key=k, name=name, split=split, role=role, index=i, relpath=p, file="",
                utm=(float(u[0]), float(u[1])), condition=c, timestamp=t, extra=e,
            )
            for k, i, p, u, c, t, e in zip(
                self.keys, self.index, self.relpath, self.utm, self.condition, self.timestamp, extra
            )
        ]


@dataclass
class SplitEntry:
    """One split: thresholds plus database and query columns."""

    name: str
    split: str
    pos_dist_thr: float
    nontriv_pos_dist_sq_thr: float
    exclude_same_timestamp: bool
    database: RoleEntry
    queries: RoleEntry

    def role(self, role: str) -> RoleEntry:
        return self.database if role == DATABASE else self.queries


@dataclass
class GroupEntry:
    """A shard group: all samples of one role of one split."""

    split: str
    role: str
    shards: List[str]
    num_samples: int


@dataclass
class ShardEntry:
    """One tar shard of a group."""

    group: str
    first: int
    num_samples: int
    size: int
    sha256: str


@dataclass
class IndexEntry:
    """Where a sample lives: byte range of its tar members (headers included) and digest."""

    shard: str
    offset: int
    size: int
    digest: str


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``. ``root`` is the shard folder (not serialised)."""

    source: Dict[str, Any]
    options: Dict[str, Any]
    splits: Dict[str, SplitEntry]
    groups: Dict[str, GroupEntry]
    shards: Dict[str, ShardEntry]
    index: Dict[str, IndexEntry]
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    root: Optional[Path] = field(default=None, compare=False)

    # ---------------------------------------------------------------- queries
    def shard_keys(self, shard: str) -> List[str]:
        """Keys of a shard, in tar order."""
        try:
            s = self.shards[shard]
        except KeyError:
            raise ManifestError(f"shard {shard!r} is not in the manifest") from None
        g = self.groups[s.group]
        keys = self.splits[g.split].role(g.role).keys
        return keys[s.first : s.first + s.num_samples]

    def group_keys(self, group: str) -> List[str]:
        g = self._group(group)
        return list(self.splits[g.split].role(g.role).keys)

    def group_shards(self, groups: Union[str, Sequence[str]]) -> List[str]:
        """Shard file names of the given group(s), group by group, in order."""
        if isinstance(groups, str):
            groups = [groups]
        out: List[str] = []
        for g in groups:
            out.extend(self._group(g).shards)
        return out

    def shard_path(self, shard: str) -> Path:
        if self.root is None:
            raise ManifestError("manifest has no root folder (load it with Manifest.load)")
        return self.root / shard

    def split_data(self, sid: str) -> SplitData:
        """The split as ``SplitData`` (records without raw file paths)."""
        try:
            s = self.splits[sid]
        except KeyError:
            raise ManifestError(f"split {sid!r} not in manifest; have {sorted(self.splits)}") from None
        return SplitData(
            name=s.name, split=s.split,
            database=s.database.records(s.name, s.split, DATABASE),
            queries=s.queries.records(s.name, s.split, QUERY),
            pos_dist_thr=s.pos_dist_thr,
            nontriv_pos_dist_sq_thr=s.nontriv_pos_dist_sq_thr,
            exclude_same_timestamp=s.exclude_same_timestamp,
        )

    def meta(self, key: str) -> Dict[str, Any]:
        """The JSON metadata stored with a sample, rebuilt from the manifest columns."""
        e = self.index.get(key)
        if e is None:
            raise KeyError(f"key {key!r} not in manifest {self._where()}")
        g = self.groups[self.shards[e.shard].group]
        s = self.splits[g.split]
        col = s.role(g.role)
        i = self.shards[e.shard].first + self.shard_keys(e.shard).index(key)
        return Record(
            key=key, name=s.name, split=s.split, role=g.role, index=col.index[i],
            relpath=col.relpath[i], file="", utm=tuple(col.utm[i]), condition=col.condition[i],
            timestamp=col.timestamp[i], extra=col.extra_at(i),
        ).meta()

    def _group(self, group: str) -> GroupEntry:
        try:
            return self.groups[group]
        except KeyError:
            raise ManifestError(
                f"group {group!r} not in manifest {self._where()}; have {sorted(self.groups)}"
            ) from None

    def _where(self) -> str:
        return str(self.root / MANIFEST_NAME) if self.root is not None else "(in memory)"

    # ----------------------------------------------------------- (de)serialise
    def to_json(self) -> Dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "options": self.options,
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "groups": {k: asdict(v) for k, v in self.groups.items()},
            "shards": {k: asdict(v) for k, v in self.shards.items()},
            "index": {k: [v.shard, v.offset, v.size, v.digest] for k, v in self.index.items()},
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str = "(in memory)") -> "Manifest":
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where}: manifest schema version {version!r}, this code reads version "
                f"{SCHEMA_VERSION}; rebuild the shards with launch/build_shards.py"
            )
        try:
            splits = {}
            for k, v in d["splits"].items():
                v = dict(v)
                v["database"] = RoleEntry(**v["database"])
                v["queries"] = RoleEntry(**v["queries"])
                splits[k] = SplitEntry(**v)
            return cls(
                source=d["source"], options=d["options"], splits=splits,
                groups={k: GroupEntry(**v) for k, v in d["groups"].items()},
                shards={k: ShardEntry(**v) for k, v in d["shards"].items()},
                index={k: IndexEntry(*v) for k, v in d["index"].items()},
                skipped=list(d.get("skipped", [])),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=True) + "\n"

    def save(self, out_dir: Path) -> Path:
        """Write ``<out_dir>/manifest.json`` through a temporary file and ``os.replace``."""
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST_NAME
        tmp = out_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.root = out_dir
        return path

    @classmethod
    def load(cls, shard_dir: Path) -> "Manifest":
        """Read ``<shard_dir>/manifest.json``; errors name the file."""
        shard_dir = Path(shard_dir)
        path = shard_dir / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (build the shard set with launch/build_shards.py)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        m = cls.from_json(d, where=str(path))
        m.root = shard_dir
        return m
