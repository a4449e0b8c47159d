"""Atomic file writes: a kill leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the suffix (``savefig`` picks the format from it) and lives
    in the same folder, so the final ``os.replace`` is a rename, atomic on POSIX and
    Windows. On an exception the temporary file is removed and ``path`` is untouched.

    Args:
        path: The final file.

    Yields:
        The temporary path to write.

    Example:
        >>> with atomic_path("out/model.pt") as tmp:
        ...     torch.save(state, tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # data on disk before the rename points at it
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: PathLike, data: Union[str, bytes]) -> Path:
    """Writes text (UTF-8) or bytes to ``path`` atomically.

    Args:
        path: The final file.
        data: Its content.

    Returns:
        ``path`` as a Path.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
