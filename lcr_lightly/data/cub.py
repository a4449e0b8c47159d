"""CUB-200-2011 from its official files, and with object and part masks for localisation.

:class:`CUB200` reads the extracted ``CUB_200_2011`` folder (``$LCR_CUB_ROOT``, or
``$LCR_DATA_ROOT/CUB_200_2011``); :class:`CUBLocalization` adds, to each evaluated
image, the bounding box and part-keypoint disks mapped through the evaluation
transform, for :mod:`lcr_lightly.eval.localization`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lcr_lightly.data.files import DatasetNotFoundError, PathLike, read_image, resolve_root
from lcr_lightly.data.masks import box_mask, keypoint_masks
from lcr_lightly.data.transforms import eval_geometry, eval_transform


def _require(path: Path, what: str, name: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(
            f"{name}: expected {what} at {path}, but it is missing. Extract the official "
            "archive so that this file exists (nothing is downloaded)."
        )
    return path


def _read_table(path: Path, name: str, columns: int) -> List[List[str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < columns:
            raise DatasetNotFoundError(
                f"{name}: malformed line {n} in {path} (expected {columns} columns): {line!r}"
            )
        rows.append(parts)
    return rows


class CUB200(Dataset):
    """CUB-200-2011 from the official files.

    Reads ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
    ``classes.txt``, ``bounding_boxes.txt`` and ``parts/part_locs.txt`` under ``root``
    (the extracted ``CUB_200_2011`` folder).

    Args:
        root: The ``CUB_200_2011`` folder; ``$LCR_CUB_ROOT`` when None.
        split: ``"train"``, ``"test"`` or ``"all"``.
        transform: Applied to the PIL image.
        loader: Image loader (:func:`read_image` by default).

    Attributes:
        targets: 0-based labels of the split.
        classes: Class names.
    """

    name = "CUB-200-2011"

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[[Image.Image], Any]] = None,
        loader: Optional[Callable[[str], Image.Image]] = None,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"Unknown split {split!r}; expected 'train', 'test' or 'all'.")
        self.root = resolve_root(root, "LCR_CUB_ROOT", self.name)
        self.transform = transform
        self.loader = loader or read_image
        r = self.root
        images = _read_table(_require(r / "images.txt", "images.txt", self.name), self.name, 2)
        labels = dict(
            _read_table(
                _require(r / "image_class_labels.txt", "image_class_labels.txt", self.name),
                self.name,
                2,
            )
        )
        is_train = dict(
            _read_table(
                _require(r / "train_test_split.txt", "train_test_split.txt", self.name),
                self.name,
                2,
            )
        )
        self.classes = self._classes(r)
        self.boxes: Dict[str, Tuple[float, float, float, float]] = {}
        if (r / "bounding_boxes.txt").exists():
            for row in _read_table(r / "bounding_boxes.txt", self.name, 5):
                self.boxes[row[0]] = (float(row[1]), float(row[2]), float(row[3]), float(row[4]))
        self.part_locs: Dict[str, List[Tuple[int, float, float, bool]]] = {}
        if (r / "parts" / "part_locs.txt").exists():
            for row in _read_table(r / "parts" / "part_locs.txt", self.name, 5):
                self.part_locs.setdefault(row[0], []).append(
                    (int(row[1]), float(row[2]), float(row[3]), row[4] == "1")
                )
        self.samples: List[Tuple[str, str, int]] = []
        for image_id, rel_path in images:
            if image_id not in labels or image_id not in is_train:
                raise DatasetNotFoundError(
                    f"{self.name}: image id {image_id} of images.txt has no label or split in {r}."
                )
            train = is_train[image_id] == "1"
            if split == "all" or (split == "train") == train:
                self.samples.append((image_id, rel_path, int(labels[image_id]) - 1))
        if not self.samples:
            raise DatasetNotFoundError(f"{self.name}: no {split} images listed under {r}.")
        first = r / "images" / self.samples[0][1]
        _require(first, "the image files listed in images.txt", self.name)
        self.targets = [s[2] for s in self.samples]

    def _classes(self, r: Path) -> List[str]:
        path = r / "classes.txt"
        if not path.exists():
            return []
        return [row[1] for row in _read_table(path, self.name, 2)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        _, rel_path, label = self.samples[index]
        image = self.loader(str(self.root / "images" / rel_path))
        return (self.transform(image) if self.transform else image), label

    def bbox(self, index: int) -> Optional[Tuple[float, float, float, float]]:
        """Bounding box ``(x, y, w, h)`` of sample ``index`` in pixels, if known."""
        return self.boxes.get(self.samples[index][0])

    def parts(self, index: int, visible_only: bool = True) -> List[Tuple[int, float, float]]:
        """Part keypoints ``(part_id, x, y)`` of sample ``index`` in pixels."""
        locs = self.part_locs.get(self.samples[index][0], [])
        return [(p, x, y) for p, x, y, v in locs if v or not visible_only]


# Part disk radius as a fraction of the crop side (14 px at 224, 2 px at 32).
PART_RADIUS_FRACTION = 1 / 16


class CUBLocalization(Dataset):
    """CUB-200-2011 with object and part masks, for the localisation metrics.

    Each item is ``(image, label, object_mask, part_mask)``, the layout of the
    synthetic set with ``return_masks=True``: the image through
    ``eval_transform(image_size)``, the bounding box and disks around the visible part
    keypoints mapped through the same resize and centre crop
    (:func:`~lcr_lightly.data.transforms.eval_geometry`) and clipped to the crop. A
    pixel is inside the box when its centre is.

    The disk radius defaults to ``image_size / 16`` (``PART_RADIUS_FRACTION``; 14 px at
    224): about an eye or a beak at CUB's usual bird sizes, and half a cell of a
    stride-32 feature map at 224, so that the union of up to 15 keypoint disks stays a
    set of parts instead of filling the box. Every metric comes with its chance level
    (the mean mask area), which moves with the radius.

    Args:
        cub: The split (its own ``transform`` is not used).
        image_size: Crop size of the evaluation transform.
        part_radius: Disk radius in pixels of the evaluated image; ``image_size / 16``
            when None.

    Attributes:
        targets: 0-based labels, as ``cub.targets``.
        classes: Class names, as ``cub.classes``.

    Raises:
        DatasetNotFoundError: If the root has no ``bounding_boxes.txt`` or
            ``parts/part_locs.txt``, or an image of the split has no box.
    """

    def __init__(
        self, cub: CUB200, image_size: int = 224, part_radius: Optional[float] = None
    ) -> None:
        missing = [
            name
            for name, table in (
                ("bounding_boxes.txt", cub.boxes),
                ("parts/part_locs.txt", cub.part_locs),
            )
            if not table
        ]
        if missing:
            raise DatasetNotFoundError(
                f"{cub.name}: localisation needs {' and '.join(missing)} under {cub.root} "
                "(missing or empty); extract the full official archive."
            )
        no_box = [image_id for image_id, _, _ in cub.samples if image_id not in cub.boxes]
        if no_box:
            raise DatasetNotFoundError(
                f"{cub.name}: {len(no_box)} image(s) of the split have no bounding box in "
                f"{cub.root / 'bounding_boxes.txt'} (first image id {no_box[0]})."
            )
        if part_radius is not None and part_radius <= 0:
            raise ValueError(f"part_radius must be positive, got {part_radius}.")
        self.cub = cub
        self.image_size = image_size
        self.part_radius = (
            image_size * PART_RADIUS_FRACTION if part_radius is None else float(part_radius)
        )
        self.transform = eval_transform(image_size)
        self.targets = cub.targets
        self.classes = cub.classes

    def __len__(self) -> int:
        return len(self.cub)

    def __getitem__(self, index: int) -> Tuple[Tensor, int, Tensor, Tensor]:
        """Sample ``index``.

        Returns:
            The image (3, S, S), the label, the object mask (S, S) and the part mask
            (S, S) (``uint8``, 1 inside), S being ``image_size``.
        """
        image_id, rel_path, label = self.cub.samples[index]
        image = self.cub.loader(str(self.cub.root / "images" / rel_path))
        g = eval_geometry(image.width, image.height, self.image_size)
        size = self.image_size
        box = g.box(*self.cub.boxes[image_id])  # every sample has one (__init__)
        obj = box_mask(box, size)
        points = [g.point(x, y) for _, x, y in self.cub.parts(index)]
        part = keypoint_masks([points], (size, size), self.part_radius)[0].to(torch.uint8)
        return self.transform(image), label, obj, part
