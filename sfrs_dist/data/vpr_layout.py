"""Reader of the ``@``-named layout that VPR-datasets-downloader writes (``--dataset utm``).

The layout most place-recognition codebases read (the deep visual geo-localization benchmark,
CosPlace, EigenPlaces, the VPR methods evaluation tool)::

    <root>/images/{train,val,test}/{database,queries}/<name>

where every image name carries its labels between ``@`` signs::

    @UTM_east@UTM_north@UTM_zone@UTM_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

Fields may be empty; only the UTM pair is required. Each split folder present becomes one
``SplitData`` named ``<name>_<split>`` (``name``: the root folder's name unless given), so a
downloader-formatted Pitts30k gives ``pitts30k_train`` / ``pitts30k_val`` / ``pitts30k_test``
as the ``.mat`` reader does. The non-empty fields other than the UTM pair are kept in
``Record.extra`` (``pano_id`` groups Tokyo 24/7's cutouts for spatial NMS; ``timestamp``,
``heading``, ``note``...). The light condition is read from the name's tokens (``night`` in
MSLS's note ``night_forward_cph``, ``..._night`` in a Tokyo query name).

Protocols applied here (docs/data.md):

- positives: within ``pos_dist_thr`` (25 m) of a query; training positives within
  ``train_pos_dist_thr`` (10 m), as the ``.mat`` formats state them;
- ``msls_val``: only the 740 queries of the official Mapillary SLS evaluation are kept
  (``msls_val_queries.txt``: cph 498, sf 242, matched on the ``pano_id`` field, where the
  downloader writes the Mapillary key); ``official_msls=False`` keeps every query.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .datasets import DatasetFormatError, condition_from_name
from .records import DATABASE, QUERY, Record, SplitData, make_key

log = logging.getLogger(__name__)

#: The fields of a name, in order (``@`` separated).
FIELDS = ("utm_east", "utm_north", "utm_zone", "utm_letter", "lat", "lon", "pano_id", "tile_num",
          "heading", "pitch", "roll", "height", "timestamp", "note")
#: Role folders of a split, as the layout names them.
ROLE_FOLDERS = {DATABASE: "database", QUERY: "queries"}
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MSLS_QUERY_LIST = "msls_val_queries.txt"


def parse_name(name: str) -> Dict[str, str]:
    """The fields of one ``@``-named image file (base name or path); empty fields left out.

    Raises ``DatasetFormatError`` naming the file when the name does not start with ``@`` or
    its UTM pair is not two numbers.
    """
    base = os.path.basename(name)
    stem = os.path.splitext(base)[0]
    parts = stem.split("@")
    if not stem.startswith("@") or len(parts) < 3:
        raise DatasetFormatError(f"{name}: not an @UTM_east@UTM_north@...@ image name")
    values = parts[1:]
    if values and values[-1] == "":
        values = values[:-1]
    # fields past the 14 of the layout (some formatting scripts add their own) are kept by position
    keys = list(FIELDS) + [f"field{i + 1}" for i in range(len(FIELDS), len(values))]
    out = {k: v for k, v in zip(keys, values) if v != ""}
    for k in ("utm_east", "utm_north"):
        try:
            out[k] = str(float(out[k]))
        except (KeyError, ValueError):
            raise DatasetFormatError(f"{name}: field {k} is {out.get(k, '')!r}, not a number") from None
    return out


def name_utm(fields: Dict[str, str]) -> Tuple[float, float]:
    return float(fields["utm_east"]), float(fields["utm_north"])


def msls_official_queries() -> Dict[str, str]:
    """Mapillary key -> city of the official MSLS validation queries (740: cph 498, sf 242)."""
    text = resources.files("sfrs_dist.data").joinpath(MSLS_QUERY_LIST).read_text(encoding="utf-8")
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            city, key = line.split("/")
            out[key] = city
    return out


def list_images(folder: Path) -> List[str]:
    """Image paths under ``folder`` (recursively), relative to it, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if f.lower().endswith(IMAGE_SUFFIXES):
                out.append(f if rel == "." else os.path.join(rel, f))
    return sorted(out)


def records_from_names(name: str, split: str, role: str, relpaths: Sequence[str],
                       folder: Optional[Path] = None) -> List[Record]:
    """Records of one role from its ``@``-named files (relative paths, kept in the given order)."""
    out = []
    for i, rel in enumerate(relpaths):
        fields = parse_name(str(folder / rel) if folder is not None else rel)
        extra = {k: v for k, v in fields.items() if k not in ("utm_east", "utm_north")}
        out.append(Record(
            key=make_key(name, split, role, i), name=name, split=split, role=role, index=i, relpath=rel,
            file=str(folder / rel) if folder is not None else "", utm=name_utm(fields),
            condition=condition_from_name(os.path.basename(rel).replace("@", "_")), extra=extra or None,
        ))
    return out


def keep_official_msls_queries(queries: List[Record], where: str) -> List[Record]:
    """The queries of the official MSLS validation list, re-keyed in order; error if none match."""
    official = msls_official_queries()
    kept = [r for r in queries if (r.extra or {}).get("pano_id") in official]
    if not kept:
        raise DatasetFormatError(
            f"{where}: none of the {len(queries)} queries is one of the {len(official)} official MSLS validation "
            "queries (matched on the pano_id field, where VPR-datasets-downloader writes the Mapillary key); "
            "build with --all-queries to keep them all")
    missing = len(official) - len({r.extra["pano_id"] for r in kept})
    if missing:
        log.warning("%s: %d of the %d official MSLS validation queries are not on disk", where, missing, len(official))
    return [Record(key=make_key(r.name, r.split, QUERY, i), name=r.name, split=r.split, role=QUERY, index=i,
                   relpath=r.relpath, file=r.file, utm=r.utm, condition=r.condition, extra=r.extra)
            for i, r in enumerate(kept)]


def split_from_names(name: str, split: str, db_names: Sequence[str], q_names: Sequence[str],
                     pos_dist_thr: float = 25.0, train_pos_dist_thr: float = 10.0,
                     db_folder: Optional[Path] = None, q_folder: Optional[Path] = None,
                     official_msls: bool = True) -> SplitData:
    """A ``SplitData`` from the ``@``-named files of its database and queries."""
    queries = records_from_names(name, split, QUERY, q_names, q_folder)
    if official_msls and name == "msls" and split == "val":
        queries = keep_official_msls_queries(queries, str(q_folder or f"{name}_{split} queries"))
        log.info("msls_val: the %d queries of the official evaluation kept (of %d)", len(queries), len(q_names))
    return SplitData(
        name=name, split=split,
        database=records_from_names(name, split, DATABASE, db_names, db_folder),
        queries=queries,
        pos_dist_thr=float(pos_dist_thr),
        nontriv_pos_dist_sq_thr=float(train_pos_dist_thr) ** 2,
    )


def load_vpr_layout(root: Path, name: Optional[str] = None, splits: Optional[Sequence[str]] = None,
                    pos_dist_thr: float = 25.0, train_pos_dist_thr: float = 10.0,
                    official_msls: bool = True) -> List[SplitData]:
    """Every split folder under ``<root>/images`` (or the ``splits`` named) as ``SplitData``.

    Args:
        root: the dataset folder holding ``images/``.
        name: dataset name of the split ids (default: ``root``'s folder name).
        splits: split folders to read (default: every one of train/val/test present).
        pos_dist_thr: radius of potential positives in metres (25).
        train_pos_dist_thr: radius of training positives in metres (10).
        official_msls: for ``msls_val``, keep only the official evaluation's 740 queries.

    Raises:
        FileNotFoundError: no ``images/`` folder, no split folder, or a named split missing.
        DatasetFormatError: a role folder missing or empty, or a file name that does not parse
            (the message names the folder or the file).
    """
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no images/ folder (expected <root>/images/{{train,val,test}}/"
                                "{database,queries}/)")
    name = name or root.resolve().name
    if not name or any(c in name for c in "./@ "):
        raise ValueError(f"dataset name {name!r} cannot form split ids (no '.', '/', '@' or spaces; give --name)")
    wanted = list(splits) if splits else [s for s in SPLITS if (images / s).is_dir()]
    if not wanted:
        raise FileNotFoundError(f"{images}: no split folder (train, val or test)")
    out = []
    for split in wanted:
        folder = images / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: split folder not found")
        names = {}
        for role, sub in ROLE_FOLDERS.items():
            rf = folder / sub
            if not rf.is_dir():
                raise DatasetFormatError(f"{rf}: {sub}/ folder missing in split {split}")
            names[role] = list_images(rf)
            if not names[role]:
                raise DatasetFormatError(f"{rf}: no images (.jpg, .jpeg, .png)")
        s = split_from_names(name, split, names[DATABASE], names[QUERY], pos_dist_thr, train_pos_dist_thr,
                             folder / ROLE_FOLDERS[DATABASE], folder / ROLE_FOLDERS[QUERY], official_msls)
        log.info("%s_%s: %d database images, %d queries", name, split, len(s.database), len(s.queries))
        out.append(s)
    return out
