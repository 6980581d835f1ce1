"""Where each covered module holds the batch, found by running the model on 2 and 3 examples.

Rules take the batch in one known dim of each input and output; this module finds that dim
for every call of every covered module, per input signature, and decides which parameters
must be covered at the root instead (outputs that do not hold the batch in one dim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ._model_state import preserved
from ._plan import Entry

__all__: list[str] = []

UNKNOWN = -1  # a tensor whose size depends on the batch size, but not as one batch dim


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """Where one call of a module holds the batch: for each leaf of ``(args, kwargs)`` and of
    its output (``tree_flatten`` order), the batch dim, None (no batch: not a tensor, or its
    shape does not depend on the batch size) or ``UNKNOWN``."""

    inputs: tuple[int | None, ...]
    outputs: tuple[int | None, ...]
    requires_grad: tuple[bool, ...]  # of each output leaf

    @property
    def attributable(self) -> bool:
        """Every output that carries a gradient holds the batch in one dim."""
        return all(
            d is not None and d >= 0
            for d, g in zip(self.outputs, self.requires_grad, strict=True)
            if g
        )


@dataclasses.dataclass
class Layout:
    """How the covered modules see the batch, for one input signature.

    Found by running the model on 2 and 3 examples of the batch and comparing the shapes of
    every covered call: the dim whose size follows the batch size is the batch dim; a tensor
    whose shape does not change does not hold the batch (a position embedding of
    ``arange(T)``), whatever its sizes. Modules with such an output (or a layout found no
    other way) cannot give each example its share from the gradient at their output: their
    parameters are covered at the model's root instead (``root_params``), by replaying the
    whole model (a JVP, or per-example gradients for the norms).
    """

    calls: dict[int, list[CallLayout]]  # id(entry) -> one layout per call
    rehomed: list[Entry]  # entries whose parameters the root covers
    root_params: dict[str, str]  # what the root entry covers, local (= global) name -> global
    shared: frozenset[str]  # global names used by more than one covered call

    def params(self, entry: Entry) -> dict[str, str]:
        """The parameters this entry's calls account for in this layout (empty: none)."""
        if entry.root:
            return self.root_params
        if any(e is entry for e in self.rehomed):
            return {}
        return entry.params


def _shapes(tree: Any) -> list[tuple[int, ...] | None]:
    return [tuple(t.shape) if isinstance(t, Tensor) else None for t in tree_flatten(tree)[0]]


def _batch_dim(
    a: tuple[int, ...] | None, b: tuple[int, ...] | None, ma: int, mb: int
) -> int | None:
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return UNKNOWN
    changed = [k for k in range(len(a)) if a[k] != b[k]]
    if not changed:
        return None
    if len(changed) == 1 and a[changed[0]] == ma and b[changed[0]] == mb:
        return changed[0]
    return UNKNOWN


_SIZES = (2, 3)  # the batch sizes of the two layout runs


def _record(
    model: nn.Module, modules: list[nn.Module], args: tuple, kwargs: dict, n: int, m: int
) -> dict[int, list[tuple[list, list, list[bool]]]]:
    """Run the model on ``m`` examples of the batch (repeated if it has fewer) and record the
    shapes of every call of ``modules``."""
    records: dict[int, list[tuple[list, list, list[bool]]]] = {id(mod): [] for mod in modules}

    def hook(module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        grads = [isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(out)[0]]
        records[id(module)].append((_shapes((a, k)), _shapes(out), grads))

    def take(t: Any) -> Any:
        # Inputs that hold the batch (dim 0 of size n); others (an attention mask [T, T]) as
        # they are. With T == n such a mask is cut too, and the model then raises.
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:
            return t[torch.arange(m, device=t.device) % n]
        return t

    sub_args, sub_kwargs = tree_map(take, (args, kwargs))
    handles = [mod.register_forward_hook(hook, with_kwargs=True) for mod in modules]
    try:
        with preserved(model), torch.enable_grad():
            model(*sub_args, **sub_kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def detect_layout(
    model: nn.Module,
    entries: Sequence[Entry],
    args: tuple,
    kwargs: dict,
    n: int,
    who: str,
    fallback: str = "jvp",
) -> Layout:
    """The :class:`Layout` of ``model(*args, **kwargs)``, whose tensors hold ``n`` examples
    in dim 0. Costs two forwards of 2 and 3 examples. ``who`` names the caller in errors;
    ``fallback='raise'`` refuses modules that would be covered at the root."""
    modules = [e.module for e in entries]
    try:
        runs = [_record(model, modules, args, kwargs, n, m) for m in _SIZES]
    except Exception as exc:
        raise RuntimeError(
            f"{who} runs the model on {_SIZES[0]} and {_SIZES[1]} examples of the batch to find "
            f"which dim of each layer's input and output holds the batch, and the model raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    calls: dict[int, list[CallLayout]] = {}
    unstable: set[int] = set()
    for entry in entries:
        first, second = (run[id(entry.module)] for run in runs)
        if len(first) != len(second):  # the number of calls depends on the batch size
            unstable.add(id(entry))
            continue
        layouts = []
        for (in_a, out_a, _), (in_b, out_b, grads) in zip(first, second, strict=True):
            if len(in_a) != len(in_b) or len(out_a) != len(out_b):
                unstable.add(id(entry))
                break
            layouts.append(
                CallLayout(
                    tuple(_batch_dim(a, b, *_SIZES) for a, b in zip(in_a, in_b, strict=True)),
                    tuple(_batch_dim(a, b, *_SIZES) for a, b in zip(out_a, out_b, strict=True)),
                    tuple(grads),
                )
            )
        calls[id(entry)] = layouts
    rehomed = [
        e
        for e in entries
        if not e.root
        and e.params
        and (id(e) in unstable or not all(c.attributable for c in calls[id(e)]))
    ]
    root = next((e for e in entries if e.root), None)
    if rehomed and fallback == "raise":
        names = [f"{e.name} ({type(e.module).__name__})" for e in rehomed]
        raise ValueError(
            f"{who} cannot attribute the outputs of {names} to examples: they do not hold the "
            "batch in one dim (found by running the model on 2 and 3 examples), so their "
            "parameters need a replay of the whole model, which fallback='raise' refuses; use "
            "fallback='jvp' or estimator='jvp'"
        )
    if rehomed and root is None:
        names = [f"{e.name} ({type(e.module).__name__})" for e in rehomed]
        raise ValueError(
            f"{who} cannot attribute the outputs of {names} to examples (they do not hold the "
            f"batch in one dim), and the model's root ({type(model).__name__}) has a rule of "
            "its own, so they cannot be covered there; use estimator='jvp'"
        )
    root_params = dict(root.params) if root is not None else {}
    for e in rehomed:
        root_params.update({g: g for g in e.params.values()})
    uses: dict[str, int] = {}
    for e in entries:
        params = root_params if e.root else ({} if e in rehomed else e.params)
        count = 1 if e.root else len(calls.get(id(e), []))
        for g in params.values():
            uses[g] = uses.get(g, 0) + count
    shared = frozenset(g for g, k in uses.items() if k > 1)
    return Layout(calls, rehomed, root_params, shared)


def _signature(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    leaves, spec = tree_flatten((args, kwargs))
    parts: list[Any] = []
    for t in leaves:
        if isinstance(t, Tensor):
            parts.append((tuple(t.shape[1:]), t.dtype, t.device))
        else:
            try:
                hash(t)
                parts.append(t)
            except TypeError:
                parts.append(type(t))
    return str(spec), tuple(parts), tuple(m.training for m in model.modules())


class Layouts:
    """A cache of :func:`detect_layout`, by input signature (structure, shapes but the batch
    size, dtypes, devices, and train/eval modes): the two extra forwards run once per
    signature."""

    _SIZE = 16

    def __init__(
        self, model: nn.Module, entries: Sequence[Entry], who: str, fallback: str = "jvp"
    ) -> None:
        self.model = model
        self.entries = list(entries)
        self.who = who
        self.fallback = fallback
        self._cache: dict[Any, Layout] = {}

    def get(self, args: tuple, kwargs: dict, n: int) -> Layout:
        key = _signature(self.model, args, kwargs)
        layout = self._cache.get(key)
        if layout is None:
            layout = detect_layout(
                self.model, self.entries, args, kwargs, n, self.who, self.fallback
            )
            if len(self._cache) >= self._SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = layout
        return layout
