"""Argument checks shared by the package: integers and real numbers, with ``bool`` refused.

``isinstance(True, int)`` holds, so a hand-written ``isinstance(x, int) and x >= 1`` accepts
``True`` as 1; these checks refuse it. Messages follow torch's samplers: "batch_size should be a
positive integer value, but got batch_size=True". A value of the wrong type raises
``TypeError`` when any integer is allowed (``seed``) and ``ValueError`` when a range is asked
for (``batch_size >= 1``), as torch's ``BatchSampler`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__: list[str] = []


def is_int(value: Any) -> bool:
    """A Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite Python ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def int_list(name: str, value: Any) -> list[int]:
    """``value``, a 1-D integer Tensor or a sequence of ints (bools refused), as a list of
    ints; a ``TypeError`` naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(
                f"{name} should be a 1-D integer Tensor or a sequence of ints, but got a Tensor "
                f"of dtype={value.dtype}, shape={tuple(value.shape)}"
            )
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        out = list(value)
        bad = [v for v in out if not is_int(v)]
        if bad:
            raise TypeError(f"{name} should hold ints, but got {bad[0]!r}")
        return out
    raise TypeError(
        f"{name} should be a 1-D integer Tensor or a sequence of ints, but got "
        f"{type(value).__name__}"
    )


def _int_words(minimum: int | None) -> str:
    if minimum is None:
        return "an int"
    if minimum == 1:
        return "a positive integer value"
    if minimum == 0:
        return "a non-negative integer value"
    return f"an integer >= {minimum}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    none_ok: bool = False,
    what: str | None = None,
) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``), ``>= minimum`` if given.

    ``none_ok`` also accepts ``None``; ``what`` replaces the generated description ("a
    positive integer value") in the message.
    """
    if none_ok and value is None:
        return
    if is_int(value) and (minimum is None or value >= minimum):
        return
    words = what or _int_words(minimum) + (" or None" if none_ok else "")
    error = TypeError if minimum is None else ValueError
    raise error(f"{name} should be {words}, but got {name}={value!r}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
    what: str | None = None,
) -> float:
    """Return ``float(value)``; raise ``ValueError`` unless it is a finite real number (not a
    ``bool``), ``> 0`` with ``positive``, and in ``[low, high)`` for the bounds given."""
    ok = (
        is_real(value)
        and (not positive or value > 0)
        and (low is None or value >= low)
        and (high is None or value < high)
    )
    if not ok:
        if what is None:
            if positive:
                what = "a positive finite number"
            elif low is not None and high is not None:
                what = f"a number in [{low:g}, {high:g})"
            elif low is not None:
                what = f"a finite number >= {low:g}"
            elif high is not None:
                what = f"a finite number < {high:g}"
            else:
                what = "a finite number"
        raise ValueError(f"{name} should be {what}, but got {name}={value!r}")
    return float(value)


def check_keys(state: Mapping[str, Any], required: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``required`` that ``state`` lacks."""
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"state is not a complete {what}: it lacks the key(s) {missing}; pass the dict "
            f"that {what} returned, unchanged"
        )
