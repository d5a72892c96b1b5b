"""The synthetic city: the vectorised 2.5D ray caster of street views (camera, light, occluders)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .city import (
    CONDITIONS,
    GLYPH_COLS,
    GLYPH_ROWS,
    LAMP,
    LAMP_HEAD_R,
    LAMP_HEAD_Z,
    LAMP_POLE_R,
    LAMP_POLE_Z,
    TREE,
    TREE_CROWN_R,
    TREE_CROWN_Z,
    TREE_TRUNK_R,
    TREE_TRUNK_Z,
    City,
)

logger = logging.getLogger(__name__)


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
