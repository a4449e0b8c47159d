"""Argument checks shared by the library: one clear ``ValueError`` naming the argument."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises if ``value`` is not one of ``choices``.

    Args:
        name: Argument name for the message.
        value: The value.
        choices: Allowed values.

    Raises:
        ValueError: If ``value`` is not in ``choices``.
    """
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}; expected one of {choices}.")


def check_options(where: str, options: Iterable[str], known: Sequence[str]) -> None:
    """Raises for an unknown keyword option, naming the closest known one.

    Args:
        where: The function, for the message (``"attach"``).
        options: The keyword names given.
        known: The accepted names.

    Raises:
        TypeError: For the first unknown name (``did you mean 'nonfinite'?``).
    """
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; expected one of {sorted(known)}"
            )
            raise TypeError(f"{where}() got an unknown option {name!r}{hint}")


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (bools are refused: ``k=True`` is a mistake, not ``k=1``).

    Args:
        name: Argument name for the message.
        value: The value (Python or NumPy integer).

    Returns:
        ``int(value)``.

    Raises:
        ValueError: If ``value`` is not an integer or is < 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return int(value)


def check_real(name: str, value: Any, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``); bools are refused.

    Args:
        name: Argument name for the message.
        value: The value (Python or NumPy number).
        allow_zero: Accept 0.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: If ``value`` is not a number, is NaN or infinite, or is negative
            (or zero without ``allow_zero``).
    """
    bound = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {bound} number, got {number}.")
    return number


def check_finite_rows(
    name: str, values: Union[torch.Tensor, np.ndarray], rows_are: str = "rows"
) -> None:
    """Raises if any row (first dimension) of ``values`` holds NaN or inf.

    Args:
        name: Argument name for the message.
        values: (N, ...) array or tensor.
        rows_are: What a row is, for the message (``"rows"``, ``"images"``).

    Raises:
        ValueError: Naming ``name``, how many rows are bad and the first of them.
    """
    if isinstance(values, torch.Tensor):  # any dtype, bfloat16 included
        finite = torch.isfinite(values.detach()).cpu().numpy()
    else:
        finite = np.isfinite(np.asarray(values))
    if finite.ndim == 0:
        finite = finite.reshape(1)
    rows = np.flatnonzero(~finite.all(axis=tuple(range(1, finite.ndim))))
    if len(rows):
        first = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(
            f"{name} has {len(rows)} of {len(finite)} {rows_are} with NaN or inf values "
            f"({rows_are} {first}); fix or drop them before evaluating."
        )
