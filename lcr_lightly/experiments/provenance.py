"""Where a result came from: code commit, library versions and the initial weights.

Every results JSON written by the experiment runner and the benchmark scripts carries a
``provenance`` record so that a number can be traced to the code and weights that made
it. No absolute path is recorded: files are named relative to the working directory (or
by their base name) and identified by their SHA-256.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional, Union

PACKAGES = (
    "lcr-lightly",
    "torch",
    "torchvision",
    "lightly",
    "pytorch-lightning",
    "timm",
    "faiss-cpu",
    "numpy",
)


def git_commit(root: Union[str, Path, None] = None) -> Optional[str]:
    """The checked-out commit (with ``-dirty`` when tracked files changed), or None."""
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed wheel) or no git
    return commit + ("-dirty" if dirty else "")


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of the libraries that shape a result (None: not installed)."""
    found: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def display_path(path: Union[str, Path]) -> str:
    """``path`` relative to the working directory, else its base name: never absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return resolved.name


def provenance(
    weights: Optional[Union[str, Path]] = None, backbone: Optional[str] = None
) -> Dict[str, Any]:
    """The provenance record of a run.

    Args:
        weights: The initial weights: None (random init), ``"imagenet"`` (resolved to the
            file its package ships for ``backbone``), ``"generic_init"`` (the shipped
            synthetic init) or a local file.
        backbone: The backbone's name (needed for ``"imagenet"``).

    Returns:
        ``{"commit", "versions", "weights": {"name", "sha256"} or None}``.
    """
    record: Dict[str, Any] = {"commit": git_commit(), "versions": versions(), "weights": None}
    if weights is not None:
        from lcr_lightly.experiments.config import GENERIC_INIT, GENERIC_INIT_FILE
        from lcr_lightly.models.pretrained import IMAGENET, imagenet_weights_file

        name = str(weights)
        path = Path(name)
        if name == IMAGENET:
            path = imagenet_weights_file(str(backbone))
            name = f"imagenet ({path.name})"
        elif name == GENERIC_INIT:
            path = GENERIC_INIT_FILE
            name = f"generic_init ({path.name})"
        else:
            name = display_path(path)
        record["weights"] = {"name": name, "sha256": file_sha256(path) if path.is_file() else None}
    return record
