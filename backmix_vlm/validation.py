"""Small checks for user-facing values: each failure is a :class:`ConfigError` naming the key.

Config sections call these from their ``validate(where)`` so a bad value fails when the config
is loaded, before any data or model is touched.  ``where`` is the dotted key path
(``backmix.mask_ratio``, ``eval.ood[1].max_samples``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import ConfigError


def check_choice(value: Any, choices: Sequence[Any], where: str) -> None:
    """Raise a ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not accepted; choose one of {', '.join(map(str, choices))}")


def check_range(value: Any, where: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """Raise a ConfigError unless ``low <= value <= high`` (``<`` on an open side).

    ``low`` / ``high`` None leave that side unbounded; ``allow_none`` accepts ``None``.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)  # NaN, inf fail
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        expected = describe_range(low, high, low_open, high_open)
        if isinstance(value, float) and not math.isfinite(value) and "finite" not in expected:
            expected = expected.replace("a number", "a finite number")
        raise ConfigError(f"{where}: {value!r} is not accepted; expected {expected}" + (" or null" if allow_none else ""))


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``a number in [0, 1]``, ``a number > 0``, ``a number >= 1`` ..."""
    if low is None and high is None:
        return "a finite number"
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a number"


def check_positive(value: Any, where: str, *, allow_none: bool = False) -> None:
    check_range(value, where, low=0, low_open=True, allow_none=allow_none)


def check_non_negative(value: Any, where: str, *, allow_none: bool = False) -> None:
    check_range(value, where, low=0, allow_none=allow_none)


def check_fraction(value: Any, where: str, *, low_open: bool = False) -> None:
    """A fraction in [0, 1] (or (0, 1] with ``low_open``)."""
    check_range(value, where, low=0, high=1, low_open=low_open)


def join(where: str, key: str) -> str:
    """``join("eval", "batch_size") == "eval.batch_size"``; an empty ``where`` gives ``key``."""
    return f"{where}.{key}" if where else key
