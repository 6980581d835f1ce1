"""The structure of one example (containers, keys, leaf types and dtypes), to tell a source whose
examples cannot share a batch with another's before ``collate`` fails or promotes silently.

Sizes are left out: a padding ``collate_fn`` takes sequences of any length, from one source or
several, so tensors and arrays compare their number of dimensions, and lists of other lengths
(token ids) the kinds of their items. Tuples are records, ``(x, y)``: their lengths count.
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
    if isinstance(example, list):
        return ("list", tuple(structure(v) for v in example))
    if isinstance(example, Sequence):
        name = type(example).__name__ if hasattr(example, "_fields") else "tuple"
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


def _sizeless(sig: Any) -> Any:
    """``sig`` as a hashable key without the lengths of the lists inside it."""
    kind = sig[0]
    if kind == "Mapping":
        return (kind, tuple(sorted((repr(k), _sizeless(v)) for k, v in sig[1].items())))
    if kind == "list":
        return (kind, frozenset(_sizeless(v) for v in sig[1]))
    if len(sig) == 2 and isinstance(sig[1], tuple):  # tuples and namedtuples: records
        return (kind, tuple(_sizeless(v) for v in sig[1]))
    return sig


def difference(ref: Any, other: Any, path: str = "example") -> tuple[str, str, str] | None:
    """``(where, what other has, what ref has)`` at the first place they differ, else None."""
    if ref == other:
        return None
    kind = ref[0]
    if kind != other[0] or kind in ("Tensor", "ndarray", "number", "object"):
        return path, describe(other), describe(ref)
    if kind == "Mapping":
        if set(ref[1]) != set(other[1]):
            return path, describe(other), describe(ref)
        pairs = [(f"{path}[{k!r}]", ref[1][k], other[1][k]) for k in ref[1]]
    elif kind == "list" and len(ref[1]) != len(other[1]):
        # A list's length is a size: the two differ only if no item of one has the kind of
        # an item of the other (an empty list has no kinds to compare).
        ref_kinds, other_kinds = ({_sizeless(v): v for v in sig[1]} for sig in (ref, other))
        if not ref_kinds or not other_kinds or ref_kinds.keys() & other_kinds.keys():
            return None
        a, b = next(iter(ref_kinds.values())), next(iter(other_kinds.values()))
        return difference(a, b, f"{path}[*]") or (path, describe(other), describe(ref))
    elif len(ref) == 2 and len(ref[1]) == len(other[1]):  # tuples, lists of one length
        items = zip(ref[1], other[1], strict=True)
        pairs = [(f"{path}[{i}]", a, b) for i, (a, b) in enumerate(items)]
    else:
        return path, describe(other), describe(ref)
    for where, a, b in pairs:
        found = difference(a, b, where)
        if found is not None:
            return found
    return None  # they differ only where sizes may (the lengths of lists)


def leaf_shapes(example: Any, path: str = "example") -> list[tuple[str, tuple[int, ...] | None]]:
    """``(place, shape)`` of each tensor and array in ``example`` (``None`` for a Python list
    of numbers, which torch's default collate batches position by position), in order."""
    np = sys.modules.get("numpy")
    if isinstance(example, torch.Tensor) or (np is not None and isinstance(example, np.ndarray)):
        return [(path, tuple(example.shape))]
    if isinstance(example, Mapping):
        out = []
        for k, v in example.items():
            out += leaf_shapes(v, f"{path}[{k!r}]")
        return out
    if isinstance(example, list) and example and isinstance(example[0], numbers.Number):
        return [(path, None)]
    if isinstance(example, Sequence) and not isinstance(example, str | bytes):
        out = []
        for i, v in enumerate(example):
            out += leaf_shapes(v, f"{path}[{i}]")
        return out
    return []
