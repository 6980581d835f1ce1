"""The structure of one example (containers, keys, leaf types and dtypes), to tell a source whose
examples cannot share a batch with another's before ``collate`` fails or promotes silently.

Tensor and array sizes are left out: a padding ``collate_fn`` takes sequences of any length,
from one source or several, so only the number of dimensions is compared.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__: list[str] = []


def structure(example: Any) -> Any:
    """A comparable description of ``example``: nested tuples and dicts of leaf kinds."""
    if isinstance(example, torch.Tensor):
        return ("Tensor", str(example.dtype), example.dim())
    np = sys.modules.get("numpy")  # only present if something imported it
    if np is not None and isinstance(example, np.ndarray):
        return ("ndarray", str(example.dtype), example.ndim)
    if isinstance(example, bool) or (np is not None and isinstance(example, np.bool_)):
        return ("number", "bool")
    if isinstance(example, numbers.Number):
        # Python and numpy scalars alike: collate turns both into the same tensor dtype family.
        for kind, cls in (("int", numbers.Integral), ("float", numbers.Real)):
            if isinstance(example, cls):
                return ("number", kind)
        return ("number", "complex")
    if isinstance(example, str | bytes) or example is None:
        return (type(example).__name__,)
    if isinstance(example, Mapping):
        return ("Mapping", {k: structure(v) for k, v in example.items()})
    if isinstance(example, Sequence):
        name = type(example).__name__ if hasattr(example, "_fields") else "sequence"
        return (name, tuple(structure(v) for v in example))
    return ("object", f"{type(example).__module__}.{type(example).__qualname__}")


def describe(sig: Any) -> str:
    kind = sig[0]
    if kind in ("Tensor", "ndarray"):
        return f"a {sig[2]}-d {sig[1]} {kind}"
    if kind == "number":
        return f"a Python/numpy {sig[1]}"
    if kind == "Mapping":
        return f"a dict with keys {list(sig[1])}"
    if kind == "object":
        return f"a {sig[1]}"
    if len(sig) == 2:
        return f"a {kind} of {len(sig[1])} item" + ("s" if len(sig[1]) != 1 else "")
    return "None" if kind == "NoneType" else f"a {kind}"


def difference(ref: Any, other: Any, path: str = "example") -> tuple[str, str, str] | None:
    """``(where, what other has, what ref has)`` at the first place they differ, else None."""
    if ref == other:
        return None
    same_container = ref[0] == other[0] and ref[0] not in ("Tensor", "ndarray", "number")
    if same_container and ref[0] == "Mapping" and set(ref[1]) == set(other[1]):
        for k in ref[1]:
            found = difference(ref[1][k], other[1][k], f"{path}[{k!r}]")
            if found:
                return found
    if same_container and ref[0] != "Mapping" and len(ref) == 2 and len(ref[1]) == len(other[1]):
        for i, (a, b) in enumerate(zip(ref[1], other[1], strict=True)):
            found = difference(a, b, f"{path}[{i}]")
            if found:
                return found
    return path, describe(other), describe(ref)
