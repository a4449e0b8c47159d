"""What an export refuses, and the optional ONNX packages it needs."""

from __future__ import annotations

import importlib
from typing import Any


class ExportError(ValueError):
    """A model that cannot be exported as an embedder (message: one line)."""


def require_onnx(name: str) -> Any:
    """Imports ``onnx`` or ``onnxruntime``, or says in one line which extra installs it.

    Raises:
        ExportError: When the package is missing.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ExportError(
            f"ONNX files need the package {name!r}, from the [onnx] extra: "
            "pip install 'lcr-lightly[onnx]'"
        ) from None
