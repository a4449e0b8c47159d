"""Loaders for the paper's data sets, from local roots only (nothing is downloaded).

Each loader takes ``root`` or reads an environment variable, and a missing or
malformed root raises :class:`DatasetNotFoundError` naming the file it expected where.

========================  ======================  ==========================================
data set                  environment variable    expected under root
========================  ======================  ==========================================
CUB-200-2011              ``LCR_CUB_ROOT``        ``images.txt``, ``images/``, ... (official)
Stanford Cars             ``LCR_CARS_ROOT``       torchvision layout (``stanford_cars/``)
FGVC-Aircraft             ``LCR_AIRCRAFT_ROOT``   torchvision layout (``fgvc-aircraft-2013b/``)
CIFAR-100                 ``LCR_CIFAR100_ROOT``   ``cifar-100-python/{train,test,meta}``
any ImageFolder           (argument)              ``<class>/<image>`` folders
========================  ======================  ==========================================

``LCR_DATA_ROOT`` is a common fallback: ``$LCR_DATA_ROOT/CUB_200_2011`` and so on.

An image file that cannot be decoded (truncated, empty, not an image) stops training or
evaluation with :class:`UnreadableImageError` naming the file, in every loader that reads
files (CUB, Stanford Cars, FGVC-Aircraft, ImageFolder); it is never skipped, because a
skipped image silently changes the data set and every number computed on it. CIFAR-100
has no image files: an unreadable archive is refused when the data set is built.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets

from lcr_lightly.data.transforms import eval_geometry, eval_transform

PathLike = Union[str, os.PathLike]
_D = TypeVar("_D", bound=Dataset)


class DatasetNotFoundError(FileNotFoundError):
    """A data set root is missing or does not have the expected files."""


class UnreadableImageError(DatasetNotFoundError):
    """An image file of a data set cannot be decoded (message: one line naming it)."""


def read_image(path: PathLike) -> Image.Image:
    """Reads an image file as RGB, naming the file if it cannot be decoded.

    Args:
        path: The image file.

    Returns:
        The decoded RGB image.

    Raises:
        UnreadableImageError: If the file is missing, truncated or not an image.
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as err:  # includes PIL's UnidentifiedImageError and truncated files
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UnreadableImageError(
            f"unreadable image {path} ({reason}); replace or remove the file"
        ) from None


_DEFAULT_DIRS = {
    "LCR_CUB_ROOT": "CUB_200_2011",
    "LCR_CARS_ROOT": "",
    "LCR_AIRCRAFT_ROOT": "",
    "LCR_CIFAR100_ROOT": "",
}


def resolve_root(root: Optional[PathLike], env: str, name: str) -> Path:
    """Finds a data set root from an argument, its variable, or ``LCR_DATA_ROOT``.

    Args:
        root: Explicit root, or None.
        env: The data set's environment variable.
        name: Human-readable data set name for the error message.

    Returns:
        The root path (existing).

    Raises:
        DatasetNotFoundError: If no root is given or it does not exist.
    """
    if root is None and os.environ.get(env):
        root = os.environ[env]
    if root is None and os.environ.get("LCR_DATA_ROOT"):
        root = Path(os.environ["LCR_DATA_ROOT"]) / _DEFAULT_DIRS.get(env, "")
    if root is None:
        raise DatasetNotFoundError(
            f"No root for {name}: pass root=... or set {env} (or LCR_DATA_ROOT). "
            "lcr-lightly never downloads data sets."
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{name} root {path} does not exist. Put the extracted data set there or point "
            f"{env} at it; nothing is downloaded."
        )
    return path


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
        from lcr_lightly.eval.localization import keypoint_masks  # the eval package is heavy

        image_id, rel_path, label = self.cub.samples[index]
        image = self.cub.loader(str(self.cub.root / "images" / rel_path))
        g = eval_geometry(image.width, image.height, self.image_size)
        size = self.image_size
        x0, y0, x1, y1 = g.box(*self.cub.boxes[image_id])  # every sample has one (__init__)
        centres = torch.arange(size, dtype=torch.float64) + 0.5
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        obj = (rows[:, None] & cols[None, :]).to(torch.uint8)
        points = [g.point(x, y) for _, x, y in self.cub.parts(index)]
        part = keypoint_masks([points], (size, size), self.part_radius)[0].to(torch.uint8)
        return self.transform(image), label, obj, part


def _torchvision(factory: Callable[[], _D], name: str, root: Path, layout: str) -> _D:
    try:
        return factory()
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetNotFoundError(
            f"{name} not found or incomplete under {root}: expected {layout}. "
            f"(torchvision said: {err}) Nothing is downloaded."
        ) from err


class _NamedStanfordCars(datasets.StanfordCars):
    """torchvision's Stanford Cars; an undecodable image is named (any torchvision)."""

    def __getitem__(self, idx: int) -> Tuple[Any, Any]:
        path, target = self._samples[idx]
        image = read_image(path)
        return (self.transform(image) if self.transform else image), target


class _NamedFGVCAircraft(datasets.FGVCAircraft):
    """torchvision's FGVC-Aircraft; an undecodable image is named (any torchvision)."""

    def __getitem__(self, idx: int) -> Tuple[Any, Any]:
        image = read_image(self._image_files[idx])
        return (self.transform(image) if self.transform else image), self._labels[idx]


def stanford_cars(
    root: Optional[PathLike] = None, split: str = "train", transform: Optional[Callable] = None
) -> Dataset:
    """Stanford Cars through torchvision (``download=False``).

    Args:
        root: Folder that contains ``stanford_cars/`` (torchvision layout);
            ``$LCR_CARS_ROOT`` when None.
        split: ``"train"`` or ``"test"``.
        transform: Applied to the PIL image.

    Returns:
        The torchvision data set.
    """
    path = resolve_root(root, "LCR_CARS_ROOT", "Stanford Cars")
    return _torchvision(
        lambda: _NamedStanfordCars(str(path), split=split, transform=transform, download=False),
        "Stanford Cars",
        path,
        "stanford_cars/devkit/{cars_meta.mat, cars_train_annos.mat}, stanford_cars/"
        "cars_test_annos_withlabels.mat, stanford_cars/cars_{train,test}/*.jpg",
    )


def fgvc_aircraft(
    root: Optional[PathLike] = None, split: str = "trainval", transform: Optional[Callable] = None
) -> Dataset:
    """FGVC-Aircraft (variant level, 100 classes) through torchvision (``download=False``).

    Args:
        root: Folder that contains ``fgvc-aircraft-2013b/``; ``$LCR_AIRCRAFT_ROOT``.
        split: ``"train"``, ``"val"``, ``"trainval"`` or ``"test"``.
        transform: Applied to the PIL image.

    Returns:
        The torchvision data set.
    """
    path = resolve_root(root, "LCR_AIRCRAFT_ROOT", "FGVC-Aircraft")
    return _torchvision(
        lambda: _NamedFGVCAircraft(
            str(path), split=split, annotation_level="variant", transform=transform, download=False
        ),
        "FGVC-Aircraft",
        path,
        "fgvc-aircraft-2013b/data/{variants.txt, images_variant_<split>.txt, images/*.jpg}",
    )


class _LocalCIFAR100(datasets.CIFAR100):
    """CIFAR-100 parsed by torchvision; files must exist, checksums are not required.

    torchvision compares the files with its download's checksums; a local copy may be
    re-packed, and only its format matters here.
    """

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((base / f).exists() for f in files)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def cifar100(
    root: Optional[PathLike] = None, split: str = "train", transform: Optional[Callable] = None
) -> Dataset:
    """CIFAR-100 (python version) through torchvision's parser.

    Args:
        root: Folder that contains ``cifar-100-python/``; ``$LCR_CIFAR100_ROOT``.
        split: ``"train"`` or ``"test"``.
        transform: Applied to the PIL image.

    Returns:
        The data set.
    """
    path = resolve_root(root, "LCR_CIFAR100_ROOT", "CIFAR-100")
    return _torchvision(
        lambda: _LocalCIFAR100(
            str(path), train=split == "train", transform=transform, download=False
        ),
        "CIFAR-100",
        path,
        "cifar-100-python/{train, test, meta}",
    )


class _SharedClassesImageFolder(datasets.ImageFolder):
    """An ImageFolder whose labels index a given class list (e.g. the training split's).

    The folder may lack some of the classes (a test split without images of a class);
    a sub-folder that is not in the list is refused.
    """

    def __init__(
        self, root: str, classes: Sequence[str], transform: Optional[Callable] = None
    ) -> None:
        self.shared_classes = [str(c) for c in classes]
        if len(set(self.shared_classes)) != len(self.shared_classes):
            raise ValueError(f"classes has duplicate names: {self.shared_classes}.")
        super().__init__(root, transform=transform, loader=read_image)
        self.classes = self.shared_classes
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def find_classes(self, directory: Union[str, os.PathLike]) -> Tuple[List[str], Dict[str, int]]:
        """The folder's classes, indexed by their position in the shared list."""
        found, _ = super().find_classes(directory)
        index = {name: i for i, name in enumerate(self.shared_classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise ValueError(
                f"ImageFolder {directory} has {len(unknown)} class folder(s) that the "
                f"given classes (e.g. the training split's) lack: {shown}. Their labels "
                "would mean nothing to a model trained on the other classes; remove them "
                "or add them to the training split."
            )
        return found, {name: index[name] for name in found}


def image_folder(
    root: PathLike,
    transform: Optional[Callable] = None,
    classes: Optional[Sequence[str]] = None,
) -> datasets.ImageFolder:
    """Any ``root/<class>/<image>`` folder through torchvision's ImageFolder.

    Each split of a data set must use the same class list, otherwise a test split that
    lacks a class shifts every later label: build the training split first and pass
    its ``classes`` to the others.

    Example:
        >>> train = image_folder("data/train", transform)
        >>> test = image_folder("data/test", transform, classes=train.classes)

    Args:
        root: The folder.
        transform: Applied to the PIL image.
        classes: Class names whose positions are the labels (sub-folders may be a
            subset); the sorted sub-folder names when None.

    Returns:
        The data set (``classes`` and ``class_to_idx`` describe the shared list).

    Raises:
        DatasetNotFoundError: If the folder does not exist or holds no images.
        ValueError: If a sub-folder is not one of ``classes``.
        UnreadableImageError: When an item whose file cannot be decoded is read.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"ImageFolder root {path} does not exist.")
    shared = None if classes is None else list(classes)

    def build() -> datasets.ImageFolder:
        if shared is None:
            return datasets.ImageFolder(str(path), transform=transform, loader=read_image)
        return _SharedClassesImageFolder(str(path), shared, transform)

    return _torchvision(build, "ImageFolder", path, "one sub-folder of images per class")
