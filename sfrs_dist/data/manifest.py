"""The manifest of a shard set: splits, groups, shards, checksums and the per-sample index.

A shard set is a folder of WebDataset tar shards plus ``manifest.json`` and, from schema
version 2, a folder of per-sample columns ``manifest_columns-<digest>/`` (``.npy`` files, one
per field and group, memory-mapped on demand; the digest covers their contents, so the
manifest's own hash changes with them). Shards are grouped
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

Schema 1 held the per-sample columns and the index in the JSON document itself: about 180
bytes per image, a minute and 1.7 GB per rank to parse at 1.6 M images. It still loads (the
same API; ``launch/build_shards.py --upgrade DIR`` rewrites it as schema 2); ``save`` always
writes schema 2.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from collections.abc import Mapping as MappingABC
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from sfrs_dist.data.columns import (
    ArrayColumn,
    CodeColumn,
    ColumnFileError,
    JsonColumn,
    NpyFile,
    OptIntColumn,
    StrColumn,
    encode_codes,
    encode_json,
    encode_opt_ints,
    encode_strings,
)
from sfrs_dist.data.records import DATABASE, QUERY, Record, RecordTable, SplitData

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
COLUMNS_PREFIX = "manifest_columns-"
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
    """Ordered samples of one role of one split (columns of ``Record`` fields).

    Lists when built or read from a schema-1 manifest; read-only memory-mapped columns
    (``sfrs_dist.data.columns``) when read from a schema-2 one. Either way a sequence per field.
    """

    keys: Sequence[str] = field(default_factory=list)
    index: Sequence[int] = field(default_factory=list)
    relpath: Sequence[str] = field(default_factory=list)
    utm: Sequence[Sequence[float]] = field(default_factory=list)
    condition: Sequence[Optional[str]] = field(default_factory=list)
    timestamp: Sequence[Optional[int]] = field(default_factory=list)
    extra: Sequence[Optional[Dict[str, str]]] = field(default_factory=list)
    """Per-sample ``Record.extra``; empty when no sample has any (formats without extra fields)."""

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "RoleEntry":
        out = cls(keys=[], index=[], relpath=[], utm=[], condition=[], timestamp=[], extra=[])
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
        return self.extra[i] if len(self.extra) else None

    def records(self, name: str, split: str, role: str) -> RecordTable:
        """The role's records, each built when read (``RecordTable``)."""
        return RecordTable(name, split, role, self.keys, self.index, self.relpath, self.utm, self.condition,
                           self.timestamp, self.extra if len(self.extra) else None)


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


class ColumnIndex(MappingABC):
    """``key -> IndexEntry`` over the columns of a schema-2 manifest, without a dict.

    A key is found by binary search in a sorted fixed-width key array (``keys_sorted.npy``,
    with ``keys_rows.npy`` giving each one's row in the concatenation of the groups in
    ``order``); its byte range and digest are that row's entries in the group's ``offset``,
    ``size`` and ``digest`` columns, its shard the group's shard holding the row.
    """

    def __init__(self, order: Sequence[str], keys: Mapping[str, Sequence[str]], offset: Mapping[str, NpyFile],
                 size: Mapping[str, NpyFile], digest: Mapping[str, NpyFile], shards: Mapping[str, List[str]],
                 firsts: Mapping[str, List[int]], sorted_keys: NpyFile, sorted_rows: NpyFile):
        self.order = list(order)
        self.keys, self.offset, self.size, self.digest = dict(keys), dict(offset), dict(size), dict(digest)
        self.shards = {g: list(v) for g, v in shards.items()}
        self.firsts = {g: np.asarray(v, dtype=np.int64) for g, v in firsts.items()}
        self.starts = np.cumsum([0] + [len(self.keys[g]) for g in self.order]).astype(np.int64)
        self.sorted_keys, self.sorted_rows = sorted_keys, sorted_rows

    def locate(self, key: str) -> Optional[Tuple[str, int]]:
        """(group, row in the group) of ``key``, or None."""
        table = self.sorted_keys.array
        kb = key.encode("utf-8")
        if not len(table) or len(kb) > table.dtype.itemsize or kb.endswith(b"\0"):
            return None
        j = int(np.searchsorted(table, kb))
        if j >= len(table) or table[j] != kb:
            return None
        row = int(self.sorted_rows.array[j])
        gi = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.order[gi], row - int(self.starts[gi])

    def entry(self, group: str, pos: int) -> IndexEntry:
        shard = self.shards[group][int(np.searchsorted(self.firsts[group], pos, side="right")) - 1]
        return IndexEntry(shard, int(self.offset[group].array[pos]), int(self.size[group].array[pos]),
                          f"{int(self.digest[group].array[pos]):08x}")

    def digests(self, group: str, start: int, stop: int) -> List[str]:
        return [f"{d:08x}" for d in self.digest[group].array[start:stop].tolist()]

    def __getitem__(self, key: str) -> IndexEntry:
        where = self.locate(key) if isinstance(key, str) else None
        if where is None:
            raise KeyError(key)
        return self.entry(*where)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.locate(key) is not None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __iter__(self) -> Iterator[str]:
        for g in self.order:
            yield from self.keys[g]

    def items(self) -> Iterator[Tuple[str, IndexEntry]]:  # type: ignore[override]
        for g in self.order:
            for pos, key in enumerate(self.keys[g]):
                yield key, self.entry(g, pos)


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``. ``root`` is the shard folder (not serialised)."""

    source: Dict[str, Any]
    options: Dict[str, Any]
    splits: Dict[str, SplitEntry]
    groups: Dict[str, GroupEntry]
    shards: Dict[str, ShardEntry]
    index: Mapping[str, IndexEntry]
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    root: Optional[Path] = field(default=None, compare=False)

    # ---------------------------------------------------------------- queries
    def shard_keys(self, shard: str) -> List[str]:
        """Keys of a shard, in tar order."""
        s = self._shard(shard)
        g = self.groups[s.group]
        keys = self.splits[g.split].role(g.role).keys
        return keys[s.first : s.first + s.num_samples]

    def shard_digests(self, shard: str) -> List[str]:
        """Sample digests of a shard, in tar order (``shard_keys`` order)."""
        if isinstance(self.index, ColumnIndex):
            s = self._shard(shard)
            return self.index.digests(s.group, s.first, s.first + s.num_samples)
        return [self.index[k].digest for k in self.shard_keys(shard)]

    def _shard(self, shard: str) -> ShardEntry:
        try:
            return self.shards[shard]
        except KeyError:
            raise ManifestError(f"shard {shard!r} is not in the manifest") from None

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
        where = self._locate(key)
        if where is None:
            raise KeyError(f"key {key!r} not in manifest {self._where()}")
        group, i = where
        g = self.groups[group]
        s = self.splits[g.split]
        col = s.role(g.role)
        return Record(
            key=key, name=s.name, split=s.split, role=g.role, index=int(col.index[i]),
            relpath=col.relpath[i], file="", utm=tuple(col.utm[i]), condition=col.condition[i],
            timestamp=col.timestamp[i], extra=col.extra_at(i),
        ).meta()

    def _locate(self, key: str) -> Optional[Tuple[str, int]]:
        """(group, row in the group) of a key, or None."""
        if isinstance(self.index, ColumnIndex):
            return self.index.locate(key)
        e = self.index.get(key)
        if e is None:
            return None
        s = self.shards[e.shard]
        return s.group, s.first + self.shard_keys(e.shard).index(key)

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
    def save(self, out_dir: Path) -> Path:
        """Write schema 2: the columns folder, then ``<out_dir>/manifest.json`` naming it.

        Every file goes through a temporary name and ``os.replace``; the JSON document, written
        last, is what makes the new columns current, so an interrupted save leaves the previous
        manifest whole. Column folders no manifest names any more are removed afterwards.
        """
        out_dir = Path(out_dir)
        arrays, head = self._encode()
        files = {name: _npy_bytes(arr) for name, arr in arrays.items()}
        del arrays
        h = hashlib.sha256()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        folder = f"{COLUMNS_PREFIX}{h.hexdigest()[:16]}"
        final = out_dir / folder
        if not final.is_dir():
            tmp = out_dir / f".{folder}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in files.items():
                with open(tmp / f"{name}.npy", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        head["columns"]["folder"] = folder
        path = out_dir / MANIFEST_NAME
        tmp_json = out_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
        with open(tmp_json, "w", encoding="utf-8") as f:
            f.write(json.dumps(head, separators=(",", ":"), ensure_ascii=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_json, path)
        for old in out_dir.glob(f"{COLUMNS_PREFIX}*"):
            if old.name != folder and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        self.root = out_dir
        return path

    def _encode(self) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """The column arrays (file stem -> array) and the JSON head of schema 2."""
        arrays: Dict[str, np.ndarray] = {}
        splits: Dict[str, Any] = {}
        order: List[str] = []
        all_keys: List[str] = []
        for sid, s in self.splits.items():
            entry = {k: v for k, v in _fields(s).items() if k not in ("database", "queries")}
            for role, fname in ROLE_FIELDS.items():
                col = s.role(role)
                g = group_name(s.name, s.split, role)
                n = len(col.keys)
                keys = list(col.keys)
                arrays[f"{g}.keys.blob"], arrays[f"{g}.keys.offsets"] = encode_strings(keys)
                arrays[f"{g}.index"] = np.asarray(list(col.index), dtype=np.int64).reshape(n)
                arrays[f"{g}.relpath.blob"], arrays[f"{g}.relpath.offsets"] = encode_strings(list(col.relpath))
                arrays[f"{g}.utm"] = np.asarray(list(col.utm), dtype=np.float64).reshape(n, 2)
                arrays[f"{g}.condition"], vocab = encode_codes(list(col.condition))
                arrays[f"{g}.timestamp"] = encode_opt_ints(list(col.timestamp))
                has_extra = bool(len(col.extra))
                if has_extra:
                    arrays[f"{g}.extra.blob"], arrays[f"{g}.extra.offsets"] = encode_json(list(col.extra))
                offs, sizes, digs = self._index_columns(g, keys)
                arrays[f"{g}.offset"], arrays[f"{g}.size"], arrays[f"{g}.digest"] = offs, sizes, digs
                entry[fname] = {"rows": n, "condition_vocab": vocab, "extra": has_extra}
                order.append(g)
                all_keys.extend(keys)
            splits[sid] = entry
        encoded = [k.encode("utf-8") for k in all_keys]
        if any(k.endswith(b"\0") for k in encoded):
            raise ManifestError("a sample key ends with a NUL byte")
        width = max((len(k) for k in encoded), default=1)
        table = np.asarray(encoded, dtype=f"S{width}") if encoded else np.zeros(0, dtype="S1")
        rows = np.argsort(table, kind="stable").astype(np.int64)
        table = table[rows]
        dup = np.nonzero(table[1:] == table[:-1])[0]
        if dup.size:
            raise ManifestError(f"sample key {table[dup[0]].decode()!r} appears twice in the shard set")
        arrays["keys_sorted"], arrays["keys_rows"] = table, rows
        head = {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "options": self.options,
            "splits": splits,
            "groups": {k: asdict(v) for k, v in self.groups.items()},
            "shards": {k: asdict(v) for k, v in self.shards.items()},
            "skipped": self.skipped,
            "columns": {"folder": None, "order": order},
        }
        return arrays, head

    def _index_columns(self, group: str, keys: List[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset, size, digest) per row of a group, checked against the group's shards."""
        offs = np.zeros(len(keys), dtype=np.int64)
        sizes = np.zeros(len(keys), dtype=np.int64)
        digs = np.zeros(len(keys), dtype=np.uint32)
        g = self.groups.get(group)
        shard_of = []
        for name in g.shards if g is not None else []:
            shard_of.extend([name] * self.shards[name].num_samples)
        if len(shard_of) != len(keys):
            raise ManifestError(f"group {group}: shards hold {len(shard_of)} samples, the split {len(keys)}")
        for i, k in enumerate(keys):
            e = self.index.get(k)
            if e is None:
                raise ManifestError(f"sample {k!r} of group {group} has no index entry")
            if e.shard != shard_of[i]:
                raise ManifestError(f"sample {k!r}: index says shard {e.shard}, its position {shard_of[i]}")
            offs[i], sizes[i], digs[i] = e.offset, e.size, int(e.digest, 16)
        return offs, sizes, digs

    @classmethod
    def load(cls, shard_dir: Path) -> "Manifest":
        """Read ``<shard_dir>/manifest.json`` (schema 1 or 2); errors name the file."""
        shard_dir = Path(shard_dir)
        path = shard_dir / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (build the shard set with launch/build_shards.py)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        m = cls.from_json(d, where=str(path), root=shard_dir)
        m.root = shard_dir
        if m.schema_version == 1:
            log.info("%s: schema-1 manifest (per-sample fields in the JSON, %d samples); "
                     "`python launch/build_shards.py --upgrade %s` rewrites it as schema 2, "
                     "faster to open and smaller in memory", path, len(m.index), shard_dir)
        return m

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str = "(in memory)", root: Optional[Path] = None) -> "Manifest":
        """A manifest from its JSON document; schema 2 maps its columns from ``root``."""
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise SchemaVersionError(
                f"{where}: manifest schema version {version!r}, this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (writes {SCHEMA_VERSION}); rebuild the shards "
                f"with launch/build_shards.py"
            )
        try:
            if version == 1:
                splits = {}
                for k, v in d["splits"].items():
                    v = dict(v)
                    v["database"] = RoleEntry(**v["database"])
                    v["queries"] = RoleEntry(**v["queries"])
                    splits[k] = SplitEntry(**v)
                index: Mapping[str, IndexEntry] = {k: IndexEntry(*v) for k, v in d["index"].items()}
            else:
                if root is None:
                    raise ManifestError(f"{where}: a schema-2 manifest needs its folder to read its columns")
                splits, index = _map_columns(d, Path(root), where)
            return cls(
                source=d["source"], options=d["options"], splits=splits,
                groups={k: GroupEntry(**v) for k, v in d["groups"].items()},
                shards={k: ShardEntry(**v) for k, v in d["shards"].items()},
                index=index,
                skipped=list(d.get("skipped", [])),
                schema_version=version,
            )
        except ColumnFileError as e:
            raise ManifestError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def _fields(obj: Any) -> Dict[str, Any]:
    """A dataclass's fields as a dict, values as they are (``asdict`` would copy the columns)."""
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _map_columns(d: Dict[str, Any], root: Path, where: str) -> Tuple[Dict[str, SplitEntry], ColumnIndex]:
    """The splits and the index of a schema-2 document, their columns mapped from ``root``."""
    folder = root / d["columns"]["folder"]
    if not folder.is_dir():
        raise ManifestError(f"{where}: its columns folder {folder} is missing (rebuild the shard set)")
    order = list(d["columns"]["order"])
    groups = d["groups"]
    rows: Dict[str, int] = {}
    splits: Dict[str, SplitEntry] = {}
    keys: Dict[str, StrColumn] = {}
    offset: Dict[str, NpyFile] = {}
    size: Dict[str, NpyFile] = {}
    digest: Dict[str, NpyFile] = {}

    files: List[NpyFile] = []

    def npy(stem: str, n: Optional[int]) -> NpyFile:
        files.append(NpyFile(folder / f"{stem}.npy", n))
        return files[-1]

    def strings(stem: str, n: int) -> StrColumn:
        return StrColumn(npy(f"{stem}.blob", None), npy(f"{stem}.offsets", n + 1))

    for sid, v in d["splits"].items():
        v = dict(v)
        for role, fname in ROLE_FIELDS.items():
            spec = v[fname]
            g = group_name(v["name"], v["split"], role)
            n = rows[g] = int(spec["rows"])
            keys[g] = strings(f"{g}.keys", n)
            offset[g], size[g], digest[g] = npy(f"{g}.offset", n), npy(f"{g}.size", n), npy(f"{g}.digest", n)
            v[fname] = RoleEntry(
                keys=keys[g], index=ArrayColumn(npy(f"{g}.index", n)), relpath=strings(f"{g}.relpath", n),
                utm=ArrayColumn(npy(f"{g}.utm", n)), condition=CodeColumn(npy(f"{g}.condition", n),
                                                                          spec["condition_vocab"]),
                timestamp=OptIntColumn(npy(f"{g}.timestamp", n)),
                extra=JsonColumn(strings(f"{g}.extra", n)) if spec["extra"] else [],
            )
        splits[sid] = SplitEntry(**v)
    if sorted(order) != sorted(rows):
        raise ManifestError(f"{where}: columns order {order} does not match the splits' groups {sorted(rows)}")
    total = sum(rows.values())
    index = ColumnIndex(
        order, keys, offset, size, digest,
        shards={g: groups[g]["shards"] for g in order},
        firsts={g: [d["shards"][s]["first"] for s in groups[g]["shards"]] for g in order},
        sorted_keys=npy("keys_sorted", total), sorted_rows=npy("keys_rows", total),
    )
    for f in files:  # map every column now: a missing or short file is an error at load, naming the file
        f.open()
    return splits, index
