"""Readers for the raw dataset formats: Pittsburgh, Tokyo 24/7 and Tokyo Time Machine.

Each reader turns a ``dbStruct`` .mat file plus its image folders into a ``SplitData``.
The .mat layout is checked field by field; a file that does not match raises
``DatasetFormatError`` naming the file and the field. Default layouts (DESIGN.md s.4):

- Pittsburgh: ``<root>/datasets/pitts{30k,250k}_{split}.mat``, database images under
  ``<root>/``, queries under ``<root>/queries_real/``.
- Tokyo 24/7: ``<root>/tokyo247.mat``, database under ``<root>/images/`` (named ``.jpg``
  in the .mat, stored as ``.png``), queries under ``<root>/query/``.
- Tokyo Time Machine: ``<root>/tokyoTM_{split}.mat``, images under ``<root>/images/``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import scipy.io

from .records import DATABASE, QUERY, Record, SplitData, make_key

log = logging.getLogger(__name__)

PITTS_FIELDS = (
    "whichSet", "dbImageFns", "utmDb", "qImageFns", "utmQ", "numImages", "numQueries",
    "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr",
)
TOKYO_TM_FIELDS = (
    "whichSet", "dbImageFns", "utmDb", "dbTimeStamp", "qImageFns", "utmQ", "qTimeStamp",
    "numImages", "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr",
)
CONDITIONS = ("day", "sunset", "night")
DATASETS = ("pitts", "tokyo", "tokyoTM", "synthetic")


class DatasetFormatError(ValueError):
    """A raw dataset file does not have the expected layout."""


class MissingImagesError(FileNotFoundError):
    """Images named in a .mat file are not on disk."""


@dataclass(frozen=True)
class DbStruct:
    """The parsed fields of a ``dbStruct`` (any of the three formats)."""

    which_set: str
    db_files: List[str]
    utm_db: np.ndarray
    q_files: List[str]
    utm_q: np.ndarray
    pos_dist_thr: float
    nontriv_pos_dist_sq_thr: float
    db_timestamps: Optional[np.ndarray] = None
    q_timestamps: Optional[np.ndarray] = None


def _names(mat_path: Path, field: str, value) -> List[str]:
    try:
        return [str(np.asarray(f).ravel()[0]) if np.asarray(f).size else "" for f in np.asarray(value).ravel()]
    except Exception as exc:  # pragma: no cover - defensive: exotic .mat content
        raise DatasetFormatError(f"{mat_path}: field '{field}' is not a list of file names ({exc})") from exc


def _utm(mat_path: Path, field: str, value, count: int) -> np.ndarray:
    """UTM positions as an (N, 2) array from the .mat's 2xN layout (Nx2 accepted too)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2 and arr.shape == (2, count):
        return np.ascontiguousarray(arr.T)
    if arr.ndim == 2 and arr.shape == (count, 2):
        return np.ascontiguousarray(arr)
    if count == 0 and arr.size == 0:
        return np.zeros((0, 2))
    raise DatasetFormatError(
        f"{mat_path}: field '{field}' must hold 2x{count} UTM coordinates (one per image), got shape {arr.shape}"
    )


def _scalar(mat_path: Path, field: str, value) -> float:
    arr = np.asarray(value, dtype=np.float64).ravel()
    if arr.size != 1:
        raise DatasetFormatError(f"{mat_path}: field '{field}' must be a scalar, got {arr.size} values")
    return float(arr[0])


def read_dbstruct(mat_path: Path, fields: Sequence[str] = PITTS_FIELDS) -> DbStruct:
    """Parse a ``dbStruct`` .mat file whose fields are ``fields`` in that order."""
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise FileNotFoundError(f"dataset file not found: {mat_path}")
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except Exception as exc:
        raise DatasetFormatError(f"{mat_path}: not a readable MATLAB file ({exc})") from exc
    if "dbStruct" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{mat_path}: no variable 'dbStruct' (found {keys})")
    struct = mat["dbStruct"]
    names = struct.dtype.names
    if names is not None and tuple(names[: len(fields)]) != tuple(fields):
        for i, want in enumerate(fields):
            got = names[i] if i < len(names) else "<missing>"
            if got != want:
                raise DatasetFormatError(
                    f"{mat_path}: dbStruct field {i} should be '{want}', found '{got}' (fields: {list(names)})"
                )
    values = struct.item()
    if len(values) < len(fields):
        raise DatasetFormatError(
            f"{mat_path}: dbStruct has {len(values)} fields, expected {len(fields)}: missing '{fields[len(values)]}'"
        )
    v = dict(zip(fields, values))
    db_files = _names(mat_path, "dbImageFns", v["dbImageFns"])
    q_files = _names(mat_path, "qImageFns", v["qImageFns"])
    num_images = int(_scalar(mat_path, "numImages", v["numImages"]))
    num_queries = int(_scalar(mat_path, "numQueries", v["numQueries"]))
    if num_images != len(db_files):
        raise DatasetFormatError(f"{mat_path}: field 'numImages' is {num_images} but 'dbImageFns' has {len(db_files)}")
    if num_queries != len(q_files):
        raise DatasetFormatError(f"{mat_path}: field 'numQueries' is {num_queries} but 'qImageFns' has {len(q_files)}")
    which = np.asarray(v["whichSet"]).ravel()
    ts_db = ts_q = None
    if "dbTimeStamp" in v:
        ts_db = np.asarray(v["dbTimeStamp"], dtype=np.int64).ravel()
        ts_q = np.asarray(v["qTimeStamp"], dtype=np.int64).ravel()
        if ts_db.size != num_images:
            raise DatasetFormatError(f"{mat_path}: field 'dbTimeStamp' has {ts_db.size} values, expected {num_images}")
        if ts_q.size != num_queries:
            raise DatasetFormatError(f"{mat_path}: field 'qTimeStamp' has {ts_q.size} values, expected {num_queries}")
    return DbStruct(
        which_set=str(which[0]) if which.size else "",
        db_files=db_files,
        utm_db=_utm(mat_path, "utmDb", v["utmDb"], num_images),
        q_files=q_files,
        utm_q=_utm(mat_path, "utmQ", v["utmQ"], num_queries),
        pos_dist_thr=_scalar(mat_path, "posDistThr", v["posDistThr"]),
        nontriv_pos_dist_sq_thr=_scalar(mat_path, "nonTrivPosDistSqThr", v["nonTrivPosDistSqThr"]),
        db_timestamps=ts_db,
        q_timestamps=ts_q,
    )


def condition_from_name(relpath: str) -> Optional[str]:
    """Light condition from a file name token (``..._night.jpg``), if the name has one."""
    tokens = re.split(r"[_\-./]", Path(relpath).stem.lower())
    for c in CONDITIONS:
        if c in tokens:
            return c
    return None


def _resolve(folder: Path, relpath: str, png_fallback: bool) -> Path:
    path = folder / relpath
    if png_fallback and not path.exists() and path.suffix.lower() == ".jpg":
        png = path.with_suffix(".png")
        if png.exists():
            return png
    return path


def _records(
    s: DbStruct, name: str, split: str, role: str, folder: Path, png_fallback: bool
) -> List[Record]:
    files, utm, ts = (
        (s.db_files, s.utm_db, s.db_timestamps) if role == DATABASE else (s.q_files, s.utm_q, s.q_timestamps)
    )
    out = []
    for i, rel in enumerate(files):
        out.append(
            Record(
                key=make_key(name, split, role, i),
                name=name,
                split=split,
                role=role,
                index=i,
                relpath=rel,
                file=str(_resolve(folder, rel, png_fallback)),
                utm=(float(utm[i, 0]), float(utm[i, 1])),
                condition=condition_from_name(rel),
                timestamp=None if ts is None else int(ts[i]),
            )
        )
    return out


def _split_data(
    s: DbStruct, mat_path: Path, name: str, split: str, db_folder: Path, q_folder: Path, png_fallback: bool,
    check_files: bool, exclude_same_timestamp: bool = False,
) -> SplitData:
    """A ``SplitData`` from a parsed .mat and its image folders (images checked if asked)."""
    out = SplitData(
        name=name,
        split=split,
        database=_records(s, name, split, DATABASE, db_folder, png_fallback),
        queries=_records(s, name, split, QUERY, q_folder, png_fallback),
        pos_dist_thr=s.pos_dist_thr,
        nontriv_pos_dist_sq_thr=s.nontriv_pos_dist_sq_thr,
        exclude_same_timestamp=exclude_same_timestamp,
    )
    if check_files:
        check_images(out, mat_path)
    return out


def check_images(split: SplitData, mat_path: Path, limit: int = 10) -> None:
    """Raise ``MissingImagesError`` naming the missing images of ``split``."""
    missing = [r.file for r in split.database + split.queries if not Path(r.file).is_file()]
    if missing:
        shown = "\n  ".join(missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise MissingImagesError(
            f"{len(missing)} image(s) named in {mat_path} are missing:\n  {shown}{more}"
        )


def load_pitts(
    root: Path,
    split: str,
    scale: str = "30k",
    mat_dir: Optional[Path] = None,
    db_dir: Optional[Path] = None,
    query_dir: Optional[Path] = None,
    check_files: bool = True,
) -> SplitData:
    """Pittsburgh ``pitts{scale}_{split}.mat`` with its image folders."""
    root = Path(root)
    mat_path = Path(mat_dir or root / "datasets") / f"pitts{scale}_{split}.mat"
    s = read_dbstruct(mat_path, PITTS_FIELDS)
    return _split_data(s, mat_path, f"pitts{scale}", split, Path(db_dir or root),
                       Path(query_dir or root / "queries_real"), False, check_files)


def load_tokyo247(
    root: Path,
    mat_path: Optional[Path] = None,
    db_dir: Optional[Path] = None,
    query_dir: Optional[Path] = None,
    check_files: bool = True,
) -> SplitData:
    """Tokyo 24/7 (``tokyo247.mat``); accepts the .jpg-in-.mat / .png-on-disk quirk."""
    root = Path(root)
    mat_path = Path(mat_path or root / "tokyo247.mat")
    s = read_dbstruct(mat_path, PITTS_FIELDS)
    return _split_data(s, mat_path, "tokyo247", "test", Path(db_dir or root / "images"),
                       Path(query_dir or root / "query"), True, check_files)


def load_tokyo_tm(
    root: Path,
    split: str,
    mat_dir: Optional[Path] = None,
    image_dir: Optional[Path] = None,
    check_files: bool = True,
) -> SplitData:
    """Tokyo Time Machine ``tokyoTM_{split}.mat``: positives must come from another time stamp."""
    root = Path(root)
    mat_path = Path(mat_dir or root) / f"tokyoTM_{split}.mat"
    s = read_dbstruct(mat_path, TOKYO_TM_FIELDS)
    folder = Path(image_dir or root / "images")
    return _split_data(s, mat_path, "tokyoTM", split, folder, folder, True, check_files,
                       exclude_same_timestamp=True)


def panorama_ids(split: SplitData) -> np.ndarray:
    """Integer panorama id per database image, in order of first appearance.

    Where every database image names its panorama (the ``pano_id`` field of the ``@``-named
    layout) that name groups the cutouts; otherwise cutouts of one panorama are those sharing
    their UTM position (the ``.mat`` layout).
    """
    ids: Dict[object, int] = {}
    panos = [(r.extra or {}).get("pano_id") for r in split.database]
    if panos and all(panos):
        return np.asarray([ids.setdefault(p, len(ids)) for p in panos], dtype=np.int64)
    return np.asarray([ids.setdefault(tuple(r.utm), len(ids)) for r in split.database], dtype=np.int64)


def load_dataset(
    dataset: str,
    root: Path,
    scale: str = "30k",
    splits: Optional[Sequence[str]] = None,
    check_files: bool = True,
) -> List[SplitData]:
    """All available splits of a raw dataset.

    Args:
        dataset: ``pitts``, ``tokyo`` (Tokyo 24/7 plus Tokyo Time Machine splits found beside
            it), ``tokyoTM`` or ``synthetic`` (a folder made by ``launch/make_synthetic.py``
            holding ``pitts/`` and ``tokyo247/``).
        root: dataset root folder.
        scale: Pittsburgh scale, ``30k`` or ``250k``.
        splits: Pittsburgh / Tokyo TM splits to read (default: every split whose .mat exists).
        check_files: check that every image named in the .mat files exists.
    """
    root = Path(root)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if dataset == "synthetic":
        return load_dataset("pitts", root / "pitts", "30k", splits, check_files) + load_dataset(
            "tokyo", root / "tokyo247", scale, None, check_files
        )
    if dataset == "pitts":
        wanted = list(splits or ("train", "val", "test"))
        found = [s for s in wanted if (root / "datasets" / f"pitts{scale}_{s}.mat").is_file()]
        if not found or (splits and len(found) != len(wanted)):
            missing = [str(root / "datasets" / f"pitts{scale}_{s}.mat") for s in wanted if s not in found]
            raise FileNotFoundError("Pittsburgh .mat file(s) not found: " + ", ".join(missing))
        return [load_pitts(root, s, scale, check_files=check_files) for s in found]
    out: List[SplitData] = []
    if dataset == "tokyo":
        if not (root / "tokyo247.mat").is_file():
            raise FileNotFoundError(f"Tokyo 24/7 file not found: {root / 'tokyo247.mat'}")
        out.append(load_tokyo247(root, check_files=check_files))
    tm_splits = [s for s in (splits or ("train", "val")) if (root / f"tokyoTM_{s}.mat").is_file()]
    if dataset == "tokyoTM" and not tm_splits:
        raise FileNotFoundError(f"no tokyoTM_{{train,val}}.mat under {root}")
    out.extend(load_tokyo_tm(root, s, check_files=check_files) for s in tm_splits)
    return out
