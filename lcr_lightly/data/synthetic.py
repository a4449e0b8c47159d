"""SyntheticFineGrained: a generated fine-grained data set with part masks.

Made to show the failure LCR addresses, with no files to download:

* **One template, small discriminative parts.** Every image holds one "bird" built
  from the same template (body, head, tail) in the same layout. The class is carried
  only by two small parts: the *shape* of a head mark (circle, square, triangle,
  cross, diamond) and the *texture* of a wing patch (horizontal or vertical stripes,
  checker, dots, ring). The parts cover about 2 % and 4 % of the image (together
  under 10 %).
  Parts are drawn in luminance contrast with a random hue, so SSL colour augmentation
  (which removes hue) leaves the class intact, and hue alone says nothing.
* **Nuisances carry no class information.** Object colour, part colour, position,
  scale (object width 50-70 % of the image), rotation (+-30 degrees) and horizontal
  flip are drawn at random for every image, independently of the class.
* **A distinctive background.** Each image has its own low-frequency colour field and
  8-14 distractors drawn from the same shape and texture vocabulary as the parts,
  so a background is by itself very distinctive per instance (easy for instance
  discrimination) but never tells the class (the parts' shapes appear everywhere).
* **Masks.** Every sample also yields its object mask, its discriminative-part mask
  and the part centres (keypoints, as in CUB's ``part_locs.txt``).
* **Deterministic.** Sample ``i`` of a split is rendered from the seed sequence
  ``(seed, split, i)``; the same arguments always give the same pixels.
* **A generic variant** (``variant="generic"``): other object templates (star, house,
  car, fish, tree, arrow, ring, cross), one class per template, the same nuisances and
  lighter clutter (3-6 small distractors): a coarse-grained set, disjoint from the
  fine-grained classes, on which a backbone is pretrained to stand in for ImageNet
  initialisation. (With the fine variant's heavy clutter, a small CNN trained on a few
  thousand images memorises backgrounds and stays near chance on held-out images.)

Images are rendered at 4x and downsampled (anti-aliased); 32-224 px are supported.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

Point = Tuple[float, float]

HEAD_MARKS = ("circle", "square", "triangle", "cross", "diamond")
WING_TEXTURES = ("hstripes", "vstripes", "checker", "dots", "ring")
GENERIC_TEMPLATES = ("star", "house", "car", "fish", "tree", "arrow", "ring", "cross")
SPLITS = {"train": 0, "test": 1, "val": 2}
_SS = 4  # supersampling factor

# Template geometry in object units (the object spans about [-1, 1]).
_BODY = ((0.0, 0.1), (0.6, 0.45))
_HEAD = ((0.62, -0.38), 0.36)
_TAIL = [(-0.5, 0.05), (-1.0, -0.3), (-1.0, 0.45)]
_MARK = ((0.64, -0.4), 0.26)  # head mark: centre, radius
_WING = ((-0.05, 0.14), 0.36)  # wing patch: centre, radius


def _ellipse(center: Point, radii: Tuple[float, float], n: int = 40) -> List[Point]:
    cx, cy = center
    return [
        (
            cx + radii[0] * math.cos(2 * math.pi * t / n),
            cy + radii[1] * math.sin(2 * math.pi * t / n),
        )
        for t in range(n)
    ]


def _regular(center: Point, radius: float, sides: int, phase: float = 0.0) -> List[Point]:
    cx, cy = center
    return [
        (
            cx + radius * math.cos(phase + 2 * math.pi * t / sides),
            cy + radius * math.sin(phase + 2 * math.pi * t / sides),
        )
        for t in range(sides)
    ]


def _cross(center: Point, radius: float, width: float = 0.36) -> List[Point]:
    cx, cy = center
    r, w = radius, radius * width
    pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
    pts += [(-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    return [(cx + x, cy + y) for x, y in pts]


def _shape(kind: str, center: Point, radius: float) -> List[Point]:
    if kind == "circle":
        return _ellipse(center, (radius, radius), 24)
    if kind == "square":
        return _regular(center, radius * 1.1, 4, math.pi / 4)
    if kind == "triangle":
        return _regular(center, radius * 1.2, 3, -math.pi / 2)
    if kind == "diamond":
        cx, cy = center
        return [
            (cx, cy - radius * 1.15),
            (cx + radius * 0.7, cy),
            (cx, cy + radius * 1.15),
            (cx - radius * 0.7, cy),
        ]
    if kind == "cross":
        return _cross(center, radius * 1.1)
    raise ValueError(kind)


def _texture(kind: str, center: Point, radius: float) -> List[List[Point]]:
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
                    _ellipse(
                        (cx + x + period / 2, cy + y + period / 2), (period / 3.2, period / 3.2), 12
                    )
                )
    elif kind == "ring":
        outer = _ellipse(center, (r * 0.8, r * 0.8), 32)
        polys.append(outer)
        polys.append(_ellipse(center, (r * 0.45, r * 0.45), 32))  # drawn as a hole
    else:
        raise ValueError(kind)
    return polys


def _generic_parts(kind: str) -> List[List[Point]]:
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
            _ellipse((-0.55, 0.45), (0.22, 0.22), 16),
            _ellipse((0.55, 0.45), (0.22, 0.22), 16),
        ]
    if kind == "fish":
        return [_ellipse((0.15, 0.0), (0.7, 0.38)), [(-0.45, 0.0), (-1.0, -0.45), (-1.0, 0.45)]]
    if kind == "tree":
        return [
            [(-0.15, 1.0), (0.15, 1.0), (0.15, 0.3), (-0.15, 0.3)],
            _regular((0.0, -0.15), 0.75, 3, -math.pi / 2),
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
        return [_ellipse((0.0, 0.0), (0.95, 0.95), 40)]
    if kind == "cross":
        return [_cross((0.0, 0.0), 0.95, 0.3)]
    raise ValueError(kind)


def fine_grained_classes(num_classes: int) -> List[Tuple[str, str]]:
    """The (head mark, wing texture) pair of each class.

    Classes walk the 5 x 5 grid diagonally so that any prefix varies both parts.

    Args:
        num_classes: 1 to 25.

    Returns:
        One ``(mark, texture)`` pair per class.
    """
    if not 1 <= num_classes <= len(HEAD_MARKS) * len(WING_TEXTURES):
        raise ValueError(f"num_classes must be in [1, 25], got {num_classes}.")
    pairs = [(HEAD_MARKS[i % 5], WING_TEXTURES[(i + i // 5) % 5]) for i in range(25)]
    return pairs[:num_classes]


def _random_color(
    rng: np.random.Generator, lum: Optional[Tuple[float, float]] = None
) -> Tuple[int, int, int]:
    import colorsys

    h = rng.random()
    s = rng.uniform(0.3, 1.0)
    v = rng.uniform(*(lum or (0.15, 1.0)))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


class SyntheticFineGrained(Dataset):
    """A deterministic, generated fine-grained data set with object and part masks.

    Args:
        num_classes: Number of classes (fine: at most 25; generic: at most 8).
        images_per_class: Images per class in this split.
        image_size: Side in pixels (32-224).
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        seed: Base seed.
        variant: ``"fine"`` (one template, class in small parts) or ``"generic"``
            (one template per class, coarse-grained; for backbone initialisation).
        transform: Applied to the PIL image.
        return_masks: ``__getitem__`` returns ``(image, label, object_mask, part_mask)``
            instead of ``(image, label)``.
        cache: Keep rendered samples in memory.

    Example:
        >>> ds = SyntheticFineGrained(num_classes=10, images_per_class=20, image_size=64)
        >>> sample = ds.sample(0)
        >>> sample["image"].size, sample["part_mask"].shape
        ((64, 64), (64, 64))
    """

    def __init__(
        self,
        num_classes: int = 10,
        images_per_class: int = 50,
        image_size: int = 64,
        split: str = "train",
        seed: int = 0,
        variant: str = "fine",
        transform: Optional[Callable[[Image.Image], Any]] = None,
        return_masks: bool = False,
        cache: bool = True,
    ) -> None:
        if variant not in ("fine", "generic"):
            raise ValueError(f"Unknown variant {variant!r}; expected 'fine' or 'generic'.")
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLITS)}.")
        if not 32 <= image_size <= 224:
            raise ValueError(f"image_size must be in [32, 224], got {image_size}.")
        if images_per_class < 1:
            raise ValueError("images_per_class must be positive.")
        if variant == "fine":
            self.classes = [f"{m}-{t}" for m, t in fine_grained_classes(num_classes)]
            self._pairs = fine_grained_classes(num_classes)
        else:
            if not 1 <= num_classes <= len(GENERIC_TEMPLATES):
                raise ValueError(
                    f"The generic variant has at most {len(GENERIC_TEMPLATES)} classes."
                )
            self.classes = list(GENERIC_TEMPLATES[:num_classes])
            self._pairs = []
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.variant = variant
        self.transform = transform
        self.return_masks = return_masks
        self.cache = cache
        self._cache: Dict[int, Dict[str, Any]] = {}
        self.targets = [i // images_per_class for i in range(len(self))]

    def with_transform(self, transform: Optional[Callable]) -> SyntheticFineGrained:
        """The same samples under another transform, sharing the rendered images.

        Args:
            transform: The new transform (the masks option and everything else is kept).

        Returns:
            A shallow copy whose renders are cached in (and read from) this set's cache.
        """
        other = copy.copy(self)
        other.transform = transform
        return other

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        s = self.sample(index)
        image = self.transform(s["image"]) if self.transform is not None else s["image"]
        if self.return_masks:
            return (
                image,
                s["label"],
                torch.from_numpy(s["object_mask"]),
                torch.from_numpy(s["part_mask"]),
            )
        return image, s["label"]

    def sample(self, index: int) -> Dict[str, Any]:
        """Renders sample ``index``.

        Args:
            index: Sample index.

        Returns:
            ``image`` (PIL RGB), ``label``, ``object_mask`` and ``part_mask`` (uint8
            arrays, H x W, 1 inside), ``part_centers`` (list of ``(x, y)`` pixels, head
            mark then wing patch; empty for the generic variant), ``bbox``
            ``(x, y, w, h)`` of the object mask, and the RGB ``body_color`` and
            ``part_color`` (drawn at random, independent of the class).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples.")
        if index in self._cache:
            return self._cache[index]
        out = self._render(index)
        if self.cache:
            self._cache[index] = out
        return out

    # --- rendering -------------------------------------------------------------
    def _render(self, index: int) -> Dict[str, Any]:
        label = index // self.images_per_class
        salt = 0 if self.variant == "fine" else 7
        rng = np.random.default_rng([self.seed, SPLITS[self.split], salt, index])
        size = self.image_size * _SS
        image = self._background(rng, size)
        draw = ImageDraw.Draw(image)
        if self.variant == "fine":
            self._clutter(rng, draw, size, count=(8, 15), scale=(0.03, 0.1))
        else:
            self._clutter(rng, draw, size, count=(3, 7), scale=(0.03, 0.07))
        obj_mask = Image.new("L", (size, size), 0)
        part_mask = Image.new("L", (size, size), 0)
        od, pd = ImageDraw.Draw(obj_mask), ImageDraw.Draw(part_mask)

        width = rng.uniform(0.5, 0.7) * size  # object width in pixels
        unit = width / 2
        angle = math.radians(rng.uniform(-30, 30))
        flip = rng.random() < 0.5
        margin = unit * 0.9
        cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
        cos_a, sin_a = math.cos(angle), math.sin(angle)

        def tf(points: Sequence[Point]) -> List[Point]:
            out = []
            for x, y in points:
                x = -x if flip else x
                out.append(
                    (cx + unit * (cos_a * x - sin_a * y), cy + unit * (sin_a * x + cos_a * y))
                )
            return out

        dark_parts = rng.random() < 0.5
        body_color = _random_color(rng, (0.65, 1.0) if dark_parts else (0.15, 0.45))
        part_color = _random_color(rng, (0.0, 0.3) if dark_parts else (0.8, 1.0))
        centers: List[Point] = []
        if self.variant == "fine":
            for poly in (_ellipse(*_BODY), _ellipse(_HEAD[0], (_HEAD[1], _HEAD[1]), 28), _TAIL):
                draw.polygon(tf(poly), fill=body_color)
                od.polygon(tf(poly), fill=255)
            mark, texture = self._pairs[label]
            mark_poly = tf(_shape(mark, *_MARK))
            draw.polygon(mark_poly, fill=part_color)
            pd.polygon(tf(_ellipse(_MARK[0], (_MARK[1] * 1.2, _MARK[1] * 1.2), 20)), fill=255)
            disk = Image.new("L", (size, size), 0)
            ImageDraw.Draw(disk).polygon(tf(_ellipse(_WING[0], (_WING[1], _WING[1]), 32)), fill=255)
            tex = Image.new("L", (size, size), 0)
            td = ImageDraw.Draw(tex)
            polys = _texture(texture, *_WING)
            for k, poly in enumerate(polys):
                hole = texture == "ring" and k == 1
                td.polygon(tf(poly), fill=0 if hole else 255)
            clip = Image.fromarray(np.minimum(np.asarray(disk), np.asarray(tex)))
            image.paste(part_color, (0, 0), clip)
            pd.polygon(tf(_ellipse(_WING[0], (_WING[1], _WING[1]), 32)), fill=255)
            centers = [tf([_MARK[0]])[0], tf([_WING[0]])[0]]
        else:
            for poly in _generic_parts(self.classes[label]):
                draw.polygon(tf(poly), fill=body_color)
                od.polygon(tf(poly), fill=255)
            # a random decoration (no class information)
            deco = tf(
                _shape(
                    HEAD_MARKS[rng.integers(5)],
                    (rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2)),
                    0.15,
                )
            )
            draw.polygon(deco, fill=part_color)

        small = self.image_size
        image = image.resize((small, small), Image.Resampling.LANCZOS)
        om = (np.asarray(obj_mask.resize((small, small), Image.Resampling.BILINEAR)) >= 128).astype(
            np.uint8
        )
        pm = (
            np.asarray(part_mask.resize((small, small), Image.Resampling.BILINEAR)) >= 128
        ).astype(np.uint8)
        if self.variant == "fine":
            pm &= om  # the head mark's disk may overhang the head outline
        ys, xs = np.nonzero(om)
        bbox = (
            (
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            )
            if len(xs)
            else (0, 0, 0, 0)
        )
        return {
            "image": image,
            "label": label,
            "object_mask": om,
            "part_mask": pm,
            "part_centers": [(x / _SS, y / _SS) for x, y in centers],
            "bbox": bbox,
            "body_color": body_color,
            "part_color": part_color,
        }

    @staticmethod
    def _background(rng: np.random.Generator, size: int) -> Image.Image:
        low = 8
        field = rng.uniform(0, 255, size=(low, low, 3)).astype(np.uint8)
        bg = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
        return bg.convert("RGB")

    @staticmethod
    def _clutter(
        rng: np.random.Generator,
        draw: ImageDraw.ImageDraw,
        size: int,
        count: Tuple[int, int],
        scale: Tuple[float, float],
    ) -> None:
        for _ in range(int(rng.integers(*count))):
            kind = rng.integers(3)
            c = (rng.uniform(0, size), rng.uniform(0, size))
            r = rng.uniform(*scale) * size
            color = _random_color(rng)
            if kind == 0:
                poly = _shape(HEAD_MARKS[rng.integers(5)], c, r)
            elif kind == 1:
                poly = _ellipse(c, (r * rng.uniform(0.5, 1.5), r * rng.uniform(0.5, 1.5)), 16)
            else:
                texture = WING_TEXTURES[rng.integers(5)]
                for k, p in enumerate(_texture(texture, c, r)):
                    hole = texture == "ring" and k == 1
                    draw.polygon(p, fill=_random_color(rng) if hole else color)
                continue
            ang = rng.uniform(0, 2 * math.pi)
            ca, sa = math.cos(ang), math.sin(ang)
            poly = [
                (c[0] + ca * (x - c[0]) - sa * (y - c[1]), c[1] + sa * (x - c[0]) + ca * (y - c[1]))
                for x, y in poly
            ]
            draw.polygon(poly, fill=color)
