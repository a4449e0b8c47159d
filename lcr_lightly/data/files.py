"""Finding a data set's root and reading its images, with errors that name the file.

Every loader of :mod:`lcr_lightly.data` resolves its root here (an argument, the data
set's environment variable, or ``$LCR_DATA_ROOT/<folder>``) and decodes images with
:func:`read_image`: a missing root or file raises :class:`DatasetNotFoundError`, an
undecodable image :class:`UnreadableImageError`, each naming what it expected where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from PIL import Image

PathLike = Union[str, os.PathLike]


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


# The folder each variable's data set has under $LCR_DATA_ROOT ("": the root itself).
DEFAULT_DIRS = {
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
        root = Path(os.environ["LCR_DATA_ROOT"]) / DEFAULT_DIRS.get(env, "")
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
