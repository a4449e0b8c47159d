"""Loaders for the paper's data sets, from local roots only (nothing is downloaded).

The torchvision-backed loaders and ImageFolder are here; CUB-200-2011 is in
:mod:`lcr_lightly.data.cub`, the root lookup and errors in :mod:`lcr_lightly.data.files`.

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

from torch.utils.data import Dataset
from torchvision import datasets

# Re-exported so that this module still names every loader of the table above and the
# errors they raise (``lcr_lightly.data.fgvc.CUBLocalization`` is a public path).
from lcr_lightly.data.cub import CUB200, PART_RADIUS_FRACTION, CUBLocalization
from lcr_lightly.data.files import (
    DatasetNotFoundError,
    PathLike,
    UnreadableImageError,
    read_image,
    resolve_root,
)

__all__ = [
    "CUB200",
    "PART_RADIUS_FRACTION",
    "CUBLocalization",
    "DatasetNotFoundError",
    "PathLike",
    "UnreadableImageError",
    "cifar100",
    "fgvc_aircraft",
    "image_folder",
    "read_image",
    "resolve_root",
    "stanford_cars",
]

_D = TypeVar("_D", bound=Dataset)


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
