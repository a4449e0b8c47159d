"""Tensors or arrays in, contiguous NumPy arrays out: the one conversion the metrics share."""

from __future__ import annotations

from typing import Union

import numpy as np
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]


def as_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    """A C-contiguous NumPy copy (or view) of a tensor or array, in ``dtype``.

    Args:
        x: A tensor (any device; detached and moved to the CPU) or an array, any shape.
        dtype: The NumPy dtype of the result (e.g. ``np.float32``, ``np.int64``).

    Returns:
        An array of the same shape as ``x``.
    """
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)
