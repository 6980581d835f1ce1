"""One call of a covered module, kept until its output gradients arrive, and what it adds to
the rewards: its share of ``<g_i, D>`` from the rule's tangent, or (for the cosine) the rule's
per-example pieces, summed into an :class:`Accumulator`."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._layout import CallLayout
from ._model_state import RngSnapshot
from ._plan import Entry
from .rules import FALLBACK_RULE, Pieces, Request, Site, generic_pieces, square_norms

__all__: list[str] = []


class Accumulator:
    """Sums each call's share into ``r`` (and, for the cosine, the squared norms ``sq``); the
    per-example gradients of shared parameters are summed over their calls before squaring."""

    def __init__(self, n: int, device: torch.device, norms: bool, per_module: bool = False):
        self.r = torch.zeros(n, dtype=torch.float32, device=device)
        self.sq = torch.zeros(n, dtype=torch.float32, device=device) if norms else None
        self.kept: dict[str, Tensor] = {}
        # each module's share of sum_i r_i, kept only for the sum check's diagnosis
        self.module_sums: dict[str, Tensor] | None = {} if per_module else None

    def add(
        self,
        name: str,
        dot: Tensor,
        sq: Tensor | None = None,
        kept: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.r += dot
        if sq is not None and self.sq is not None:
            self.sq += sq
        for g, t in (kept or {}).items():
            self.kept[g] = self.kept[g] + t if g in self.kept else t
        if self.module_sums is not None:
            self.module_sums[name] = self.module_sums.get(name, 0) + dot.sum()

    def add_rows(self, name: str, other: Accumulator, rows: Tensor) -> None:
        """Add the rows ``rows`` of another accumulator's sums (one call, computed on the
        whole batch) to this one, whose rows are those."""
        sq = None if other.sq is None else other.sq[rows]
        kept = {g: t[rows] for g, t in other.kept.items()}
        self.add(name, other.r[rows], sq, kept)

    def result(self) -> tuple[Tensor, Tensor | None]:
        """``(r, sq)``; ``sq`` None without norms."""
        if self.sq is not None:
            for t in self.kept.values():
                self.sq += square_norms(t)
            self.kept = {}
        return self.r, self.sq


class Call:
    """One forward call of a covered module: its inputs (and RNG state, for rules that replay
    the forward), kept until its outputs' gradients arrive; :meth:`contribute` adds its share."""

    def __init__(
        self,
        entry: Entry,
        params: Mapping[str, str],
        layout: CallLayout,
        shared: Collection[str],
        args: tuple,
        kwargs: dict,
        rng: RngSnapshot | None,
    ) -> None:
        self.entry = entry
        self.params = dict(params)
        self.layout = layout
        self.shared = shared
        self.args: tuple | None = args
        self.kwargs: dict | None = kwargs
        self.rng = rng
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        self.versions = [(t, t._version) for t in leaves]
        self.expected = 0  # output tensors whose gradient is awaited
        self.grads: dict[int, Tensor] = {}
        self._tangents: list[Any] | None = None
        # Why the generic path computed this call's share, once it did (None: it did not)
        self.slow: str | None = None

    def _why_generic(self) -> str:
        """Why this call's share takes the generic path (for messages and metrics)."""
        if self.entry.root:
            return (
                "parameters whose module's output holds no batch are covered by replaying "
                "the whole model"
            )
        if self.entry.rule is FALLBACK_RULE:
            return "no rule covers its type"
        return f"its rule ({type(self.entry.rule).__name__}) does not cover this call"

    def check_inputs(self) -> None:
        """Raise if an input was modified in place after the forward (it would be read stale)."""
        for t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    f"an input of module {self.entry.name!r} was modified in place after its "
                    "forward, so its share of the rewards cannot be recomputed from it (a "
                    "GradientProbe with estimator='jvp' does not need it)"
                )

    def local(self, direction: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The module's part of ``direction``, by local parameter name."""
        return {n: direction[g] for n, g in self.params.items()}

    def _dtype(self, local: Mapping[str, Tensor] | None) -> torch.dtype | None:
        """The dtype the rule computes in: the direction's (the parameters'). Under autocast
        the kept inputs and output gradients may be in a lower precision (bf16, fp16): they
        are cast up to it, as the rule mixes them with the direction."""
        for t in (local or {}).values():
            return t.dtype
        params = [p for _, p in self.entry.module.named_parameters()]
        return params[0].dtype if params else None

    def tangents(self, direction: Mapping[str, Tensor]) -> list[Any]:
        if self._tangents is None:
            self.check_inputs()
            local = self.local(direction)
            dtype = self._dtype(local)
            module = self.entry.module
            args, kwargs = _as_dtype((self.args or (), self.kwargs or {}), dtype)
            rule = FALLBACK_RULE if self.entry.root else self.entry.rule
            if rule is FALLBACK_RULE:  # a forward-mode replay of the module (or the model)
                self.slow = self._why_generic()
            if self.rng is None:
                out = rule.tangent(module, args, kwargs, local)
            else:
                with self.rng.replay():
                    out = rule.tangent(module, args, kwargs, local)
            self._tangents = tree_flatten(out)[0]
        return self._tangents

    def pieces(self, grads: Mapping[int, Tensor], direction: Mapping[str, Tensor] | None) -> Pieces:
        """The module's per-example squared gradient norms, its share of ``<g_i, D>`` (given
        ``direction``) and the per-example gradients of its shared parameters (by global
        name), from the gradients at its outputs (``grads``: output index -> gradient)."""
        self.check_inputs()
        module, args, kwargs = self.entry.module, self.args or (), self.kwargs or {}
        names = list(self.params)
        keep = [n for n, g in self.params.items() if g in self.shared]
        local = None if direction is None else self.local(direction)
        dtype = self._dtype(local)
        args, kwargs = _as_dtype((args, kwargs), dtype)
        grads = {i: _as_dtype(g, dtype) for i, g in grads.items()}
        out: Pieces | None = None
        if not self.entry.root:
            site = Site(module, args, kwargs, self.layout.inputs, self.layout.outputs)
            rule = self.entry.rule
            # a rule that replays the forward draws its random numbers from the call's state
            replay = self.rng.replay() if self.rng is not None and rule.replays_forward else None
            with replay or contextlib.nullcontext():
                out = rule.pieces(site, grads, Request(names, local, keep))
        if out is None:
            self.slow = self._why_generic()
            out = generic_pieces(
                module, args, kwargs, self.rng, grads, self.layout.outputs, names, local, keep
            )
        sq, dot, kept = out
        return sq, dot, {self.params[n]: t for n, t in kept.items()}

    def contribute(
        self,
        acc: Accumulator,
        grads: Mapping[int, Tensor],
        direction: Mapping[str, Tensor],
        norms: bool,
    ) -> None:
        """Add this call's share of ``<g_i, D>`` (and with ``norms`` its per-example squared
        gradient norms) to ``acc``, from the gradients at its outputs."""
        if not grads:
            return
        if norms:
            sq, dot, kept = self.pieces(grads, direction)
            if dot is None:  # a norm rule given a direction returns its share: a broken rule
                raise RuntimeError(
                    f"the gradient-norm rule of module {self.entry.name!r} "
                    f"({type(self.entry.module).__name__}) returned no share of the rewards "
                    "although it was given a direction"
                )
            acc.add(self.entry.name, dot, sq, kept)
            return
        tangents = self.tangents(direction)
        for i, grad in grads.items():
            acc.add(
                self.entry.name,
                per_example_dot(grad, tangents[i], cast(int, self.layout.outputs[i])),
            )

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the examples ``rows`` (sorted indices into the batch) of the inputs:
        their shares are then exactly those of the whole batch's same rows, for a call that
        :func:`rows_independent` accepts. Inputs that do not hold the batch stay whole."""
        leaves, spec = tree_flatten((self.args or (), self.kwargs or {}))
        kept = [
            leaf.index_select(dim, rows.to(leaf.device))
            if isinstance(leaf, Tensor) and dim is not None and dim >= 0
            else leaf
            for leaf, dim in zip(leaves, self.layout.inputs, strict=True)
        ]
        self.args, self.kwargs = tree_unflatten(kept, spec)
        self.versions = []  # copies made at the forward: no later in-place edit reaches them

    def release(self) -> None:
        """Let go of the inputs and gradients (memory)."""
        self.args = self.kwargs = self._tangents = None
        self.grads = {}
        self.versions = []


def _as_dtype(tree: Any, dtype: torch.dtype | None) -> Any:
    """``tree`` with its real floating tensors of another dtype cast to ``dtype``."""
    if dtype is None or not dtype.is_floating_point:
        return tree
    return tree_map(
        lambda t: (
            t.to(dtype)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype
            else t
        ),
        tree,
    )


def needs_rng(entry: Entry, norms: bool) -> bool:
    """Whether a call's RNG state is needed: the rule replays the forward, or (for the norms)
    the generic rule may."""
    return entry.rule.replays_forward or entry.root or norms


def per_example_dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``sum`` over every dim but ``dim`` of ``a * b``, as a float32 vector, without ``a * b``."""
    a = a.movedim(dim, 0).reshape(a.shape[dim], 1, -1)
    b = b.movedim(dim, 0).reshape(b.shape[dim], -1, 1)
    return torch.bmm(a.float(), b.float()).view(-1)


def rows_independent(entry: Entry, layout: CallLayout, args: tuple, kwargs: dict) -> bool:
    """Whether this call's shares of a subset of the batch's rows can be computed from those
    rows alone: each input that holds the batch does so in one known dim, and the module does
    not mix examples (no batch statistics, no per-batch counts, no mask that folds the batch
    into another dim) nor replay randomness."""
    if entry.root or any(d is not None and d < 0 for d in layout.inputs):
        return False
    return entry.rule.rows_independent(entry.module, args, kwargs)
