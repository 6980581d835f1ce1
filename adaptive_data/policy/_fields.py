"""Checks of the fields of a loaded state, shared by the policies, the transform and the sampler.

``load_state_dict`` everywhere checks the whole state with these before it changes anything,
so a refused state leaves the object as it was. Each check reads one field at a ``path`` (how
the field is reached from the state the user passed, e.g. ``state['lag']['queued_ids']``),
returns it as plain Python values, and raises ``ValueError`` naming the path, what it should
be and what it got. Integer fields refuse ``bool`` and floats; Tensors are read whole
(``tolist``), so the cost is linear in the state's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._check import is_int

__all__: list[str] = []


def describe(value: Any) -> str:
    """A short description of ``value`` for a message (a Tensor by dtype and shape)."""
    if isinstance(value, Tensor):
        return f"a Tensor of dtype={value.dtype}, shape={tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(path: str, what: str, value: Any) -> ValueError:
    """The error for field ``path`` holding ``value`` where ``what`` was expected."""
    return ValueError(f"{path} should be {what}, but got {describe(value)}")


def field(state: Mapping[str, Any], key: str, path: str) -> Any:
    """``state[key]``, or an error naming ``path[key]`` when it is missing."""
    if key not in state:
        raise ValueError(f"{path} lacks the key {key!r}")
    return state[key]


def mapping(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise refuse(path, "a dict", value)
    return value


def integer(path: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An ``int`` (not a ``bool``) in ``[lo, hi]`` (the bounds given)."""
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise refuse(path, _int_words(lo, hi), value)
    return int(value)


def _int_words(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an int in [{lo}, {hi}]"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


def _is_int_tensor(value: Tensor) -> bool:
    return not value.dtype.is_floating_point and not value.dtype.is_complex


def integers(
    path: str,
    value: Any,
    length: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> list[int]:
    """A 1-D integer Tensor or a list/tuple of ints (``bool`` refused), of ``length`` entries
    if given, each in ``[lo, hi]``, as a list of ints."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or not _is_int_tensor(value) or value.dtype == torch.bool:
            raise refuse(path, "a 1-D integer Tensor or a list of ints", value)
        out = value.tolist()
    elif isinstance(value, list | tuple):
        out = list(value)
        if not all(is_int(v) for v in out):
            raise refuse(path, "a list of ints", value)
    else:
        raise refuse(path, "a 1-D integer Tensor or a list of ints", value)
    if length is not None and len(out) != length:
        raise refuse(path, f"{length} entries", value)
    bad = [v for v in out if (lo is not None and v < lo) or (hi is not None and v > hi)]
    if bad:
        raise ValueError(f"{path} should hold {_int_words(lo, hi)[3:]}s, but holds {bad[0]}")
    return out


def reals(
    path: str, value: Any, length: int | None = None, *, nan_ok: bool = False, inf_ok: bool = False
) -> list[float]:
    """A 1-D floating Tensor or a list/tuple of real numbers (``bool`` refused), of ``length``
    entries if given, finite unless ``nan_ok``/``inf_ok``, as a list of floats."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or not value.dtype.is_floating_point:
            raise refuse(path, "a 1-D floating Tensor or a list of numbers", value)
        out = value.tolist()
    elif isinstance(value, list | tuple):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise refuse(path, "a list of numbers", value)
        out = [float(v) for v in value]
    else:
        raise refuse(path, "a 1-D floating Tensor or a list of numbers", value)
    if length is not None and len(out) != length:
        raise refuse(path, f"{length} entries", value)
    for v in out:
        if (math.isnan(v) and not nan_ok) or (math.isinf(v) and not inf_ok):
            raise ValueError(f"{path} should hold finite numbers, but holds {v}")
    return out


def real(path: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number (``bool`` refused) in ``[lo, hi]`` (the bounds given)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (lo is None or value >= lo)
        and (hi is None or value <= hi)
    )
    if not ok:
        bounds = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else ""
        bounds = bounds or (f" >= {lo:g}" if lo is not None else "")
        raise refuse(path, "a finite number" + bounds, value)
    return float(value)


def tensor(path: str, value: Any, dtype: torch.dtype, shape: Sequence[int | None]) -> Tensor:
    """A Tensor of ``dtype`` and ``shape`` (``None``: any size on that dim)."""
    if (
        not isinstance(value, Tensor)
        or value.dtype != dtype
        or value.dim() != len(shape)
        or any(s is not None and s != n for s, n in zip(shape, value.shape, strict=True))
        or value.device.type == "meta"
    ):
        dims = ", ".join("n" if s is None else str(s) for s in shape)
        raise refuse(path, f"a {dtype} Tensor of shape [{dims}]", value)
    return value


def probabilities(path: str, values: Sequence[float]) -> None:
    """Raise unless ``values`` are probabilities that sum to 1 (to rounding)."""
    if any(not 0.0 <= v <= 1.0 for v in values) or abs(math.fsum(values) - 1.0) > 1e-6:
        raise ValueError(f"{path} should hold probabilities that sum to 1, but holds {values}")
