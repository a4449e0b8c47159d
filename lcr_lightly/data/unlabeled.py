"""Unlabeled image folders: every image under a root, flat or nested, for SSL pretraining.

:class:`UnlabeledFolder` lists the images under a folder recursively (sorted, hidden
files and folders skipped) and checks each file when it is built: a file that Pillow
cannot identify or verify is named and skipped, and one warning gives the count
(``UnlabeledFolder.skipped`` keeps every name with its reason). A file that passes the
check but still fails to decode when it is loaded (a truncated JPEG body) is replaced
by the next readable image and warned about once, so a long run is not lost to one bad
file. Items are ``(transform(image), -1)``: the SSL batch shape with no label.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset

from lcr_lightly.data.files import DatasetNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
NO_LABEL = -1


def list_images(root: Any) -> List[str]:
    """Image files under a folder, recursively, as sorted root-relative POSIX paths.

    Hidden files and folders (names starting with ``.``) are skipped.

    Args:
        root: The folder.

    Returns:
        The relative paths.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"no image folder at {base}")
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((Path(folder) / name).relative_to(base).as_posix())
    return sorted(found)


def read_image(path: Any) -> Image.Image:
    """Opens an image fully decoded as RGB (a truncated file raises here, not later).

    Raises:
        OSError: If the file cannot be decoded (PIL's ``UnidentifiedImageError`` too).
    """
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _check(path: Path) -> Optional[str]:
    """None for a file Pillow identifies and verifies, else the reason."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _warn_skipped(skipped: Dict[str, str], root: Path) -> None:
    shown = ", ".join(list(skipped)[:3]) + (", ..." if len(skipped) > 3 else "")
    warnings.warn(
        f"{len(skipped)} corrupt image(s) under {root} skipped ({shown}); "
        "UnlabeledFolder.skipped lists them with the reason.",
        RuntimeWarning,
        stacklevel=3,
    )


class UnlabeledFolder(Dataset):
    """The images under a folder (any depth), without labels.

    Args:
        root: The folder.
        transform: Applied to the RGB PIL image (an SSL multi-view transform, or an
            evaluation transform).

    Attributes:
        paths: Root-relative paths of the readable images.
        skipped: ``{path: reason}`` of the files skipped as corrupt.

    Raises:
        DatasetNotFoundError: If the folder does not exist or holds no readable image.
    """

    def __init__(self, root: Any, transform: Optional[Callable[[Any], Any]] = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist.")
        self.transform = transform
        self.skipped: Dict[str, str] = {}
        self.paths: List[str] = []
        for name in list_images(self.root):
            reason = _check(self.root / name)
            if reason is None:
                self.paths.append(name)
            else:
                self.skipped[name] = reason
        if self.skipped:
            _warn_skipped(self.skipped, self.root)
        if not self.paths:
            raise DatasetNotFoundError(
                f"image folder {self.root} holds no readable image ({len(self.skipped)} "
                f"corrupt; extensions read: {', '.join(IMAGE_SUFFIXES)})."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for step in range(len(self.paths)):
            name = self.paths[(index + step) % len(self.paths)]
            try:
                image = read_image(self.root / name)
            except (OSError, ValueError, SyntaxError) as err:
                if name not in self.skipped:  # warn once per file, then use the next one
                    self.skipped[name] = f"{type(err).__name__}: {err}"
                    _warn_skipped({name: self.skipped[name]}, self.root)
                continue
            return (self.transform(image) if self.transform else image), NO_LABEL
        raise DatasetNotFoundError(f"no image under {self.root} can be decoded.")

    def with_transform(self, transform: Optional[Callable[[Any], Any]]) -> UnlabeledFolder:
        """The same files (no new scan) with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other
