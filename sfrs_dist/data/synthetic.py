"""Synthetic city: street views with real geometry, written in the real dataset formats.

The generator builds a procedural city (a street grid, building facades with windows,
textures and unique shop signs, plus identical trees and lamp posts everywhere), renders
street views with a vectorised 2.5D ray caster and writes them exactly like the real
Pittsburgh (``pitts30k_{split}.mat`` + ``NNN/NNNNNN_pitch1_yawY.jpg``) and Tokyo 24/7
(``tokyo247.mat`` + ``.png`` cutouts named ``.jpg`` in the .mat, day/sunset/night ``.jpg``
queries) datasets, so the project's dataset readers load it unchanged.

Geometry: every image column casts a horizontal ray (equiangular columns, horizontal field
of view 60 degrees); the nearest facade / object along the ray is drawn with a vertical
extent given by its distance (rows are ``tan(elevation)``, pitch is a vertical shift), the
sky above and the road below. Database views of one place 30 degrees apart therefore share
half of their columns, views facing away from each other share nothing.

Everything is drawn from ``numpy.random.default_rng`` seeded by the caller: the same seed
gives byte-identical images and .mat files, whatever the number of worker processes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CONDITIONS = ("day", "sunset", "night")
PITTS_FIELDS = (
    "whichSet",
    "dbImageFns",
    "utmDb",
    "qImageFns",
    "utmQ",
    "numImages",
    "numQueries",
    "posDistThr",
    "posDistSqThr",
    "nonTrivPosDistSqThr",
)
POS_DIST_THR = 25.0
NONTRIV_POS_DIST_SQ_THR = 100.0
NUM_YAWS = 12
YAW_STEP_DEG = 30.0
#: UTM offsets of the two synthetic cities (zone 17T near Pittsburgh, 54S near Tokyo).
PITTS_UTM_ORIGIN = (584000.0, 4477000.0)
TOKYO_UTM_ORIGIN = (381000.0, 3948000.0)
#: Tokyo panoramas are drawn from this many times more candidate positions.
TOKYO_SPREAD = 2
_MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: sfrs_dist synthetic city"


# ----------------------------------------------------------------------------------------
# City model
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CityStyle:
    """Parameters of the procedural city.

    Attributes:
        block_min: smallest block side in metres.
        block_max: largest block side in metres.
        road_half: half width of the carriageway in metres.
        sidewalk: sidewalk width in metres (facades stand at ``road_half + sidewalk``).
        facade_min: narrowest facade in metres.
        facade_max: widest facade in metres.
        height_min: lowest building in metres.
        height_max: tallest building in metres.
        sign_probs: probabilities of a facade carrying 0, 1 or 2 signs.
        sign_z: vertical range (metres) where signs are placed.
        palette: facade albedo palette (RGB in [0, 1]); facades draw from it with jitter.
        tree_spacing: distance between street trees along a sidewalk in metres.
        lamp_spacing: distance between lamp posts along a sidewalk in metres.
    """

    block_min: float = 40.0
    block_max: float = 60.0
    road_half: float = 5.0
    sidewalk: float = 3.0
    facade_min: float = 6.0
    facade_max: float = 18.0
    height_min: float = 8.0
    height_max: float = 30.0
    sign_probs: Tuple[float, float, float] = (0.5, 0.4, 0.1)
    sign_z: Tuple[float, float] = (2.5, 6.0)
    palette: Tuple[Tuple[float, float, float], ...] = (
        (0.62, 0.36, 0.30),
        (0.72, 0.66, 0.55),
        (0.58, 0.58, 0.58),
        (0.80, 0.78, 0.72),
        (0.48, 0.38, 0.30),
        (0.76, 0.70, 0.50),
        (0.50, 0.55, 0.60),
        (0.55, 0.58, 0.50),
    )
    tree_spacing: float = 16.0
    lamp_spacing: float = 24.0

    @property
    def street_half(self) -> float:
        """Distance from a street centreline to the facades."""
        return self.road_half + self.sidewalk


PITTS_STYLE = CityStyle()
TOKYO_STYLE = CityStyle(
    block_min=36.0,
    block_max=52.0,
    road_half=4.5,
    facade_min=5.0,
    facade_max=12.0,
    height_min=10.0,
    height_max=40.0,
    sign_probs=(0.2, 0.45, 0.35),
    sign_z=(2.5, 9.0),
    palette=(
        (0.70, 0.70, 0.68),
        (0.60, 0.62, 0.64),
        (0.78, 0.74, 0.66),
        (0.45, 0.47, 0.50),
        (0.66, 0.58, 0.52),
        (0.82, 0.82, 0.80),
    ),
    tree_spacing=22.0,
    lamp_spacing=20.0,
)

#: Object kinds of the round (plan-view circle) objects of a city.
TREE, LAMP = 0, 1
TREE_TRUNK_R, TREE_CROWN_R = 0.22, 1.7
TREE_TRUNK_Z, TREE_CROWN_Z = (0.0, 3.0), (2.6, 7.0)
LAMP_POLE_R, LAMP_HEAD_R = 0.11, 0.35
LAMP_POLE_Z, LAMP_HEAD_Z = (0.0, 6.0), (5.75, 6.15)
GLYPH_ROWS, GLYPH_COLS = 3, 6


@dataclass
class City:
    """A procedural city: a street grid, facades (plan-view segments) and round objects.

    Streets run along ``x = xs[i]`` and ``y = ys[j]``; blocks lie between them, their
    perimeters (inset by ``style.street_half``) are cut into facades. Per-facade arrays are
    indexed by facade id; signs are attached to facades through ``seg_signs`` (-1: none).
    """

    style: CityStyle
    xs: np.ndarray
    ys: np.ndarray
    salt: int
    seg_a: np.ndarray  # (S, 2) start point
    seg_b: np.ndarray  # (S, 2) end point
    seg_normal: np.ndarray  # (S, 2) outward (street side) unit normal
    seg_len: np.ndarray  # (S,)
    height: np.ndarray  # (S,)
    albedo: np.ndarray  # (S, 3) wall colour
    trim: np.ndarray  # (S, 3) ground-floor / cornice colour
    glass: np.ndarray  # (S, 3) window colour by day
    accent: np.ndarray  # (S, 3) wall pattern colour
    floor_h: np.ndarray  # (S,)
    ground_h: np.ndarray  # (S,)
    win_du: np.ndarray  # (S,) window column spacing
    win_fw: np.ndarray  # (S,) window width fraction
    win_fh: np.ndarray  # (S,) window height fraction
    win_off: np.ndarray  # (S,) window grid offset along the facade
    pattern: np.ndarray  # (S,) wall pattern id (0 plain, 1 bands, 2 pilasters, 3 checker)
    pattern_freq: np.ndarray  # (S,)
    shadow_h: np.ndarray  # (S,) height of the low-sun shadow cast by the opposite side
    seg_signs: np.ndarray  # (S, 2) sign ids or -1
    sign_u: np.ndarray  # (G, 2) along-facade range
    sign_z: np.ndarray  # (G, 2) height range
    sign_shape: np.ndarray  # (G,) 0 rectangle, 1 ellipse, 2 diamond, 3 framed
    sign_bg: np.ndarray  # (G, 3)
    sign_fg: np.ndarray  # (G, 3)
    sign_glyph: np.ndarray  # (G, GLYPH_ROWS * GLYPH_COLS) bool
    obj_xy: np.ndarray  # (O, 2)
    obj_kind: np.ndarray  # (O,)

    @property
    def num_facades(self) -> int:
        return int(self.seg_len.shape[0])

    def street_edges(self, interior_only: bool = True) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Street centreline edges of this city (see ``street_edges``)."""
        return street_edges(self.xs, self.ys, interior_only)


def street_edges(
    xs: np.ndarray, ys: np.ndarray, interior_only: bool = True
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Street centreline edges between neighbouring intersections as (start, end) points.

    With ``interior_only`` only edges with blocks on both sides and at both ends are kept
    (the outer ring of blocks is scenery). Sorted west to east, then south to north.
    """
    nx, ny = len(xs), len(ys)
    lo_i, hi_i = (1, nx - 2) if interior_only else (0, nx - 1)
    lo_j, hi_j = (1, ny - 2) if interior_only else (0, ny - 1)
    edges = []
    for j in range(lo_j, hi_j + 1):
        for i in range(lo_i, hi_i):
            edges.append((np.array([xs[i], ys[j]]), np.array([xs[i + 1], ys[j]])))
    for i in range(lo_i, hi_i + 1):
        for j in range(lo_j, hi_j):
            edges.append((np.array([xs[i], ys[j]]), np.array([xs[i], ys[j + 1]])))
    edges.sort(key=lambda e: (float(e[0][0] + e[1][0]), float(e[0][1] + e[1][1])))
    return edges


def _split_length(rng: np.random.Generator, length: float, lo: float, hi: float) -> List[float]:
    """Cut ``length`` into pieces of ``lo..hi`` metres (the last one absorbs the rest)."""
    cuts: List[float] = []
    rest = length
    while rest > hi:
        w = float(rng.uniform(lo, hi))
        if rest - w < lo:
            break
        cuts.append(w)
        rest -= w
    cuts.append(rest)
    return cuts


def _grid_lines(rng: np.random.Generator, n_blocks: int, style: CityStyle) -> np.ndarray:
    widths = rng.uniform(style.block_min, style.block_max, size=n_blocks)
    steps = widths + 2.0 * style.street_half
    return np.concatenate([[0.0], np.cumsum(steps)])


def _random_colours(
    rng: np.random.Generator, n: int, sat: Tuple[float, float], val: Tuple[float, float]
) -> np.ndarray:
    """``n`` RGB colours from random hues with saturation/value in the given ranges."""
    h = rng.uniform(0.0, 1.0, n)
    s = rng.uniform(*sat, n)
    v = rng.uniform(*val, n)
    k = (np.arange(3)[None, :] * (-1.0 / 3.0) + h[:, None] + 1.0) % 1.0
    rgb = np.clip(np.abs(k * 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return v[:, None] * (1.0 - s[:, None] + s[:, None] * rgb)


def build_city(
    rng: np.random.Generator, n_blocks_x: int, n_blocks_y: int, style: CityStyle = PITTS_STYLE
) -> City:
    """Draw a city of ``n_blocks_x`` x ``n_blocks_y`` blocks from ``rng``."""
    if n_blocks_x < 3 or n_blocks_y < 3:
        raise ValueError(f"a city needs at least 3x3 blocks, got {n_blocks_x}x{n_blocks_y}")
    xs = _grid_lines(rng, n_blocks_x, style)
    ys = _grid_lines(rng, n_blocks_y, style)
    sh = style.street_half
    a_list, b_list, n_list = [], [], []
    for i in range(n_blocks_x):
        for j in range(n_blocks_y):
            x0, x1 = xs[i] + sh, xs[i + 1] - sh
            y0, y1 = ys[j] + sh, ys[j + 1] - sh
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            for k in range(4):
                p = np.array(corners[k])
                q = np.array(corners[(k + 1) % 4])
                side = float(np.linalg.norm(q - p))
                direction = (q - p) / side
                normal = np.array([direction[1], -direction[0]])
                pos = 0.0
                for w in _split_length(rng, side, style.facade_min, style.facade_max):
                    a_list.append(p + direction * pos)
                    b_list.append(p + direction * (pos + w))
                    n_list.append(normal)
                    pos += w
    seg_a = np.asarray(a_list)
    seg_b = np.asarray(b_list)
    s = len(seg_a)
    seg_len = np.linalg.norm(seg_b - seg_a, axis=1)
    palette = np.asarray(style.palette)
    albedo = np.clip(palette[rng.integers(0, len(palette), s)] + rng.normal(0, 0.03, (s, 3)), 0.05, 0.95)
    trim = _random_colours(rng, s, (0.1, 0.6), (0.25, 0.75))
    glass = np.clip(np.array([0.18, 0.24, 0.32]) + rng.normal(0, 0.04, (s, 3)), 0.02, 0.6)
    accent = np.clip(albedo * rng.uniform(0.6, 0.85, (s, 1)) + rng.normal(0, 0.03, (s, 3)), 0.02, 0.95)
    height = rng.uniform(style.height_min, style.height_max, s)
    floor_h = rng.uniform(2.9, 3.8, s)
    ground_h = rng.uniform(3.6, 4.8, s)
    win_du = rng.uniform(1.8, 3.6, s)
    win_fw = rng.uniform(0.3, 0.7, s)
    win_fh = rng.uniform(0.35, 0.65, s)
    win_off = (seg_len % win_du) / 2.0
    pattern = rng.integers(0, 4, s)
    pattern_freq = rng.uniform(0.4, 1.6, s)
    shadow_h = rng.uniform(2.0, 14.0, s)

    n_signs = rng.choice(3, size=s, p=np.asarray(style.sign_probs) / np.sum(style.sign_probs))
    seg_signs = -np.ones((s, 2), dtype=np.int64)
    sign_u, sign_z = [], []
    gid = 0
    for si in range(s):
        for slot in range(int(n_signs[si])):
            half = seg_len[si] / 2.0
            lo, hi = (
                (0.0, half)
                if n_signs[si] == 2 and slot == 0
                else ((half, seg_len[si]) if n_signs[si] == 2 else (0.0, seg_len[si]))
            )
            w = min(float(rng.uniform(1.8, 5.0)), (hi - lo) * 0.8)
            u0 = float(rng.uniform(lo + 0.1 * (hi - lo), hi - w - 0.1 * (hi - lo) + 1e-6))
            h = float(rng.uniform(0.8, 2.2))
            z0 = float(
                rng.uniform(style.sign_z[0], max(style.sign_z[0], min(style.sign_z[1], height[si] - h - 0.5)))
            )
            sign_u.append((u0, u0 + w))
            sign_z.append((z0, z0 + h))
            seg_signs[si, slot] = gid
            gid += 1
    g = gid
    sign_bg = _random_colours(rng, g, (0.6, 1.0), (0.55, 1.0))
    sign_fg = np.where(
        rng.random((g, 1)) < 0.5,
        _random_colours(rng, g, (0.0, 0.3), (0.9, 1.0)),
        _random_colours(rng, g, (0.5, 1.0), (0.05, 0.35)),
    )

    objs, kinds = [], []
    for p, q in street_edges(xs, ys, interior_only=False):
        length = float(np.linalg.norm(q - p))
        direction = (q - p) / length
        normal = np.array([-direction[1], direction[0]])
        for kind, spacing, lateral in (
            (TREE, style.tree_spacing, style.road_half + 1.0),
            (LAMP, style.lamp_spacing, style.road_half + 0.4),
        ):
            for side in (-1.0, 1.0):
                pos = sh + float(rng.uniform(0.5, spacing))
                while pos < length - sh - 0.5:
                    objs.append(p + direction * pos + normal * side * lateral)
                    kinds.append(kind)
                    pos += spacing + float(rng.uniform(-2.0, 2.0))
    return City(
        style=style,
        xs=xs,
        ys=ys,
        salt=int(rng.integers(1, 2**31)),
        seg_a=seg_a,
        seg_b=seg_b,
        seg_normal=np.asarray(n_list),
        seg_len=seg_len,
        height=height,
        albedo=albedo,
        trim=trim,
        glass=glass,
        accent=accent,
        floor_h=floor_h,
        ground_h=ground_h,
        win_du=win_du,
        win_fw=win_fw,
        win_fh=win_fh,
        win_off=win_off,
        pattern=pattern,
        pattern_freq=pattern_freq,
        shadow_h=shadow_h,
        seg_signs=seg_signs,
        sign_u=np.asarray(sign_u, dtype=np.float64).reshape(-1, 2),
        sign_z=np.asarray(sign_z, dtype=np.float64).reshape(-1, 2),
        sign_shape=rng.integers(0, 4, g),
        sign_bg=sign_bg,
        sign_fg=sign_fg,
        sign_glyph=rng.random((g, GLYPH_ROWS * GLYPH_COLS)) < 0.5,
        obj_xy=np.asarray(objs, dtype=np.float64).reshape(-1, 2),
        obj_kind=np.asarray(kinds, dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A street-level camera: position (m), heading (rad, counter-clockwise from east),
    pitch (rad, up positive), eye height (m) and horizontal field of view (rad)."""

    x: float
    y: float
    heading: float
    pitch: float = math.radians(6.0)
    height: float = 2.5
    fov: float = math.radians(60.0)


@dataclass(frozen=True)
class Light:
    """Illumination and camera response of one image.

    Attributes:
        condition: ``day``, ``sunset`` or ``night``.
        sun_azimuth: sun direction in radians (counter-clockwise from east).
        exposure: global gain.
        gamma: response exponent applied after the gain (1 = linear).
        white_balance: per-channel gains.
        noise: standard deviation of additive Gaussian noise (in [0, 1] units).
        seed: seed of the noise.
    """

    condition: str = "day"
    sun_azimuth: float = math.radians(135.0)
    exposure: float = 1.0
    gamma: float = 1.0
    white_balance: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")


@dataclass(frozen=True)
class Occluders:
    """Transient objects in front of the camera (queries): cars (boxes) and pedestrians.

    Attributes:
        car_xy: (C, 2) car centres; car_angle: (C,) orientation; car_rgb: (C, 3).
        ped_xy: (P, 2) pedestrian centres; ped_rgb: (P, 3).
    """

    car_xy: np.ndarray
    car_angle: np.ndarray
    car_rgb: np.ndarray
    ped_xy: np.ndarray
    ped_rgb: np.ndarray


_COND = {
    "day": dict(
        ambient=0.62,
        diffuse=0.45,
        tint=(1.0, 1.0, 1.0),
        sky_top=(0.33, 0.52, 0.85),
        sky_hor=(0.74, 0.82, 0.92),
        haze=(0.72, 0.78, 0.86),
        haze_dist=260.0,
    ),
    "sunset": dict(
        ambient=0.22,
        diffuse=0.8,
        tint=(1.2, 0.74, 0.46),
        sky_top=(0.22, 0.18, 0.40),
        sky_hor=(1.0, 0.52, 0.26),
        haze=(0.70, 0.42, 0.30),
        haze_dist=160.0,
    ),
    "night": dict(
        ambient=0.05,
        diffuse=0.0,
        tint=(0.55, 0.62, 0.95),
        sky_top=(0.01, 0.01, 0.03),
        sky_hor=(0.05, 0.045, 0.07),
        haze=(0.04, 0.035, 0.05),
        haze_dist=120.0,
    ),
}
_LAMP_RGB = np.array([1.0, 0.82, 0.55])
_VIEW_RADIUS = 160.0


def _hash01(salt: int, *ints: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from integer arrays (broadcast)."""
    primes = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
    with np.errstate(over="ignore"):
        h = np.uint64(salt & 0xFFFFFFFF) * np.uint64(0xD6E8FEB86659FD93)
        for k, a in enumerate(ints):
            h = h ^ (np.asarray(a).astype(np.int64).astype(np.uint64) * np.uint64(primes[k % 4]))
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(29))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _segment_hits(
    o: np.ndarray, d: np.ndarray, a: np.ndarray, b: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of each ray ``o + t d`` (d: (W, 2)) with segments ``a -> b`` ((S, 2)).

    Returns (t, segment index, fraction along the segment), t = inf where nothing is hit.
    """
    w = d.shape[0]
    if a.shape[0] == 0:
        return np.full(w, np.inf), np.zeros(w, np.int64), np.zeros(w)
    e = b - a
    ao = a - o
    denom = d[:, None, 0] * e[None, :, 1] - d[:, None, 1] * e[None, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (ao[None, :, 0] * e[None, :, 1] - ao[None, :, 1] * e[None, :, 0]) / denom
        u = (ao[None, :, 0] * d[:, None, 1] - ao[None, :, 1] * d[:, None, 0]) / denom
    ok = (np.abs(denom) > 1e-12) & (t > 1e-6) & (u >= 0.0) & (u <= 1.0)
    t = np.where(ok, t, np.inf)
    idx = np.argmin(t, axis=1)
    rows = np.arange(w)
    return t[rows, idx], idx, np.nan_to_num(u[rows, idx])


def _circle_hits(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest entry point of each ray with circles of radius ``r`` centred at ``c`` ((n, 2))."""
    w = d.shape[0]
    if c.shape[0] == 0:
        return np.full(w, np.inf), np.zeros(w, np.int64)
    oc = o[None, :] - c
    bq = d @ oc.T
    cq = np.sum(oc * oc, axis=1)[None, :] - r * r
    disc = bq * bq - cq
    with np.errstate(invalid="ignore"):
        t = -bq - np.sqrt(disc)
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    idx = np.argmin(t, axis=1)
    return t[np.arange(w), idx], idx


def _car_segments(occ: Optional[Occluders]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plan-view box outlines of the cars: (4C, 2) starts, ends and owning car index."""
    if occ is None or occ.car_xy.shape[0] == 0:
        z = np.zeros((0, 2))
        return z, z, np.zeros(0, np.int64)
    hl, hw = 2.25, 0.9
    local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
    ca, sa = np.cos(occ.car_angle), np.sin(occ.car_angle)
    rot = np.stack([np.stack([ca, -sa], -1), np.stack([sa, ca], -1)], -2)  # (C, 2, 2)
    corners = occ.car_xy[:, None, :] + np.einsum("cij,kj->cki", rot, local)
    a = corners.reshape(-1, 2)
    b = np.roll(corners, -1, axis=1).reshape(-1, 2)
    return a, b, np.repeat(np.arange(occ.car_xy.shape[0]), 4)


def _nearest_street_distance(lines: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance from coordinates ``v`` to the nearest value of the sorted ``lines``."""
    k = np.clip(np.searchsorted(lines, v), 1, len(lines) - 1)
    return np.minimum(np.abs(v - lines[k - 1]), np.abs(v - lines[k]))


def render_view(
    city: City,
    cam: Camera,
    light: Light = Light(),
    size: Tuple[int, int] = (120, 160),
    occluders: Optional[Occluders] = None,
) -> np.ndarray:
    """Render one street view as an (H, W, 3) uint8 RGB image."""
    hgt, wid = int(size[0]), int(size[1])
    cond = _COND[light.condition]
    night = light.condition == "night"
    style = city.style
    o = np.array([cam.x, cam.y], dtype=np.float64)
    f = wid / cam.fov
    ang = cam.heading + (wid / 2.0 - (np.arange(wid) + 0.5)) / f
    d = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    v = ((hgt / 2.0 - (np.arange(hgt) + 0.5)) / f + math.tan(cam.pitch))[:, None]  # (H, 1) tan(elevation)
    sun = np.array([math.cos(light.sun_azimuth), math.sin(light.sun_azimuth)])
    tint = np.asarray(cond["tint"])

    # --- sky and ground -------------------------------------------------------------
    sky_t = np.clip(v / 0.9, 0.0, 1.0)[..., None]
    img = np.broadcast_to(
        (1 - sky_t) * np.asarray(cond["sky_hor"]) + sky_t * np.asarray(cond["sky_top"]), (hgt, wid, 3)
    ).copy()
    depth = np.full((hgt, wid), np.inf)
    r0 = int(np.argmax(v[:, 0] < 0)) if (v[:, 0] < 0).any() else hgt  # first ground row
    if r0 < hgt:
        t_ground = (cam.height / -v[r0:]) * np.ones((1, wid))
        gx = cam.x + t_ground * d[None, :, 0]
        gy = cam.y + t_ground * d[None, :, 1]
        dx = _nearest_street_distance(city.xs, gx)
        dy = _nearest_street_distance(city.ys, gy)
        on_road = (dx < style.road_half) | (dy < style.road_half)
        asphalt = 0.30 + 0.04 * _hash01(city.salt + 7, np.floor(gx * 1.5), np.floor(gy * 1.5))
        paving = 0.55 + 0.05 * (((np.floor(gx) + np.floor(gy)) % 2) == 0)
        lane = ((dx < 0.12) & (dy > style.street_half) & ((gy % 6.0) < 3.0)) | (
            (dy < 0.12) & (dx > style.street_half) & ((gx % 6.0) < 3.0)
        )
        grey = np.where(on_road, np.where(lane, 0.85, asphalt), paving)
        ground = grey[..., None] * np.array([1.0, 0.99, 0.97])
        g_light = cond["ambient"] + cond["diffuse"] * (0.8 if light.condition == "day" else 0.25)
        img[r0:] = ground * g_light * tint
        depth[r0:] = t_ground

    # --- culling ------------------------------------------------------------------------
    ab = city.seg_b - city.seg_a
    tproj = np.clip(np.sum((o - city.seg_a) * ab, axis=1) / np.maximum(np.sum(ab * ab, axis=1), 1e-9), 0, 1)
    seg_dist = np.linalg.norm(city.seg_a + tproj[:, None] * ab - o, axis=1)
    segs = np.nonzero(seg_dist < _VIEW_RADIUS)[0]
    obj_near = np.nonzero(np.linalg.norm(city.obj_xy - o, axis=1) < _VIEW_RADIUS * 0.6)[0]
    trees = obj_near[city.obj_kind[obj_near] == TREE]
    lamps = obj_near[city.obj_kind[obj_near] == LAMP]
    lamp_pos = None
    if night and lamps.size:
        near = lamps[np.argsort(np.linalg.norm(city.obj_xy[lamps] - o, axis=1))[:16]]
        lamp_pos = np.concatenate([city.obj_xy[near], np.full((near.size, 1), 5.9)], axis=1)

    def lamp_glow(px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        """Light received from the nearby street lamps at world points (night only)."""
        acc = np.zeros(np.shape(px))
        for lx, ly, lz in lamp_pos if lamp_pos is not None else ():
            acc += 0.7 * np.exp(-((px - lx) ** 2 + (py - ly) ** 2 + (pz - lz) ** 2) / (2 * 4.0**2))
        return acc

    if night and r0 < hgt:
        img[r0:] += ground * lamp_glow(gx, gy, np.zeros_like(gx))[..., None] * _LAMP_RGB

    def paint(t_col: np.ndarray, z_lo, z_hi, colour: np.ndarray) -> None:
        """Z-buffered paint of a layer hit at column distances ``t_col`` over [z_lo, z_hi]."""
        if not np.isfinite(t_col).any():
            return
        t_row = np.broadcast_to(t_col[None, :], (hgt, wid))
        z = cam.height + v * np.where(np.isfinite(t_row), t_row, 0.0)
        m = (z >= z_lo) & (z <= z_hi) & (t_row < depth)
        colour = np.asarray(colour)
        img[m] = np.broadcast_to(colour, (hgt, wid, 3))[m] if colour.ndim == 3 else colour
        depth[m] = t_row[m]

    # --- facades (colours computed only on the facade pixels) ----------------------------
    t_f, k, frac = _segment_hits(o, d, city.seg_a[segs], city.seg_b[segs])
    hit = np.isfinite(t_f)
    s_col = segs[k]
    t_safe = np.where(hit, t_f, 0.0)
    z_all = cam.height + v * t_safe[None, :]
    fmask = hit[None, :] & (z_all >= 0.0) & (z_all <= city.height[s_col][None, :]) & (t_f[None, :] < depth)
    rr, cc = np.nonzero(fmask)
    s = s_col[cc]
    u = frac[cc] * city.seg_len[s]
    z = z_all[rr, cc]
    wall = city.albedo[s]
    pf = city.pattern_freq[s]
    pat = city.pattern[s]
    stripe = ((pat == 1) & (((z * pf) % 1.0) < 0.18)) | ((pat == 2) & (((u * pf * 0.5) % 1.0) < 0.2))
    stripe |= (pat == 3) & (((np.floor(u * pf) + np.floor(z * pf)) % 2) == 0)
    wall = np.where(stripe[:, None], city.accent[s], wall)
    gh = city.ground_h[s]
    top = city.height[s]
    fu = (u + city.win_off[s]) / city.win_du[s]
    fz = (z - gh) / city.floor_h[s]
    win_c, win_r = np.floor(fu), np.floor(fz)
    in_win = (np.abs(fu - win_c - 0.5) < city.win_fw[s] / 2) & (np.abs(fz - win_r - 0.5) < city.win_fh[s] / 2)
    in_win &= (z > gh) & (z < top - 1.0)
    ground_floor = z < gh
    shop_win = ground_floor & (z > 0.4) & (z < gh - 0.9) & (np.abs((u / 4.0) % 1.0 - 0.5) < 0.36)
    wall = np.where((ground_floor | (z > top - 0.6))[:, None], city.trim[s], wall)
    wall = np.where((in_win | shop_win)[:, None], city.glass[s], wall)
    facing = np.clip(np.sum(city.seg_normal[s] * sun, axis=1), 0.0, 1.0)
    lit = cond["ambient"] + cond["diffuse"] * facing
    if light.condition == "sunset":
        lit = np.where(z < city.shadow_h[s] * (1.0 - 0.6 * facing), cond["ambient"] * 1.3, lit)
    colour = wall * lit[:, None] * tint
    emissive = np.zeros_like(colour)
    if night:
        lit_win = in_win & (_hash01(city.salt, s, win_c, win_r) < 0.38)
        warm = np.array([1.0, 0.86, 0.55]) * (0.4 + 0.4 * _hash01(city.salt + 1, s, win_c, win_r))[:, None]
        emissive = np.where(lit_win[:, None], warm, emissive)
        shop_lit = shop_win & (_hash01(city.salt + 2, s) < 0.4)
        emissive = np.where(shop_lit[:, None], np.array([0.45, 0.4, 0.3]), emissive)
        tp = t_f[cc]
        colour = (
            colour + wall * lamp_glow(cam.x + tp * d[cc, 0], cam.y + tp * d[cc, 1], z)[:, None] * _LAMP_RGB
        )
    for slot in range(2):
        g = city.seg_signs[s, slot]
        sel = np.nonzero(g >= 0)[0]
        if sel.size == 0:
            continue
        gi = g[sel]
        su = (u[sel] - city.sign_u[gi, 0]) / (city.sign_u[gi, 1] - city.sign_u[gi, 0])
        sz = (z[sel] - city.sign_z[gi, 0]) / (city.sign_z[gi, 1] - city.sign_z[gi, 0])
        inside = (su >= 0) & (su <= 1) & (sz >= 0) & (sz <= 1)
        shape = city.sign_shape[gi]
        ell = (su - 0.5) ** 2 + (sz - 0.5) ** 2 <= 0.25
        dia = np.abs(su - 0.5) + np.abs(sz - 0.5) <= 0.5
        inside &= np.where(shape == 1, ell, np.where(shape == 2, dia, True))
        frame = (shape == 3) & ((su < 0.08) | (su > 0.92) | (sz < 0.12) | (sz > 0.88))
        gr = np.clip(((sz - 0.2) / 0.6 * GLYPH_ROWS).astype(np.int64), 0, GLYPH_ROWS - 1)
        gc = np.clip(((su - 0.15) / 0.7 * GLYPH_COLS).astype(np.int64), 0, GLYPH_COLS - 1)
        in_glyph = (su > 0.15) & (su < 0.85) & (sz > 0.2) & (sz < 0.8)
        fg = (city.sign_glyph[gi, gr * GLYPH_COLS + gc] & in_glyph) | frame
        sign_alb = np.where(fg[:, None], city.sign_fg[gi], city.sign_bg[gi])
        hit_sign = sel[inside]
        colour[hit_sign] = (sign_alb * lit[sel, None] * tint)[inside]
        if night:
            emissive[hit_sign] = sign_alb[inside] * 0.9
    img[rr, cc] = colour + emissive
    depth[rr, cc] = t_f[cc]

    # --- street furniture (identical everywhere) and occluders ----------------------------
    obj_light = cond["ambient"] + cond["diffuse"] * 0.5
    t_tr, _ = _circle_hits(o, d, city.obj_xy[trees], TREE_TRUNK_R)
    paint(t_tr, *TREE_TRUNK_Z, np.array([0.33, 0.24, 0.16]) * obj_light * tint)
    t_cr, ci = _circle_hits(o, d, city.obj_xy[trees], TREE_CROWN_R)
    if trees.size:
        hp = o + np.where(np.isfinite(t_cr), t_cr, 0.0)[:, None] * d - city.obj_xy[trees][ci]
        phi = np.arctan2(hp[:, 1], hp[:, 0])[None, :]
        zc = cam.height + v * np.where(np.isfinite(t_cr), t_cr, 0.0)[None, :]
        leaf = 0.75 + 0.25 * np.sin(phi * 9.0 + zc * 4.0) * np.sin(zc * 7.0 - phi * 3.0)
        rel = city.obj_xy[trees][ci] - o
        impact = np.abs(d[:, 0] * rel[:, 1] - d[:, 1] * rel[:, 0])
        half = (
            0.5
            * (TREE_CROWN_Z[1] - TREE_CROWN_Z[0])
            * np.sqrt(np.clip(1.0 - (impact / TREE_CROWN_R) ** 2, 0.0, 1.0))
        )
        mid = 0.5 * (TREE_CROWN_Z[0] + TREE_CROWN_Z[1])
        paint(
            t_cr,
            (mid - half)[None, :],
            (mid + half)[None, :],
            (leaf[..., None] * np.array([0.22, 0.42, 0.17])) * obj_light * tint,
        )
    t_lp, _ = _circle_hits(o, d, city.obj_xy[lamps], LAMP_POLE_R)
    paint(t_lp, *LAMP_POLE_Z, np.array([0.25, 0.26, 0.28]) * obj_light * tint)
    t_lh, _ = _circle_hits(o, d, city.obj_xy[lamps], LAMP_HEAD_R)
    paint(t_lh, *LAMP_HEAD_Z, _LAMP_RGB * 1.2 if night else np.array([0.7, 0.7, 0.66]) * obj_light * tint)
    if occluders is not None:
        ca, cb, cown = _car_segments(occluders)
        t_car, kc, _ = _segment_hits(o, d, ca, cb)
        if ca.shape[0]:
            body = occluders.car_rgb[cown[kc]][None, :, :] * np.ones((hgt, 1, 1))
            zc = cam.height + v * np.where(np.isfinite(t_car), t_car, 0.0)[None, :]
            car_col = np.where((zc > 1.0)[..., None], np.array([0.12, 0.14, 0.17]), body) * obj_light * tint
            paint(t_car, 0.25, 1.5, car_col)
        t_p, kp = _circle_hits(o, d, occluders.ped_xy, 0.3)
        if occluders.ped_xy.shape[0]:
            zp = cam.height + v * np.where(np.isfinite(t_p), t_p, 0.0)[None, :]
            ped = np.where(
                (zp > 1.5)[..., None], np.array([0.75, 0.6, 0.5]), occluders.ped_rgb[kp][None, :, :]
            )
            paint(t_p, 0.0, 1.75, ped * obj_light * tint)

    # --- haze, camera response, noise --------------------------------------------------
    fog = (1.0 - np.exp(-np.where(np.isfinite(depth), depth, 1e9) / cond["haze_dist"]))[..., None]
    img = img * (1 - fog) + np.asarray(cond["haze"]) * fog
    img = img * light.exposure * np.asarray(light.white_balance)
    img = np.clip(img, 0.0, 1.0) ** (1.0 / light.gamma)
    if light.noise > 0:
        rng = np.random.default_rng(light.seed)
        img = (
            img
            + rng.normal(0.0, light.noise, (hgt, wid, 1))
            + rng.normal(0.0, light.noise * 0.5, (hgt, wid, 3))
        )
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Sampling of places, queries and photometric variation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A capture position on a street: local coordinates and the street direction (rad)."""

    x: float
    y: float
    street_angle: float
    edge: int


def sample_places(
    rng: np.random.Generator, city: City, spacing: Tuple[float, float] = (8.0, 12.0)
) -> List[Place]:
    """Capture positions every ``spacing`` metres along the interior streets, west to east."""
    places: List[Place] = []
    for ei, (p, q) in enumerate(city.street_edges(interior_only=True)):
        length = float(np.linalg.norm(q - p))
        direction = (q - p) / length
        angle = math.atan2(direction[1], direction[0])
        normal = np.array([-direction[1], direction[0]])
        pos = float(rng.uniform(0.0, spacing[1]))
        while pos < length:
            xy = p + direction * pos + normal * float(rng.uniform(-2.0, 2.0))
            places.append(Place(float(xy[0]), float(xy[1]), angle, ei))
            pos += float(rng.uniform(*spacing))
    places.sort(key=lambda pl: (pl.x, pl.y))
    return places


def _query_position(
    rng: np.random.Generator, city: City, anchor: Place, lateral: float, max_offset: float = 15.0
) -> Tuple[float, float]:
    """A position 0-``max_offset`` m along the street from ``anchor``, within ``lateral`` m of
    the centreline (clipped to the street edge)."""
    p, q = city.street_edges(interior_only=True)[anchor.edge]
    direction = (q - p) / np.linalg.norm(q - p)
    normal = np.array([-direction[1], direction[0]])
    along = float(np.dot(np.array([anchor.x, anchor.y]) - p, direction))
    length = float(np.linalg.norm(q - p))
    off = float(rng.uniform(-max_offset, max_offset))
    along = float(np.clip(along + off, 0.0, length))
    xy = p + direction * along + normal * float(rng.uniform(-lateral, lateral))
    return float(xy[0]), float(xy[1])


def sample_occluders(
    rng: np.random.Generator, cam: Camera, max_cars: int = 3, max_peds: int = 4
) -> Occluders:
    """Random cars and pedestrians in front of the camera (never around it)."""
    nc = int(rng.integers(0, max_cars + 1))
    npd = int(rng.integers(0, max_peds + 1))
    rc = rng.uniform(5.0, 18.0, nc)
    ac = cam.heading + rng.uniform(-0.6, 0.6, nc)
    car_xy = np.stack([cam.x + rc * np.cos(ac), cam.y + rc * np.sin(ac)], -1).reshape(-1, 2)
    car_angle = np.round(rng.uniform(0, 4, nc)) * (math.pi / 2) + rng.normal(0, 0.05, nc)
    rp = rng.uniform(2.5, 14.0, npd)
    ap = cam.heading + rng.uniform(-0.5, 0.5, npd)
    ped_xy = np.stack([cam.x + rp * np.cos(ap), cam.y + rp * np.sin(ap)], -1).reshape(-1, 2)
    return Occluders(
        car_xy=car_xy,
        car_angle=car_angle,
        car_rgb=_random_colours(rng, nc, (0.0, 0.8), (0.15, 0.9)),
        ped_xy=ped_xy,
        ped_rgb=_random_colours(rng, npd, (0.0, 0.7), (0.1, 0.8)),
    )


def sample_light(rng: np.random.Generator, condition: str, query: bool) -> Light:
    """Illumination and camera response: database images vary little, queries much more."""
    if not query:
        return Light(
            condition,
            math.radians(135.0),
            float(rng.uniform(0.95, 1.05)),
            1.0,
            (1.0, 1.0, 1.0),
            0.008,
            int(rng.integers(2**31)),
        )
    sun = float(rng.uniform(0, 2 * math.pi))
    wb = tuple(float(x) for x in rng.uniform(0.85, 1.15, 3))
    if condition == "day":
        return Light(
            "day",
            sun,
            float(rng.uniform(0.7, 1.3)),
            float(rng.uniform(0.7, 1.4)),
            wb,
            float(rng.uniform(0.01, 0.04)),
            int(rng.integers(2**31)),
        )
    if condition == "sunset":
        return Light(
            "sunset",
            sun,
            float(rng.uniform(0.8, 1.3)),
            float(rng.uniform(0.8, 1.3)),
            wb,
            float(rng.uniform(0.03, 0.06)),
            int(rng.integers(2**31)),
        )
    return Light(
        "night",
        sun,
        float(rng.uniform(0.8, 1.3)),
        float(rng.uniform(1.0, 1.4)),
        wb,
        float(rng.uniform(0.06, 0.1)),
        int(rng.integers(2**31)),
    )


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
        if len(self.pitts_query_conditions) != 3 or sum(self.pitts_query_conditions) <= 0:
            raise ValueError(
                f"pitts_query_conditions must be three weights, got {self.pitts_query_conditions}"
            )


PRESETS: Dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(),
    "demo": SyntheticConfig(
        pitts_places=150,
        pitts_query_positions=80,
        query_views=12,
        tokyo_panoramas=80,
        tokyo_query_positions=105,
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
    cond_p = np.asarray(cfg.pitts_query_conditions, dtype=np.float64) / np.sum(cfg.pitts_query_conditions)
    qi = 0
    for si, split_name in enumerate(SPLITS):
        anchors = [p for p, r in zip(places, regions) if r == si]
        if not anchors:
            raise ValueError(f"split {split_name!r} received no places; use more places")
        split = splits[split_name]
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
    from ..progress import Progress

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


# ----------------------------------------------------------------------------------------
# Hardness check: a raw-pixel descriptor baseline
# ----------------------------------------------------------------------------------------


def raw_pixel_descriptors(files: Iterable[Path], size: Tuple[int, int] = (12, 16)) -> np.ndarray:
    """Grey image downsampled to ``size`` (H, W), mean-subtracted, L2-normalised (float32)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            g = np.asarray(
                im.convert("L").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32
            ).ravel()
        g = g - g.mean()
        out.append(g / max(float(np.linalg.norm(g)), 1e-6))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size[0] * size[1]), np.float32)


def recall_at_n(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    utm_q: np.ndarray,
    utm_db: np.ndarray,
    ns: Sequence[int] = (1, 5),
    thr: float = POS_DIST_THR,
    db_groups: Optional[np.ndarray] = None,
) -> Dict[int, float]:
    """Recall@N of cosine retrieval (faiss ``IndexFlatIP``): a query is correct when one of
    its top-N database images lies within ``thr`` metres. With ``db_groups`` (panorama id
    per database image) the ranking keeps only the best image per group (spatial NMS)."""
    import faiss
    from scipy.spatial import cKDTree

    index = faiss.IndexFlatIP(db_desc.shape[1])
    index.add(np.ascontiguousarray(db_desc, dtype=np.float32))
    n_max = max(ns)
    k = min(len(db_desc), n_max * (NUM_YAWS if db_groups is not None else 1))
    _, idx = index.search(np.ascontiguousarray(q_desc, dtype=np.float32), k)
    tree = cKDTree(utm_db)
    gt = tree.query_ball_point(utm_q, r=thr)
    hits = {n: 0 for n in ns}
    for qi in range(len(q_desc)):
        ranked = [int(i) for i in idx[qi] if i >= 0]
        if db_groups is not None:
            seen, kept = set(), []
            for i in ranked:
                if db_groups[i] not in seen:
                    seen.add(db_groups[i])
                    kept.append(i)
            ranked = kept
        pos = set(gt[qi])
        for n in ns:
            if pos.intersection(ranked[:n]):
                hits[n] += 1
    return {n: 100.0 * hits[n] / max(len(q_desc), 1) for n in ns}


def chance_recall_at_1(
    utm_q: np.ndarray, utm_db: np.ndarray, thr: float = POS_DIST_THR, db_groups: Optional[np.ndarray] = None
) -> float:
    """Expected Recall@1 (percent) of a random ranking: the mean share of database images
    (or of groups, with ``db_groups``) lying within ``thr`` metres of the query."""
    from scipy.spatial import cKDTree

    if len(utm_q) == 0:
        return 0.0
    gt = cKDTree(utm_db).query_ball_point(utm_q, r=thr)
    if db_groups is None:
        return 100.0 * float(np.mean([len(g) / len(utm_db) for g in gt]))
    n_groups = len(np.unique(db_groups))
    return 100.0 * float(np.mean([len(set(db_groups[g])) / n_groups for g in gt]))


def raw_pixel_baseline(root: Path, ns: Sequence[int] = (1, 5)) -> Dict[str, Dict[str, float]]:
    """Raw-pixel Recall@N on the synthetic Pittsburgh test split and on Tokyo day/sunset/night.

    ``root`` is the folder written by ``generate`` (holding ``pitts/`` and ``tokyo247/``).
    Returns per query set ``{"R@N": ..., "chance@1": ..., "queries": ...}`` (percentages).
    """
    root = Path(root)
    results: Dict[str, Dict[str, float]] = {}

    def entry(q, db, utm_q, utm_db, groups=None) -> Dict[str, float]:
        rec = recall_at_n(q, db, utm_q, utm_db, ns, db_groups=groups)
        out = {f"R@{n}": rec[n] for n in ns}
        out["chance@1"] = chance_recall_at_1(utm_q, utm_db, db_groups=groups)
        out["queries"] = float(len(utm_q))
        return out

    pr = root / "pitts"
    p = read_dbstruct(pr / "datasets" / "pitts30k_test.mat")
    db = raw_pixel_descriptors(pr / f for f in p["dbImageFns"])
    q = raw_pixel_descriptors(pr / "queries_real" / f for f in p["qImageFns"])
    results["pitts30k_test"] = entry(q, db, p["utmQ"], p["utmDb"])
    tr = root / "tokyo247"
    t = read_dbstruct(tr / "tokyo247.mat")
    db = raw_pixel_descriptors((tr / "images" / f).with_suffix(".png") for f in t["dbImageFns"])
    groups = np.array([int(f.split("/")[0]) for f in t["dbImageFns"]])
    for cond in CONDITIONS:
        sel = [i for i, f in enumerate(t["qImageFns"]) if Path(f).stem.endswith("_" + cond)]
        q = raw_pixel_descriptors(tr / "query" / t["qImageFns"][i] for i in sel)
        results[f"tokyo247_{cond}"] = entry(q, db, t["utmQ"][sel], t["utmDb"], groups)
    return results
