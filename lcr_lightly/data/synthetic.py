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

from lcr_lightly.data.shapes import (
    BODY,
    GENERIC_TEMPLATES,
    HEAD,
    HEAD_MARKS,
    MARK,
    TAIL,
    WING,
    WING_TEXTURES,
    Point,
    ellipse,
    generic_polygons,
    mark_polygon,
    random_color,
    texture_polygons,
)

SPLITS = {"train": 0, "test": 1, "val": 2}
SUPERSAMPLE = 4  # rendered at 4x, then downsampled (anti-aliased)


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
        size = self.image_size * SUPERSAMPLE
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
        body_color = random_color(rng, (0.65, 1.0) if dark_parts else (0.15, 0.45))
        part_color = random_color(rng, (0.0, 0.3) if dark_parts else (0.8, 1.0))
        centers: List[Point] = []
        if self.variant == "fine":
            for poly in (
                ellipse(*BODY),
                ellipse(HEAD[0], (HEAD[1], HEAD[1]), 28),
                TAIL,
            ):
                draw.polygon(tf(poly), fill=body_color)
                od.polygon(tf(poly), fill=255)
            mark, texture = self._pairs[label]
            mark_poly = tf(mark_polygon(mark, *MARK))
            draw.polygon(mark_poly, fill=part_color)
            pd.polygon(
                tf(ellipse(MARK[0], (MARK[1] * 1.2, MARK[1] * 1.2), 20)),
                fill=255,
            )
            disk = Image.new("L", (size, size), 0)
            ImageDraw.Draw(disk).polygon(tf(ellipse(WING[0], (WING[1], WING[1]), 32)), fill=255)
            tex = Image.new("L", (size, size), 0)
            td = ImageDraw.Draw(tex)
            polys = texture_polygons(texture, *WING)
            for k, poly in enumerate(polys):
                hole = texture == "ring" and k == 1
                td.polygon(tf(poly), fill=0 if hole else 255)
            clip = Image.fromarray(np.minimum(np.asarray(disk), np.asarray(tex)))
            image.paste(part_color, (0, 0), clip)
            pd.polygon(tf(ellipse(WING[0], (WING[1], WING[1]), 32)), fill=255)
            centers = [tf([MARK[0]])[0], tf([WING[0]])[0]]
        else:
            for poly in generic_polygons(self.classes[label]):
                draw.polygon(tf(poly), fill=body_color)
                od.polygon(tf(poly), fill=255)
            # a random decoration (no class information)
            deco = tf(
                mark_polygon(
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
            "part_centers": [(x / SUPERSAMPLE, y / SUPERSAMPLE) for x, y in centers],
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
            color = random_color(rng)
            if kind == 0:
                poly = mark_polygon(HEAD_MARKS[rng.integers(5)], c, r)
            elif kind == 1:
                poly = ellipse(c, (r * rng.uniform(0.5, 1.5), r * rng.uniform(0.5, 1.5)), 16)
            else:
                texture = WING_TEXTURES[rng.integers(5)]
                for k, p in enumerate(texture_polygons(texture, c, r)):
                    hole = texture == "ring" and k == 1
                    draw.polygon(p, fill=random_color(rng) if hole else color)
                continue
            ang = rng.uniform(0, 2 * math.pi)
            ca, sa = math.cos(ang), math.sin(ang)
            poly = [
                (c[0] + ca * (x - c[0]) - sa * (y - c[1]), c[1] + sa * (x - c[0]) + ca * (y - c[1]))
                for x, y in poly
            ]
            draw.polygon(poly, fill=color)
