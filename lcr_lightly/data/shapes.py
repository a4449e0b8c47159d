"""The vector drawings of :class:`~lcr_lightly.data.SyntheticFineGrained`.

Polygons in object units (the object spans about [-1, 1]; the data set scales, rotates
and flips them): the bird template (body, head, tail), the five head marks and five
wing textures that carry the fine-grained class, the eight generic templates, and the
random colours of objects, parts and distractors. Nothing here draws pixels.
"""

from __future__ import annotations

import colorsys
import math
from typing import List, Optional, Tuple

import numpy as np

Point = Tuple[float, float]

HEAD_MARKS = ("circle", "square", "triangle", "cross", "diamond")
WING_TEXTURES = ("hstripes", "vstripes", "checker", "dots", "ring")
GENERIC_TEMPLATES = ("star", "house", "car", "fish", "tree", "arrow", "ring", "cross")

# Template geometry in object units (the object spans about [-1, 1]).
BODY = ((0.0, 0.1), (0.6, 0.45))
HEAD = ((0.62, -0.38), 0.36)
TAIL = [(-0.5, 0.05), (-1.0, -0.3), (-1.0, 0.45)]
MARK = ((0.64, -0.4), 0.26)  # head mark: centre, radius
WING = ((-0.05, 0.14), 0.36)  # wing patch: centre, radius


def ellipse(center: Point, radii: Tuple[float, float], n: int = 40) -> List[Point]:
    """``n`` points on an ellipse (a circle when both radii are equal)."""
    cx, cy = center
    return [
        (
            cx + radii[0] * math.cos(2 * math.pi * t / n),
            cy + radii[1] * math.sin(2 * math.pi * t / n),
        )
        for t in range(n)
    ]


def regular_polygon(center: Point, radius: float, sides: int, phase: float = 0.0) -> List[Point]:
    """A regular polygon of ``sides`` vertices on a circle, the first at angle ``phase``."""
    cx, cy = center
    return [
        (
            cx + radius * math.cos(phase + 2 * math.pi * t / sides),
            cy + radius * math.sin(phase + 2 * math.pi * t / sides),
        )
        for t in range(sides)
    ]


def cross_polygon(center: Point, radius: float, width: float = 0.36) -> List[Point]:
    """A plus sign of half-length ``radius``, its arms ``2 * width * radius`` wide."""
    cx, cy = center
    r, w = radius, radius * width
    pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
    pts += [(-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    return [(cx + x, cy + y) for x, y in pts]


def mark_polygon(kind: str, center: Point, radius: float) -> List[Point]:
    """The polygon of a head mark (one of :data:`HEAD_MARKS`), about ``radius`` in size."""
    if kind == "circle":
        return ellipse(center, (radius, radius), 24)
    if kind == "square":
        return regular_polygon(center, radius * 1.1, 4, math.pi / 4)
    if kind == "triangle":
        return regular_polygon(center, radius * 1.2, 3, -math.pi / 2)
    if kind == "diamond":
        cx, cy = center
        return [
            (cx, cy - radius * 1.15),
            (cx + radius * 0.7, cy),
            (cx, cy + radius * 1.15),
            (cx - radius * 0.7, cy),
        ]
    if kind == "cross":
        return cross_polygon(center, radius * 1.1)
    raise ValueError(kind)


def texture_polygons(kind: str, center: Point, radius: float) -> List[List[Point]]:
    """Polygons of a texture inside a disk (clipped by the caller)."""
    cx, cy = center
    r = radius
    period = r / 1.6
    polys: List[List[Point]] = []
    steps = np.arange(-r, r + 1e-6, period)
    if kind == "hstripes":
        for y in steps:
            polys.append(
                [
                    (cx - r, cy + y),
                    (cx + r, cy + y),
                    (cx + r, cy + y + period / 2),
                    (cx - r, cy + y + period / 2),
                ]
            )
    elif kind == "vstripes":
        for x in steps:
            polys.append(
                [
                    (cx + x, cy - r),
                    (cx + x + period / 2, cy - r),
                    (cx + x + period / 2, cy + r),
                    (cx + x, cy + r),
                ]
            )
    elif kind == "checker":
        for i, x in enumerate(steps):
            for j, y in enumerate(steps):
                if (i + j) % 2 == 0:
                    polys.append(
                        [
                            (cx + x, cy + y),
                            (cx + x + period, cy + y),
                            (cx + x + period, cy + y + period),
                            (cx + x, cy + y + period),
                        ]
                    )
    elif kind == "dots":
        for x in steps[:-1]:
            for y in steps[:-1]:
                polys.append(
                    ellipse(
                        (cx + x + period / 2, cy + y + period / 2), (period / 3.2, period / 3.2), 12
                    )
                )
    elif kind == "ring":
        outer = ellipse(center, (r * 0.8, r * 0.8), 32)
        polys.append(outer)
        polys.append(ellipse(center, (r * 0.45, r * 0.45), 32))  # drawn as a hole
    else:
        raise ValueError(kind)
    return polys


def generic_polygons(kind: str) -> List[List[Point]]:
    """The polygons of a generic template (one of :data:`GENERIC_TEMPLATES`)."""
    if kind == "star":
        pts = []
        for t in range(10):
            rad = 1.0 if t % 2 == 0 else 0.42
            pts.append(
                (
                    rad * math.cos(-math.pi / 2 + math.pi * t / 5),
                    rad * math.sin(-math.pi / 2 + math.pi * t / 5),
                )
            )
        return [pts]
    if kind == "house":
        return [
            [(-0.7, 0.9), (0.7, 0.9), (0.7, -0.1), (-0.7, -0.1)],
            [(-0.95, -0.1), (0.0, -0.95), (0.95, -0.1)],
        ]
    if kind == "car":
        return [
            [
                (-1.0, 0.35),
                (1.0, 0.35),
                (1.0, -0.1),
                (0.5, -0.15),
                (0.25, -0.55),
                (-0.45, -0.55),
                (-0.7, -0.1),
                (-1.0, -0.1),
            ],
            ellipse((-0.55, 0.45), (0.22, 0.22), 16),
            ellipse((0.55, 0.45), (0.22, 0.22), 16),
        ]
    if kind == "fish":
        return [ellipse((0.15, 0.0), (0.7, 0.38)), [(-0.45, 0.0), (-1.0, -0.45), (-1.0, 0.45)]]
    if kind == "tree":
        return [
            [(-0.15, 1.0), (0.15, 1.0), (0.15, 0.3), (-0.15, 0.3)],
            regular_polygon((0.0, -0.15), 0.75, 3, -math.pi / 2),
        ]
    if kind == "arrow":
        return [
            [
                (-1.0, -0.2),
                (0.2, -0.2),
                (0.2, -0.6),
                (1.0, 0.0),
                (0.2, 0.6),
                (0.2, 0.2),
                (-1.0, 0.2),
            ]
        ]
    if kind == "ring":
        return [ellipse((0.0, 0.0), (0.95, 0.95), 40)]
    if kind == "cross":
        return [cross_polygon((0.0, 0.0), 0.95, 0.3)]
    raise ValueError(kind)


def random_color(
    rng: np.random.Generator, lum: Optional[Tuple[float, float]] = None
) -> Tuple[int, int, int]:
    """A random RGB colour with value (HSV) drawn from ``lum`` (0.15-1 by default)."""
    h = rng.random()
    s = rng.uniform(0.3, 1.0)
    v = rng.uniform(*(lum or (0.15, 1.0)))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)
