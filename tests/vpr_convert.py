"""Test helper: the synthetic city written in the @UTM-named layout of VPR-datasets-downloader.

``to_vpr_layout(raw, out)`` reads the synthetic raw set (``.mat`` layouts, ``launch/make_synthetic.py``)
and writes ``out/pitts30k/images/{train,val,test}/{database,queries}/`` and
``out/tokyo247/images/test/{database,queries}/`` with the same image bytes under names
``@east@north@zone@letter@@@pano_id@tile_num@@@@@@note@.jpg`` (UTM written exactly, as
``repr(float)``). Pittsburgh names carry the place as pano_id and ``pitchP_yawY`` as note, as
the downloader writes them; Tokyo cutouts carry their panorama folder as pano_id (PNG bytes
under a .jpg name, as the raw Tokyo keeps PNGs), Tokyo queries their original stem as note
(``000003_night``), where the light condition is read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from sfrs_dist.data.datasets import load_dataset
from sfrs_dist.data.records import DATABASE, Record

ZONES = {"pitts30k": ("17", "T"), "tokyo247": ("54", "S")}


def vpr_name(utm: Tuple[float, float], zone: Tuple[str, str], pano_id: str = "", tile_num: str = "",
             note: str = "", ext: str = ".jpg") -> str:
    fields = [repr(float(utm[0])), repr(float(utm[1])), zone[0], zone[1], "", "", pano_id, tile_num,
              "", "", "", "", "", note]
    return "@" + "@".join(fields) + "@" + ext


def _name(r: Record) -> str:
    stem = Path(r.relpath).stem
    zone = ZONES[r.name]
    if r.name == "pitts30k":  # 000/000546_pitch1_yaw6.jpg
        place, view = stem.split("_", 1)
        return vpr_name(r.utm, zone, pano_id=place, note=view)
    if r.role == DATABASE:  # 00003/00003_yaw07.jpg
        pano, tile = stem.split("_", 1)
        return vpr_name(r.utm, zone, pano_id=pano, tile_num=tile.replace("yaw", ""))
    return vpr_name(r.utm, zone, note=stem)


def to_vpr_layout(raw: Path, out: Path) -> Dict[str, Dict[str, List[str]]]:
    """Write the layout; returns ``{split id: {"db"|"q": [relpath in .mat order]}}``."""
    written: Dict[str, Dict[str, List[str]]] = {}
    for s in load_dataset("synthetic", Path(raw)):
        base = Path(out) / s.name / "images" / s.split
        for role, folder, records in (("db", "database", s.database), ("q", "queries", s.queries)):
            names = []
            for r in records:
                name = _name(r)
                dst = base / folder / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    raise AssertionError(f"two images named {name}")
                shutil.copyfile(r.file, dst)
                names.append(name)
            written.setdefault(f"{s.name}_{s.split}", {})[role] = names
    return written
