"""Argument validators shared by every public constructor: one bad value, one ``ValueError``
that names the argument, says what was expected and shows what was given (type and value).

Wrong types raise ``ValueError`` too, not ``TypeError``: the project's rule is one exception type
for every refused argument, so a caller catches one thing. ``bool`` is never accepted as a number
(``True`` is an ``int`` to Python, but ``momentum=True`` is a mistake, not ``1``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection
from typing import Any

import torch

__all__ = [
    "MAX_EPSILON_SCALE",
    "clamp_epsilon_scale",
    "describe",
    "require_bool",
    "require_callable",
    "require_choice",
    "require_float",
    "require_int",
    "require_pair",
    "require_str",
]

#: Cap on a block's damping multiplier (``Shampoo.request_refresh(epsilon_scale=...)``, the
#: compounded retries of ``SGDFallback``). The multiplier is stored in float32 and the damped
#: factor ``L + ε·scale·I`` must stay representable there (float32 ends at 3.4e38): 1e30 leaves
#: room for ``ε`` up to 1e8, and a damping a thousand times the factor's scale already makes the
#: preconditioner a multiple of the identity, so larger values buy nothing.
MAX_EPSILON_SCALE = 1e30


def describe(value: Any, limit: int = 80) -> str:
    """``type value`` for error messages: ``str '1e-3'``, ``float nan``, ``NoneType None`` (the
    value's repr cut at ``limit`` characters: a tensor's can be long)."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def require_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> Any:
    """``value`` if it is a real number (not a bool), finite (``allow_inf``: or ``±inf``; never
    nan) and within the bounds; else ``ValueError`` naming ``name``."""
    if value is None and allow_none:
        return value
    none = "None or " if allow_none else ""
    if not _is_number(value):
        raise ValueError(f"{name} must be {none}a number, got {describe(value)}")
    number = float(value)
    bounds = _range_text(low, high, low_open, high_open)
    if (
        math.isnan(number)
        or (math.isinf(number) and not allow_inf)
        or not _in_range(number, low, high, low_open, high_open)
    ):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {none}{kind}{' ' + bounds if bounds else ''}, got {value!r}")
    return value


def require_int(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> Any:
    """``value`` if it is an int (not a bool; ``allow_inf``: or ``math.inf``) within
    ``[low, high]``; else ``ValueError`` naming ``name``."""
    if value is None and allow_none:
        return value
    none = "None or " if allow_none else ""
    inf = " or math.inf" if allow_inf else ""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (integral or (allow_inf and _is_number(value) and value == math.inf)):
        raise ValueError(f"{name} must be {none}an int{inf}, got {describe(value)}")
    if not _in_range(value, low, high, False, False):
        bounds = _range_text(low, high, False, False)
        raise ValueError(f"{name} must be {none}an int {bounds}{inf}, got {value!r}")
    return value


def require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {describe(value)}")
    return value


def require_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {describe(value)}")
    return value


def require_callable(name: str, value: Any, *, allow_none: bool = False) -> Any:
    if (value is None and allow_none) or callable(value):
        return value
    raise ValueError(f"{name} must be {'None or ' if allow_none else ''}a callable, got {describe(value)}")


def require_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by equality, never hashing ``value``)."""
    if not any(isinstance(value, type(c)) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {describe(value)}")
    return value


def require_pair(
    name: str, value: Any, check: Callable[[str, Any], Any], labels: tuple[str, str] | None = None
) -> tuple[Any, Any]:
    """A 2-sequence (tuple or list) whose items pass ``check(f"{name}[i]", item)``."""
    if not (isinstance(value, tuple | list) and len(value) == 2):
        what = f" ({labels[0]}, {labels[1]})" if labels else ""
        raise ValueError(f"{name} must be a pair{what}, got {describe(value)}")
    return check(f"{name}[0]", value[0]), check(f"{name}[1]", value[1])


def clamp_epsilon_scale(value: Any, name: str = "epsilon_scale") -> float:
    """A damping multiplier as it may be stored: a number > 0 (not nan), capped at
    :data:`MAX_EPSILON_SCALE` (``inf`` included) instead of overflowing float32."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    require_float(name, value, low=0.0, low_open=True, allow_inf=True)
    return min(float(value), MAX_EPSILON_SCALE)
