"""The synthetic city: formats' constants and the city model (street grid, facades, windows, signs, trees, lamps)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

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
