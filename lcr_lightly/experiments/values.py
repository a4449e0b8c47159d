"""Typed configuration values: restricted numbers, converting and checking, types in words.

Nothing here knows a field: :func:`check_field` converts and checks one value against
a type hint (``Literal`` choices, ``Optional``/``Union``, ``List``, bool, str and
jsonargparse's restricted numbers), and :func:`describe` words a type for messages.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Literal, Union, get_args, get_origin

if TYPE_CHECKING:  # static checkers see the plain number types
    PositiveInt = int
    NonNegativeInt = int
    FinitePositiveFloat = float
    FiniteNonNegativeFloat = float
    ScaleFloat = float
    Seed = int
else:
    from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

    FinitePositiveFloat = restricted_number_type(
        "FinitePositiveFloat", float, [(">", 0.0), ("<", math.inf)], docstring="finite float > 0"
    )
    FiniteNonNegativeFloat = restricted_number_type(
        "FiniteNonNegativeFloat",
        float,
        [(">=", 0.0), ("<", math.inf)],
        docstring="finite float >= 0",
    )
    ScaleFloat = restricted_number_type(
        "ScaleFloat", float, [(">", 0.0), ("<=", 1.0)], docstring="float in (0, 1]"
    )
    Seed = restricted_number_type(
        "Seed", int, [(">=", 0), ("<", 2**32)], docstring="int in [0, 2**32)"
    )

DESCRIPTIONS: Dict[Any, str] = {
    PositiveInt: "an integer > 0",
    NonNegativeInt: "an integer >= 0",
    FinitePositiveFloat: "a finite number > 0",
    FiniteNonNegativeFloat: "a finite number >= 0",
    ScaleFloat: "a number in (0, 1]",
    Seed: "an integer in [0, 2**32)",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}

# YAML's spellings of null, as a command line or a quoted YAML string gives them.
NULLS = ("null", "Null", "NULL", "~")


class ConfigError(ValueError):
    """A configuration value or combination that cannot run (message: one line)."""


class InvalidValue(ConfigError):
    """A value that does not fit its field's type.

    Attributes:
        key: The field (``widths[1]`` for a list element).
        value: The value as given.
        expected: The type in words (:func:`describe`).
    """

    def __init__(self, key: str, value: Any, expected: str) -> None:
        super().__init__(f"{key}: invalid value {value!r}; expected {expected}.")
        self.key, self.value, self.expected = key, value, expected

    def as_text(self) -> InvalidValue:
        """The same error quoting the value as text, as typed on a command line or in YAML."""
        return InvalidValue(self.key, str(self.value), self.expected)


def check_field(key: str, hint: Any, value: Any) -> Any:
    """Converts a value to a field's type, or raises :class:`InvalidValue` naming the field.

    Strings are read as a command line or YAML would write them (``"3e-2"``,
    ``"false"``, ``"null"``); ``Literal`` values must be one of the choices; restricted
    numbers (jsonargparse's ``PositiveInt``, ...) must meet their restriction.

    Args:
        key: The field's name (in the message).
        hint: The field's type.
        value: The value.

    Returns:
        The value as a plain ``bool``/``int``/``float``/``str``/``None`` or list of them.
    """
    if get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise InvalidValue(key, value, describe(hint))
        item = get_args(hint)[0]
        return [check_field(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    try:
        return convert(hint, value)
    except (TypeError, ValueError):
        raise InvalidValue(key, value, describe(hint)) from None


def convert(hint: Any, value: Any) -> Any:
    """A scalar as ``hint`` (``Literal``, ``Union``/``Optional``, bool, str or a number type).

    Raises:
        ValueError: If the value does not fit.
    """
    origin = get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and value in get_args(hint):
            return value
        raise ValueError(value)
    if origin is Union:
        members = get_args(hint)
        if type(None) in members and (value is None or value in NULLS):
            return None
        for member in members:
            if member is not type(None):
                try:
                    return convert(member, value)
                except ValueError:
                    continue
        raise ValueError(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    base = int if issubclass(hint, int) else float
    if base is int and isinstance(value, float):
        raise ValueError(value)
    number = base(value)
    hint(number)  # a restricted number type raises ValueError outside its range
    return number


def describe(hint: Any) -> str:
    """Human text for a field's type, e.g. ``"an integer > 0 or null"``."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if origin is Union:
        parts = [describe(a) for a in get_args(hint) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(hint) else "")
    if origin is list:
        return f"a list of {describe(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return DESCRIPTIONS.get(hint, getattr(hint, "__name__", str(hint)))
