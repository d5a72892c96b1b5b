"""Reader of Mapillary Street-Level Sequences in its own layout (``--dataset msls``).

::

    <root>/train_val/<city>/{query,database}/
        postprocessed.csv    key, easting, northing (UTM), night, view_direction, ...
        raw.csv              key, lon, lat, ca, captured_at, pano
        subtask_index.csv    (not needed here)
        images/<key>.jpg

Splits, as MSLS's own loader and the papers use them:

- ``msls_train``: the 22 training cities, training positives within 10 m, positives 25 m;
- ``msls_val``: the validation cities (cph, sf), positives within 25 m; only the 740 queries of
  the official evaluation are kept (``msls_val_queries.txt``) unless ``official_queries=False``.

Panoramas (``pano`` true in ``raw.csv``) are left out, as MSLS's loader does. Cities lie in
different UTM zones, so the UTM positions of a split's cities could overlap: city ``i`` of a
split (in the order of ``TRAIN_CITIES`` / ``VAL_CITIES``) is moved ``i * CITY_OFFSET_M`` east in
the records (its true easting is ``utm[0] - i * CITY_OFFSET_M``; ``extra['city']`` names it), so
positives never cross cities. Conditions: ``day`` / ``night`` from ``night``, with
``_sideways`` appended for sideways views (``view_direction``), so the recall table has a row
per combination.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .datasets import DatasetFormatError
from .records import DATABASE, QUERY, Record, SplitData, make_key
from .vpr_layout import keep_official_msls_queries

log = logging.getLogger(__name__)

TRAIN_CITIES = ("trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto",
                "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa",
                "phoenix", "goa", "amman", "nairobi", "manila")
VAL_CITIES = ("cph", "sf")
CITY_OFFSET_M = 1.0e7
ROLE_FOLDERS = {DATABASE: "database", QUERY: "query"}


def _read_csv(path: Path, needed: Sequence[str]) -> List[Dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetFormatError(f"{path}: column(s) {missing} missing (columns: {reader.fieldnames})")
        return list(reader)


def _flag(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def read_city_role(folder: Path, city: str, offset: float) -> List[dict]:
    """The non-panorama images of one city's ``query`` or ``database`` folder, in postprocessed.csv order."""
    post = _read_csv(folder / "postprocessed.csv", ("key", "easting", "northing"))
    raw = {r["key"]: r for r in _read_csv(folder / "raw.csv", ("key", "pano"))}
    out = []
    for row in post:
        key = row["key"]
        if key not in raw:
            raise DatasetFormatError(f"{folder / 'raw.csv'}: no row for key {key} of postprocessed.csv")
        if _flag(raw[key]["pano"]):
            continue
        try:
            east, north = float(row["easting"]) + offset, float(row["northing"])
        except ValueError:
            raise DatasetFormatError(f"{folder / 'postprocessed.csv'}: key {key}: easting/northing "
                                     f"{row['easting']!r}, {row['northing']!r} are not numbers") from None
        night = _flag(row.get("night", "False"))
        view = (row.get("view_direction") or "").strip().lower()
        cond = ("night" if night else "day") + ("_sideways" if view.startswith("side") else "")
        extra = {"city": city, "pano_id": key}
        if view:
            extra["view_direction"] = view
        if raw[key].get("captured_at"):
            extra["timestamp"] = raw[key]["captured_at"]
        out.append({"relpath": f"{city}/{folder.name}/images/{key}.jpg", "utm": (east, north),
                    "condition": cond, "extra": extra})
    return out


def load_msls(root: Path, splits: Optional[Sequence[str]] = None, cities: Optional[Sequence[str]] = None,
              pos_dist_thr: float = 25.0, train_pos_dist_thr: float = 10.0, official_queries: bool = True,
              check_files: bool = True) -> List[SplitData]:
    """``msls_train`` and/or ``msls_val`` from ``<root>/train_val/<city>/`` (module docstring).

    Args:
        cities: restrict to these cities (default: every city of the split present on disk).
        official_queries: ``msls_val`` keeps only the official evaluation's 740 queries.
        check_files: every image named in the csv files must exist (the first missing is named).
    """
    base = Path(root) / "train_val"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no train_val/ folder (expected <root>/train_val/<city>/query|database)")
    unknown = sorted(set(cities or ()) - set(TRAIN_CITIES) - set(VAL_CITIES))
    if unknown:
        raise ValueError(f"unknown MSLS cities {unknown}; training cities: {list(TRAIN_CITIES)}, "
                         f"validation cities: {list(VAL_CITIES)}")
    out = []
    for split in splits or ("train", "val"):
        if split not in ("train", "val"):
            raise ValueError(f"MSLS split must be train or val, got {split!r} (the test cities have no positions)")
        order = TRAIN_CITIES if split == "train" else VAL_CITIES
        present = [c for c in order if (base / c).is_dir() and (cities is None or c in cities)]
        if not present:
            if splits:
                raise FileNotFoundError(f"{base}: none of the {split} cities {list(order)} found")
            continue
        records = {DATABASE: [], QUERY: []}
        for i, city in enumerate(order):
            if city not in present:
                continue
            for role, sub in ROLE_FOLDERS.items():
                for row in read_city_role(base / city / sub, city, i * CITY_OFFSET_M):
                    n = len(records[role])
                    records[role].append(Record(
                        key=make_key("msls", split, role, n), name="msls", split=split, role=role, index=n,
                        relpath=row["relpath"], file=str(base / row["relpath"]), utm=row["utm"],
                        condition=row["condition"], extra=row["extra"]))
        queries = records[QUERY]
        if split == "val" and official_queries:
            queries = keep_official_msls_queries(queries, str(base))
        s = SplitData(name="msls", split=split, database=records[DATABASE], queries=queries,
                      pos_dist_thr=float(pos_dist_thr), nontriv_pos_dist_sq_thr=float(train_pos_dist_thr) ** 2)
        if check_files:
            missing = [r.file for r in s.database + s.queries if not Path(r.file).is_file()]
            if missing:
                raise FileNotFoundError(f"{missing[0]}: image listed in postprocessed.csv not found "
                                        f"({len(missing)} missing)")
        log.info("msls_%s (%s): %d database images, %d queries", split, ", ".join(present), len(s.database),
                 len(s.queries))
        out.append(s)
    if not out:
        raise FileNotFoundError(f"{base}: no MSLS city found")
    return out
