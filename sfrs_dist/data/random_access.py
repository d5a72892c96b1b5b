"""Random access to a shard set: read one sample by key through the manifest index.

The index gives the shard, the byte offset of the sample's first tar header and the byte size
of its members; a read is one ``os.pread`` of that range followed by parsing the tar headers
in it. Open file descriptors are kept in a small LRU cache. ``os.pread`` does not move a
shared file position; a lock spans each read so threads may share a reader. The cache belongs
to the process that opened it (a forked or unpickled reader opens its own descriptors).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from PIL import Image

from sfrs_dist.data.manifest import IMAGE_EXTS, Manifest, ShardReadError, sample_digest

BLOCK = tarfile.BLOCKSIZE


def parse_members(buf: bytes, where: str) -> Dict[str, bytes]:
    """Members (extension -> bytes) of the tar headers + data in ``buf``; ``where`` names it."""
    members: Dict[str, bytes] = {}
    pos = 0
    while pos + BLOCK <= len(buf):
        try:
            ti = tarfile.TarInfo.frombuf(buf[pos : pos + BLOCK], tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardReadError(f"{where}: bad tar header at +{pos} ({e})") from None
        start = pos + BLOCK
        end = start + ti.size
        if end > len(buf):
            raise ShardReadError(f"{where}: member {ti.name} runs past the indexed range")
        ext = ti.name.split("/")[-1].split(".", 1)[-1].lower()
        members[ext] = buf[start:end]
        pos = start + -(-ti.size // BLOCK) * BLOCK
    return members


class ShardReader:
    """Read samples of a shard set by key.

    Args:
        shard_dir: folder holding ``manifest.json`` and the shards.
        manifest: an already loaded manifest of that folder (optional).
        max_open: number of shard file descriptors kept open (LRU).
        verify: check each sample against its manifest digest.
    """

    def __init__(self, shard_dir: Union[str, Path], manifest: Optional[Manifest] = None,
                 max_open: int = 8, verify: bool = True):
        self.shard_dir = Path(shard_dir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.shard_dir)
        if self.manifest.root is None:
            self.manifest.root = self.shard_dir
        self.max_open = max(1, int(max_open))
        self.verify = verify
        self._lock = threading.Lock()
        self._fds: "OrderedDict[str, int]" = OrderedDict()
        self._pid = os.getpid()

    # ------------------------------------------------------------------ handles
    def _fd(self, shard: str) -> int:
        """Descriptor of a shard (call with the lock held)."""
        if self._pid != os.getpid():  # inherited through fork: not ours to use
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.manifest.shard_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardReadError(f"shard {path}: cannot open ({e.strerror})") from None
        self._fds[shard] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _pread(self, shard: str, size: int, offset: int) -> bytes:
        # the lock spans the read so no other thread can evict (close) the descriptor meanwhile
        with self._lock:
            return os.pread(self._fd(shard), size, offset)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds = OrderedDict()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_fds"] = OrderedDict()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self.manifest.index)

    def __contains__(self, key: str) -> bool:
        return key in self.manifest.index

    def keys(self) -> Iterator[str]:
        return iter(self.manifest.index)

    def read_members(self, key: str) -> Dict[str, bytes]:
        """Raw member bytes of a sample, extension -> bytes (e.g. ``jpg``, ``json``)."""
        entry = self.manifest.index.get(key)
        if entry is None:
            raise KeyError(f"key {key!r} not in {self.shard_dir / 'manifest.json'}")
        where = f"shard {self.manifest.shard_path(entry.shard)}: sample {key}"
        buf = self._pread(entry.shard, entry.size, entry.offset)
        if len(buf) != entry.size:
            raise ShardReadError(f"{where}: read {len(buf)} of {entry.size} bytes (truncated shard)")
        members = parse_members(buf, where)
        if self.verify and sample_digest(members) != entry.digest:
            raise ShardReadError(f"{where}: contents do not match the manifest digest (tampered or corrupt)")
        return members

    def get(self, key: str, decode: bool = True) -> Tuple[Union[Image.Image, bytes], Dict[str, Any]]:
        """(image, meta) of a sample: an RGB PIL image, or the stored bytes with ``decode=False``."""
        members = self.read_members(key)
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None or "json" not in members:
            raise ShardReadError(f"sample {key}: members {sorted(members)} lack an image or json")
        meta = json.loads(members["json"])
        if not decode:
            return members[ext], meta
        with Image.open(io.BytesIO(members[ext])) as im:
            return im.convert("RGB"), meta

    __getitem__ = get
