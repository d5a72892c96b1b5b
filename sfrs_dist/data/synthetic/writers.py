"""The synthetic city: the dataset plan, parallel rendering and the .mat / image writers (``generate``)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
from PIL import Image

from .city import (
    _MAT_DESCRIPTION,
    CONDITIONS,
    NONTRIV_POS_DIST_SQ_THR,
    NUM_YAWS,
    PITTS_FIELDS,
    PITTS_STYLE,
    PITTS_UTM_ORIGIN,
    POS_DIST_THR,
    SPLITS,
    TOKYO_SPREAD,
    TOKYO_STYLE,
    TOKYO_UTM_ORIGIN,
    YAW_STEP_DEG,
    City,
    CityStyle,
    build_city,
)
from .layout import Place, _query_position, sample_light, sample_occluders, sample_places
from .render import (
    Camera,
    Light,
    render_view,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Dataset plan, parallel rendering, writers
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderJob:
    """One image to render: which city, the camera, light, occluder seed and output file."""

    city: str
    relpath: str
    camera: Camera
    light: Light
    occluder_seed: Optional[int] = None
    image_format: str = "JPEG"


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and options of a synthetic dataset.

    Attributes:
        pitts_places: Pittsburgh database places (12 views each) over the three splits, >= 20.
        pitts_query_positions: Pittsburgh query positions over the three splits.
        query_views: yaw views rendered per Pittsburgh query position (1..12).
        split_fractions: share of places per split (train, val, test), west to east.
        pitts_query_conditions: probabilities of day/sunset/night for Pittsburgh queries.
        val_query_conditions: the same for the validation split's queries (None: as the others);
            a harder mix keeps validation recall off its ceiling so it can rank networks.
        tokyo_panoramas: Tokyo 24/7 database panoramas (12 cutouts each).
        tokyo_query_positions: Tokyo query positions, each rendered by day, sunset and night.
        jpeg_quality: JPEG quality.
        write_pitts250k: also write ``pitts250k_{split}.mat`` naming the same images.
    """

    pitts_places: int = 24
    pitts_query_positions: int = 9
    query_views: int = 6
    split_fractions: Tuple[float, float, float] = (0.45, 0.2, 0.35)
    pitts_query_conditions: Tuple[float, float, float] = (0.85, 0.15, 0.0)
    val_query_conditions: Optional[Tuple[float, float, float]] = None
    tokyo_panoramas: int = 8
    tokyo_query_positions: int = 5
    jpeg_quality: int = 90
    write_pitts250k: bool = True

    def __post_init__(self) -> None:
        if self.pitts_places < 20:
            raise ValueError(f"pitts_places must be >= 20 (three disjoint regions), got {self.pitts_places}")
        if self.pitts_query_positions < 3:
            raise ValueError(f"pitts_query_positions must be >= 3, got {self.pitts_query_positions}")
        if not 1 <= self.query_views <= NUM_YAWS:
            raise ValueError(f"query_views must be in 1..{NUM_YAWS}, got {self.query_views}")
        if self.tokyo_panoramas < 2 or self.tokyo_query_positions < 1:
            raise ValueError(
                f"tokyo_panoramas must be >= 2 and tokyo_query_positions >= 1, got {self.tokyo_panoramas}, {self.tokyo_query_positions}"
            )
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions must be three positive numbers, got {self.split_fractions}")
        for name in ("pitts_query_conditions", "val_query_conditions"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or min(value) < 0 or sum(value) <= 0):
                raise ValueError(f"{name} must be three non-negative weights, got {value}")


PRESETS: Dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(),
    "demo": SyntheticConfig(
        pitts_places=150,
        pitts_query_positions=80,
        query_views=12,
        tokyo_panoramas=80,
        tokyo_query_positions=105,
        # validation queries mostly at sunset: with the test mix (85% day) validation Recall@5 sat
        # at 97% from generation 0 on and could not rank the networks
        val_query_conditions=(0.4, 0.6, 0.0),
    ),
}


def resolve_config(preset: str = "tiny", places: Optional[int] = None, **overrides) -> SyntheticConfig:
    """Preset plus overrides; ``places`` rescales every count of the preset proportionally."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    if places is not None:
        r = places / cfg.pitts_places
        cfg = replace(
            cfg,
            pitts_places=int(places),
            pitts_query_positions=max(3, round(cfg.pitts_query_positions * r)),
            tokyo_panoramas=max(2, round(cfg.tokyo_panoramas * r)),
            tokyo_query_positions=max(1, round(cfg.tokyo_query_positions * r)),
        )
    unknown = set(overrides) - set(SyntheticConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown synthetic options {sorted(unknown)}; expected {sorted(SyntheticConfig.__dataclass_fields__)}"
        )
    return replace(cfg, **overrides)


def _city_for(rng: np.random.Generator, n_places: int, style: CityStyle) -> Tuple[City, List[Place]]:
    """Smallest city (grown eastwards) holding ``n_places`` places; returns the first ones west to east."""
    edge_places = (0.5 * (style.block_min + style.block_max) + 2 * style.street_half) / 10.0
    nby = 3 if n_places <= 60 else max(3, int(math.sqrt(n_places / (2 * edge_places))) + 2)
    per_col = (nby - 1) * edge_places + (nby - 2) * edge_places
    nbx = max(3, int(math.ceil(n_places / per_col)) + 2)
    state = rng.bit_generator.state
    while True:
        rng.bit_generator.state = state
        city = build_city(rng, nbx, nby, style)
        places = sample_places(rng, city)
        if len(places) >= n_places:
            return city, places[:n_places]
        nbx += 1


def _snap_x(x: np.ndarray, street_xs: np.ndarray, margin: float) -> np.ndarray:
    """x, with positions within ``margin`` of a north-south street moved onto the street line,
    so that a whole street (with its lanes and corners) always falls into one region."""
    x = np.asarray(x, dtype=np.float64)
    lines = np.asarray(street_xs)
    k = np.clip(np.searchsorted(lines, x), 1, len(lines) - 1)
    nearest = np.where(np.abs(x - lines[k - 1]) < np.abs(x - lines[k]), lines[k - 1], lines[k])
    return np.where(np.abs(x - nearest) < margin, nearest, x)


def _split_cuts(sx: np.ndarray, fractions: Sequence[float]) -> Tuple[float, float]:
    """Two x cut lines splitting the (snapped) place positions ``sx`` into west / middle /
    east regions holding shares close to ``fractions``, each region non-empty."""
    uniq = np.unique(sx)
    if uniq.size < 3:
        raise ValueError(f"cannot split {len(sx)} places into three regions; use more places")
    cands = (uniq[1:] + uniq[:-1]) / 2.0
    below = np.array([(sx < c).mean() for c in cands])
    f1, f2 = fractions[0] / sum(fractions), (fractions[0] + fractions[1]) / sum(fractions)
    i1 = int(np.argmin(np.abs(below[:-1] - f1)))
    i2 = i1 + 1 + int(np.argmin(np.abs(below[i1 + 1 :] - f2)))
    return float(cands[i1]), float(cands[i2])


def _region(sx: float, cuts: Tuple[float, float]) -> int:
    return 0 if sx < cuts[0] else (1 if sx < cuts[1] else 2)


def _allocate(total: int, fractions: Sequence[float]) -> List[int]:
    """Integer counts proportional to ``fractions``, each at least 1, summing to ``total``."""
    raw = np.asarray(fractions, dtype=np.float64) / np.sum(fractions) * total
    counts = np.maximum(1, np.floor(raw)).astype(int)
    while counts.sum() < total:
        counts[np.argmax(raw - counts)] += 1
    while counts.sum() > total:
        counts[np.argmax(counts)] -= 1
    return [int(c) for c in counts]


def _pitts_name(index: int, yaw: int) -> str:
    return f"{index // 1000:03d}/{index:06d}_pitch1_yaw{yaw}.jpg"


def plan_pittsburgh(
    rng: np.random.Generator, cfg: SyntheticConfig
) -> Tuple[City, Dict[str, dict], List[RenderJob]]:
    """City, per-split .mat contents and render jobs of the Pittsburgh-style dataset."""
    city, places = _city_for(rng, cfg.pitts_places, PITTS_STYLE)
    px = np.array([p.x for p in places])
    margin = PITTS_STYLE.street_half
    cuts = _split_cuts(_snap_x(px, city.xs, margin), cfg.split_fractions)
    regions = np.array([_region(x, cuts) for x in _snap_x(px, city.xs, margin)])
    origin = np.asarray(PITTS_UTM_ORIGIN)
    splits: Dict[str, dict] = {
        s: {"db": [], "utm_db": [], "q": [], "utm_q": [], "q_conditions": []} for s in SPLITS
    }
    jobs: List[RenderJob] = []
    for pi, place in enumerate(places):
        split = splits[SPLITS[regions[pi]]]
        base = (
            place.street_angle
            + (math.pi if rng.random() < 0.5 else 0.0)
            + float(rng.normal(0, math.radians(2)))
        )
        for yaw in range(1, NUM_YAWS + 1):
            name = _pitts_name(pi, yaw)
            cam = Camera(place.x, place.y, base + math.radians(YAW_STEP_DEG) * (yaw - 1))
            jobs.append(RenderJob("pitts", name, cam, sample_light(rng, "day", query=False)))
            split["db"].append(name)
            split["utm_db"].append((place.x + origin[0], place.y + origin[1]))
    q_counts = _allocate(cfg.pitts_query_positions, cfg.split_fractions)
    def probabilities(weights) -> np.ndarray:
        return np.asarray(weights, dtype=np.float64) / np.sum(weights)

    qi = 0
    for si, split_name in enumerate(SPLITS):
        anchors = [p for p, r in zip(places, regions) if r == si]
        if not anchors:
            raise ValueError(f"split {split_name!r} received no places; use more places")
        split = splits[split_name]
        mix = cfg.val_query_conditions if split_name == "val" and cfg.val_query_conditions else cfg.pitts_query_conditions
        cond_p = probabilities(mix)
        for _ in range(q_counts[si]):
            for _attempt in range(100):
                anchor = anchors[int(rng.integers(len(anchors)))]
                qx, qy = _query_position(rng, city, anchor, PITTS_STYLE.road_half - 1.5)
                if _region(float(_snap_x(qx, city.xs, margin)), cuts) == si:
                    break
            else:
                qx, qy = anchor.x, anchor.y
            condition = CONDITIONS[int(rng.choice(3, p=cond_p))]
            base = float(rng.uniform(0, 2 * math.pi))
            yaws = np.sort(rng.choice(NUM_YAWS, size=cfg.query_views, replace=False)) + 1
            for yaw in yaws:
                name = _pitts_name(qi, int(yaw))
                heading = (
                    base + math.radians(YAW_STEP_DEG) * (yaw - 1) + float(rng.normal(0, math.radians(3)))
                )
                pitch = math.radians(6.0) + float(rng.normal(0, math.radians(2)))
                cam = Camera(qx, qy, heading, pitch, 2.5 + float(rng.uniform(-0.2, 0.2)))
                jobs.append(
                    RenderJob(
                        "pitts",
                        "queries_real/" + name,
                        cam,
                        sample_light(rng, condition, True),
                        int(rng.integers(2**31)),
                    )
                )
                split["q"].append(name)
                split["utm_q"].append((qx + origin[0], qy + origin[1]))
                split["q_conditions"].append(condition)
            qi += 1
    for split in splits.values():
        split["which"] = None
    return city, splits, jobs


def plan_tokyo(rng: np.random.Generator, cfg: SyntheticConfig) -> Tuple[City, dict, List[RenderJob]]:
    """City, .mat contents and render jobs of the Tokyo 24/7-style dataset.

    The panoramas are a random subset (one in ``TOKYO_SPREAD``) of the capture positions of
    a separate city, so that even small sets cover an area much larger than 25 m.
    """
    city, candidates = _city_for(rng, cfg.tokyo_panoramas * TOKYO_SPREAD, TOKYO_STYLE)
    keep = np.sort(rng.choice(len(candidates), size=cfg.tokyo_panoramas, replace=False))
    places = [candidates[i] for i in keep]
    origin = np.asarray(TOKYO_UTM_ORIGIN)
    out = {"db": [], "utm_db": [], "q": [], "utm_q": [], "q_conditions": []}
    jobs: List[RenderJob] = []
    for pi, place in enumerate(places):
        base = place.street_angle + float(rng.normal(0, math.radians(2)))
        for yaw in range(1, NUM_YAWS + 1):
            folder = f"{pi:05d}"
            stem = f"{folder}/{pi:05d}_yaw{yaw:02d}"
            cam = Camera(place.x, place.y, base + math.radians(YAW_STEP_DEG) * (yaw - 1))
            jobs.append(
                RenderJob(
                    "tokyo", f"images/{stem}.png", cam, sample_light(rng, "day", query=False), None, "PNG"
                )
            )
            out["db"].append(f"{stem}.jpg")
            out["utm_db"].append((place.x + origin[0], place.y + origin[1]))
    for qi in range(cfg.tokyo_query_positions):
        anchor = places[int(rng.integers(len(places)))]
        qx, qy = _query_position(rng, city, anchor, TOKYO_STYLE.road_half, max_offset=10.0)
        heading = (
            anchor.street_angle + float(rng.uniform(-1.2, 1.2)) + (math.pi if rng.random() < 0.5 else 0.0)
        )
        pitch = math.radians(float(rng.uniform(0.0, 10.0)))
        for condition in CONDITIONS:
            name = f"{qi:06d}_{condition}.jpg"
            cam = Camera(qx, qy, heading + float(rng.normal(0, math.radians(3))), pitch, 1.6)
            jobs.append(
                RenderJob(
                    "tokyo",
                    "query/" + name,
                    cam,
                    sample_light(rng, condition, True),
                    int(rng.integers(2**31)),
                )
            )
            out["q"].append(name)
            out["utm_q"].append((qx + origin[0], qy + origin[1]))
            out["q_conditions"].append(condition)
    return city, out, jobs


def render_job(city: City, job: RenderJob, size: Tuple[int, int]) -> np.ndarray:
    """Render the image of a job (pure function of the city and the job)."""
    occ = None
    if job.occluder_seed is not None:
        occ = sample_occluders(np.random.default_rng(job.occluder_seed), job.camera)
    return render_view(city, job.camera, job.light, size, occ)


def encode_image(img: np.ndarray, image_format: str, jpeg_quality: int = 90) -> bytes:
    """Encode an RGB uint8 image as JPEG or PNG bytes (deterministic)."""
    buf = io.BytesIO()
    if image_format == "JPEG":
        Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
    elif image_format == "PNG":
        Image.fromarray(img).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'JPEG' or 'PNG', got {image_format!r}")
    return buf.getvalue()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


_WORKER_STATE: dict = {}


def _init_worker(cities: Dict[str, City], roots: Dict[str, str], size: Tuple[int, int], quality: int) -> None:
    _WORKER_STATE.update(cities=cities, roots=roots, size=size, quality=quality)


def _run_job(job: RenderJob) -> str:
    st = _WORKER_STATE
    img = render_job(st["cities"][job.city], job, st["size"])
    path = Path(st["roots"][job.city]) / job.relpath
    atomic_write_bytes(path, encode_image(img, job.image_format, st["quality"]))
    return str(path)


def render_jobs(
    jobs: Sequence[RenderJob],
    cities: Dict[str, City],
    roots: Dict[str, Path],
    size: Tuple[int, int],
    quality: int = 90,
    workers: int = 1,
    progress: bool = False,
) -> None:
    """Render and write every job, in ``workers`` processes (the output does not depend on it)."""
    from ...progress import Progress

    str_roots = {k: str(v) for k, v in roots.items()}
    bar = Progress(len(jobs), "rendering", unit="img", enabled=progress)
    try:
        if workers <= 1:
            _init_worker(cities, str_roots, size, quality)
            for job in jobs:
                _run_job(job)
                bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(
                workers, initializer=_init_worker, initargs=(cities, str_roots, size, quality)
            ) as pool:
                for _ in pool.imap_unordered(_run_job, jobs, chunksize=16):
                    bar.update(1)
    finally:
        bar.close()


def _cell(names: Sequence[str]) -> np.ndarray:
    """N x 1 MATLAB cell array of strings."""
    arr = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        arr[i, 0] = n
    return arr


def write_dbstruct(
    path: Path,
    which_set: str,
    db_files: Sequence[str],
    utm_db: np.ndarray,
    q_files: Sequence[str],
    utm_q: np.ndarray,
    pos_dist_thr: float = POS_DIST_THR,
    nontriv_pos_dist_sq_thr: float = NONTRIV_POS_DIST_SQ_THR,
) -> None:
    """Write a Pittsburgh / Tokyo 24/7 ``dbStruct`` .mat file (fields in the real order).

    ``utm_db`` / ``utm_q`` are (N, 2) arrays; they are stored as 2 x N. The header text is
    fixed so that equal contents give byte-identical files.
    """
    utm_db = np.asarray(utm_db, dtype=np.float64).reshape(-1, 2)
    utm_q = np.asarray(utm_q, dtype=np.float64).reshape(-1, 2)
    if len(db_files) != len(utm_db) or len(q_files) != len(utm_q):
        raise ValueError(
            f"{path}: {len(db_files)} database names for {len(utm_db)} positions, {len(q_files)} query names for {len(utm_q)} positions"
        )
    values = (
        which_set,
        _cell(db_files),
        utm_db.T.copy(),
        _cell(q_files),
        utm_q.T.copy(),
        float(len(db_files)),
        float(len(q_files)),
        float(pos_dist_thr),
        float(pos_dist_thr) ** 2,
        float(nontriv_pos_dist_sq_thr),
    )
    struct = dict(zip(PITTS_FIELDS, values))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"dbStruct": struct}, format="5", do_compression=False)
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_DESCRIPTION.ljust(116, b" ")
    atomic_write_bytes(Path(path), bytes(data))


def read_dbstruct(path: Path) -> dict:
    """Read a ``dbStruct`` .mat by position (as public loaders do) into a plain dict."""
    m = scipy.io.loadmat(str(path))["dbStruct"].item()
    if len(m) < len(PITTS_FIELDS):
        raise ValueError(f"{path}: dbStruct has {len(m)} fields, expected {len(PITTS_FIELDS)}")
    return {
        "whichSet": str(np.asarray(m[0]).ravel()[0]),
        "dbImageFns": [f[0].item() for f in m[1]],
        "utmDb": np.asarray(m[2], dtype=np.float64).T.reshape(-1, 2),
        "qImageFns": [f[0].item() for f in m[3]],
        "utmQ": np.asarray(m[4], dtype=np.float64).T.reshape(-1, 2),
        "numImages": int(np.asarray(m[5]).item()),
        "numQueries": int(np.asarray(m[6]).item()),
        "posDistThr": float(np.asarray(m[7]).item()),
        "posDistSqThr": float(np.asarray(m[8]).item()),
        "nonTrivPosDistSqThr": float(np.asarray(m[9]).item()),
    }


def _count_with_positive(utm_q: np.ndarray, utm_db: np.ndarray, radius: float) -> int:
    from scipy.spatial import cKDTree

    if len(utm_q) == 0 or len(utm_db) == 0:
        return 0
    dist, _ = cKDTree(utm_db).query(utm_q, k=1)
    return int(np.sum(dist <= radius))


def generate(
    out_root: Path,
    preset: str = "tiny",
    seed: int = 0,
    image_size: Tuple[int, int] = (120, 160),
    workers: int = 1,
    progress: bool = False,
    **overrides,
) -> dict:
    """Generate the synthetic Pittsburgh (``<out_root>/pitts``) and Tokyo 24/7
    (``<out_root>/tokyo247``) datasets and return a summary.

    Args:
        out_root: output folder (created; existing files are overwritten atomically).
        preset: ``tiny`` (a few hundred images, for tests) or ``demo`` (a few thousand).
        seed: seed of everything; the same seed gives byte-identical files.
        image_size: (H, W) of every image.
        workers: rendering processes; the output does not depend on it.
        progress: report progress (a bar on a terminal, log lines otherwise).
        **overrides: ``places`` (rescale the preset) or any ``SyntheticConfig`` field.
    """
    out_root = Path(out_root)
    size = (int(image_size[0]), int(image_size[1]))
    if size[0] < 8 or size[1] < 8:
        raise ValueError(f"image_size must be at least 8x8, got {image_size}")
    cfg = resolve_config(preset, **overrides)
    pitts_ss, tokyo_ss = np.random.SeedSequence(int(seed)).spawn(2)
    pitts_city, pitts_splits, pitts_jobs = plan_pittsburgh(np.random.default_rng(pitts_ss), cfg)
    tokyo_city, tokyo, tokyo_jobs = plan_tokyo(np.random.default_rng(tokyo_ss), cfg)
    roots = {"pitts": out_root / "pitts", "tokyo": out_root / "tokyo247"}
    jobs = pitts_jobs + tokyo_jobs
    logger.info(
        "synthetic city: preset=%s seed=%d size=%s images=%d workers=%d",
        preset,
        seed,
        size,
        len(jobs),
        workers,
    )
    render_jobs(
        jobs, {"pitts": pitts_city, "tokyo": tokyo_city}, roots, size, cfg.jpeg_quality, workers, progress
    )

    summary: dict = {
        "preset": preset,
        "seed": int(seed),
        "image_size": list(size),
        "config": asdict(cfg),
        "pitts_root": str(roots["pitts"]),
        "tokyo247_root": str(roots["tokyo"]),
        "pitts30k": {},
    }
    for split_name, sp in pitts_splits.items():
        mat = roots["pitts"] / "datasets" / f"pitts30k_{split_name}.mat"
        args = (split_name, sp["db"], np.asarray(sp["utm_db"]), sp["q"], np.asarray(sp["utm_q"]))
        write_dbstruct(mat, *args)
        if cfg.write_pitts250k:
            write_dbstruct(roots["pitts"] / "datasets" / f"pitts250k_{split_name}.mat", *args)
        summary["pitts30k"][split_name] = {
            "mat": str(mat),
            "db": len(sp["db"]),
            "q": len(sp["q"]),
            "q_with_db_within_10m": _count_with_positive(
                np.asarray(sp["utm_q"]).reshape(-1, 2), np.asarray(sp["utm_db"]).reshape(-1, 2), 10.0
            ),
            "q_conditions": {c: sp["q_conditions"].count(c) for c in CONDITIONS},
        }
    tmat = roots["tokyo"] / "tokyo247.mat"
    write_dbstruct(
        tmat, "test", tokyo["db"], np.asarray(tokyo["utm_db"]), tokyo["q"], np.asarray(tokyo["utm_q"])
    )
    summary["tokyo247"] = {
        "mat": str(tmat),
        "db": len(tokyo["db"]),
        "q": len(tokyo["q"]),
        "panoramas": len(tokyo["db"]) // NUM_YAWS,
        "q_conditions": {c: tokyo["q_conditions"].count(c) for c in CONDITIONS},
    }
    summary["total_images"] = len(jobs)
    atomic_write_bytes(
        out_root / "synthetic_summary.json", json.dumps(summary, indent=2, sort_keys=True).encode()
    )
    return summary
