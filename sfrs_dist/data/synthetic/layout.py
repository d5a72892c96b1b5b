"""The synthetic city: where places, database views and queries are, and their light and occluders."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from .city import (
    City,
    _random_colours,
)
from .render import (
    Camera,
    Light,
    Occluders,
)

logger = logging.getLogger(__name__)


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
