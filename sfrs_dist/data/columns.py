"""Read-only columns over ``.npy`` files, memory-mapped and read on demand.

A schema-2 manifest stores its per-sample fields as numpy arrays, one ``.npy`` file each, so
that a rank opening a 1.6 M-image manifest maps files instead of parsing and holding a
300 MB JSON document. The classes here present those arrays as Python sequences of the
values the manifest's API has always returned (``str``, ``int``, ``Optional[str]``, ...):

- ``NpyFile``: one ``.npy`` file, mapped on first use; pickles as its path (a DataLoader
  worker maps the file again instead of receiving a copy of the array);
- ``StrColumn``: strings as one UTF-8 byte blob plus ``n + 1`` offsets;
- ``CodeColumn``: optional strings from a small vocabulary (codes, -1 for None);
- ``OptIntColumn``: optional integers (``int64``, ``OPT_INT_NONE`` for None);
- ``ArrayColumn``: integers or coordinate pairs of a numeric array;
- ``JsonColumn``: optional JSON objects (a ``StrColumn``, empty string for None).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

OPT_INT_NONE = np.iinfo(np.int64).min
"""Stored for a missing optional integer (a time stamp the format does not have)."""


class ColumnFileError(ValueError):
    """A column file that is missing, unreadable or of the wrong shape."""


class NpyFile:
    """One ``.npy`` file, memory-mapped read-only when first used."""

    def __init__(self, path: Path, rows: Optional[int] = None):
        self.path = Path(path)
        self.rows = rows
        self._array: Optional[np.ndarray] = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = load_npy(self.path, self.rows)
        return self._array

    def open(self) -> "NpyFile":
        """Map the file now (errors name it)."""
        _ = self.array
        return self

    def __getstate__(self) -> Dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "_array": None}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


def load_npy(path: Path, rows: Optional[int] = None) -> np.ndarray:
    """Map ``path`` read-only (small or empty arrays are read); ``rows`` checks the length."""
    try:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array cannot be mapped
            arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ColumnFileError(f"{path}: column file missing (rebuild the shard set)") from None
    except (OSError, ValueError) as e:
        raise ColumnFileError(f"{path}: unreadable column file ({e})") from None
    if rows is not None and arr.shape[0] != rows:
        raise ColumnFileError(f"{path}: {arr.shape[0]} rows, the manifest says {rows}")
    return arr


class Column(Sequence):
    """A read-only sequence; slices come back as lists, equality is element-wise."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> Any:
        raise NotImplementedError

    def _range(self, start: int, stop: int) -> List[Any]:
        return [self._get(i) for i in range(start, stop)]

    def __getitem__(self, i: Union[int, slice]) -> Any:
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return [self._get(j) for j in range(start, stop, step)]
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range ({n} rows)")
        return self._get(i)

    def __iter__(self) -> Iterator[Any]:
        n = len(self)
        for start in range(0, n, 65536):
            yield from self._range(start, min(start + 65536, n))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows)"


class StrColumn(Column):
    """Strings stored as a UTF-8 blob (``uint8``) and ``n + 1`` ``int64`` offsets."""

    def __init__(self, blob: NpyFile, offsets: NpyFile):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return self.offsets.array.shape[0] - 1

    def _get(self, i: int) -> str:
        o = self.offsets.array
        return self.blob.array[int(o[i]) : int(o[i + 1])].tobytes().decode("utf-8")

    def _range(self, start: int, stop: int) -> List[str]:
        o = np.asarray(self.offsets.array[start : stop + 1], dtype=np.int64)
        if len(o) < 2:
            return []
        raw = self.blob.array[int(o[0]) : int(o[-1])].tobytes()
        o = (o - o[0]).tolist()
        return [raw[a:b].decode("utf-8") for a, b in zip(o[:-1], o[1:])]


class CodeColumn(Column):
    """Optional strings from a vocabulary: ``int16`` codes, -1 for None."""

    def __init__(self, codes: NpyFile, vocab: List[str]):
        self.codes, self.vocab = codes, list(vocab)

    def __len__(self) -> int:
        return self.codes.array.shape[0]

    def _get(self, i: int) -> Optional[str]:
        c = int(self.codes.array[i])
        return None if c < 0 else self.vocab[c]

    def _range(self, start: int, stop: int) -> List[Optional[str]]:
        return [None if c < 0 else self.vocab[c] for c in self.codes.array[start:stop].tolist()]


class OptIntColumn(Column):
    """Optional integers: ``int64``, ``OPT_INT_NONE`` for None."""

    def __init__(self, values: NpyFile):
        self.values = values

    def __len__(self) -> int:
        return self.values.array.shape[0]

    def _get(self, i: int) -> Optional[int]:
        v = int(self.values.array[i])
        return None if v == OPT_INT_NONE else v

    def _range(self, start: int, stop: int) -> List[Optional[int]]:
        return [None if v == OPT_INT_NONE else v for v in self.values.array[start:stop].tolist()]


class ArrayColumn(Column):
    """Rows of a numeric array as Python values: ints of an ``int64`` vector, ``[east, north]``
    lists of an ``(n, 2)`` float64 array; ``np.asarray`` gives the array itself."""

    def __init__(self, values: NpyFile):
        self.values = values

    def __len__(self) -> int:
        return self.values.array.shape[0]

    def _get(self, i: int) -> Any:
        return self.values.array[i].tolist()

    def _range(self, start: int, stop: int) -> List[Any]:
        return self.values.array[start:stop].tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.values.array, dtype=dtype)


class JsonColumn(Column):
    """Optional JSON objects over a ``StrColumn`` (empty string for None)."""

    def __init__(self, text: StrColumn):
        self.text = text

    def __len__(self) -> int:
        return len(self.text)

    def _get(self, i: int) -> Optional[Dict[str, Any]]:
        t = self.text._get(i)
        return json.loads(t) if t else None

    def _range(self, start: int, stop: int) -> List[Optional[Dict[str, Any]]]:
        return [json.loads(t) if t else None for t in self.text._range(start, stop)]


# ----------------------------------------------------------------------------- encoding
def encode_strings(values: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """(blob, offsets) of a sequence of strings."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def encode_codes(values: Sequence) -> Tuple[np.ndarray, List[str]]:
    """(int16 codes, vocabulary) of optional strings."""
    vocab = sorted({v for v in values if v is not None})
    if len(vocab) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(vocab)} distinct values are too many for a coded column")
    code = {v: i for i, v in enumerate(vocab)}
    return np.asarray([-1 if v is None else code[v] for v in values], dtype=np.int16), vocab


def encode_opt_ints(values: Sequence) -> np.ndarray:
    out = np.asarray([OPT_INT_NONE if v is None else int(v) for v in values], dtype=np.int64)
    if np.any(out[np.asarray([v is not None for v in values], dtype=bool)] == OPT_INT_NONE):
        raise ValueError(f"an integer equal to the missing-value marker {OPT_INT_NONE}")
    return out


def encode_json(values: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    return encode_strings(["" if v is None else json.dumps(v, sort_keys=True, separators=(",", ":"))
                           for v in values])
