"""What a rule tells the reward engine about one module type, and the helpers rules share.

A rule answers, for one call of a module (its inputs, and ``B``, the gradient of
``sum_i l_i`` at its output, which the training backward computes anyway):

* the **dot**: ``tangent`` is the directional derivative of the output along the direction
  ``D`` of the module's own parameters; example i's share of ``<g_i, D>`` is
  ``<B_i, tangent_i>`` (docs/concepts.md);
* the **norms** (``reward="cosine"``): ``pieces`` gives each example's squared gradient norm
  and its share of the dot from the same per-example pieces;
* whether a subset of the **rows** gives exactly those rows' shares (``rows=``);
* whether the module **mixes examples** (BatchNorm with batch statistics);
* which **parameters** it covers (its own, or its children's too), and whether its
  tangent runs the module's forward again (the call's RNG state is then replayed).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = ["GhostRule", "Pieces", "Request", "Site", "Sums", "param_direction", "square_norms"]

Names = Collection[str]  # a module's trainable parameters (local names)
Direction = Mapping[str, Tensor]  # {local parameter name: direction}
# (sq, dot, kept): float32 [N] each (dot None without a direction), and the per-example
# gradients [N, numel] of the kept names (parameters used by several calls)
Pieces = tuple[Tensor, "Tensor | None", dict[str, Tensor]]


class Request(NamedTuple):
    """What the engine asks a rule's norm pieces for: the parameters ``names`` (local names),
    their ``direction`` (None: the norms alone) and the names whose per-example gradients to
    ``keep`` instead of squaring (a parameter several calls use: its per-example gradient is
    summed over its uses before it is squared)."""

    names: Names
    direction: Direction | None = None
    keep: Names = ()


class Site(NamedTuple):
    """One call of a module as a rule sees it: the module, its inputs, and the batch dim of
    every leaf of ``(args, kwargs)`` (``in_dims``) and of its output (``out_dims``), None
    where a leaf does not hold the batch."""

    module: nn.Module
    args: tuple
    kwargs: dict
    in_dims: Sequence[int | None]
    out_dims: Sequence[int | None]


def square_norms(t: Tensor) -> Tensor:
    """Sum of squares over every dim but the first, in float32."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float32).square()


def param_direction(module: nn.Module, name: str, direction: Mapping[str, Tensor]) -> Tensor | None:
    """The direction for ``module.<name>``: given, zero if frozen, None if the module has none."""
    param = getattr(module, name)
    if param is None:
        return None
    d = direction.get(name)
    return torch.zeros_like(param) if d is None else d


class Sums:
    """Accumulates a module's ``sq`` and (with a direction) ``dot`` over its parameters, and the
    per-example gradients of the names in ``keep`` (a parameter used by several calls: its
    per-example gradient is summed over its uses before it is squared)."""

    def __init__(self, n: int, device: torch.device, ask: Request) -> None:
        self.n = n
        self.sq = torch.zeros(n, device=device)
        self.direction = ask.direction
        self.dot = None if ask.direction is None else torch.zeros(n, device=device)
        self.keep = ask.keep
        self.kept: dict[str, Tensor] = {}

    def add(self, name: str, per_example: Tensor, rows: slice = slice(None)) -> None:
        """Add the parameter ``name``'s per-example gradients, ``[N, *param.shape]`` (or those
        of the examples ``rows``)."""
        g = per_example.flatten(1).float()
        if name in self.keep:
            if name not in self.kept:
                self.kept[name] = g.new_zeros(self.n, g.shape[1])
            self.kept[name][rows] += g
        else:
            self.sq[rows] += square_norms(g)
        if self.dot is not None:
            self.dot[rows] += g @ self.d(name).reshape(-1)

    def d(self, name: str) -> Tensor:
        """The direction of parameter ``name``, in float32."""
        if self.direction is None:  # rules read D only when they were given one
            raise RuntimeError(
                f"the direction of parameter {name!r} was read by a gradient-norm rule called "
                "without a direction (norms only)"
            )
        return self.direction[name].float()

    def result(self) -> Pieces:
        return self.sq, self.dot, self.kept


class GhostRule:
    """How the reward engine covers one module type: subclass it and register it with
    :func:`register_ghost_rule`.

    Only :meth:`tangent` is required; it gives the dot reward. Without the norm methods the
    cosine reward falls back to the generic path (the module's forward again and one backward
    per example); without :meth:`rows_independent` the module is computed on the whole batch
    under ``rows=``. A rule that gives :meth:`per_example_gradients` gets the same norm path as
    the built-in ones.

    Class attributes:
        recursive: the rule covers the parameters of the module's children too (as for
            ``nn.MultiheadAttention``, whose ``out_proj`` forward never runs).
        replays_forward: :meth:`tangent` runs the module's forward again; the call's RNG state
            is replayed around it so that dropout draws the same masks.
        independent_rows: each example's share depends on its own row alone, whatever the
            call (:meth:`rows_independent` decides per call where that depends on the mode).
        family: module types (with their subclasses) that :meth:`check` and
            :meth:`mixes_examples` speak for even where another type's forward is not this
            rule's (``SyncBatchNorm`` mixes examples as ``BatchNorm2d`` does).

    Which dim of each input and output holds the batch is not the rule's to find: the engine
    finds it by running the model on two batch sizes and hands it over.
    """

    recursive: ClassVar[bool] = False
    replays_forward: ClassVar[bool] = False
    independent_rows: ClassVar[bool] = False
    family: ClassVar[tuple[type[nn.Module], ...]] = ()

    def check(self, name: str, module: nn.Module) -> None:
        """Raise if ``module`` (named ``name`` in the model) cannot be probed without editing
        the model. Called once, when the engine plans the model."""

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        """The tangent of ``module(*args, **kwargs)`` along ``direction`` ({local parameter
        name: tensor}; a frozen parameter has no entry: direction 0), a pytree shaped like
        the module's output. For a layer whose output is linear in its parameters this is the
        layer's own forward with the direction in place of the parameters."""
        raise NotImplementedError(f"{type(self).__name__} gives no tangent")

    def pieces(self, site: Site, grads: Mapping[int, Tensor], ask: Request) -> Pieces | None:
        """Per-example squared gradient norms, shares of ``<g_i, D>`` (given a direction) and
        the per-example gradients to keep (:class:`Request`), from the gradients at the
        call's outputs (``grads``: output leaf index -> gradient). ``None``: the generic path
        computes them.

        The default covers a module with one input and one output whose batch dim the rule
        accepts (:meth:`moves_batch`): it moves the batch to dim 0 and calls
        :meth:`batch_pieces`.
        """
        inputs = tree_flatten((site.args, site.kwargs))[0]
        if len(grads) != 1 or len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            return None
        ((i, grad),) = grads.items()
        din, dout = site.in_dims[0], site.out_dims[i]
        if din is None or dout is None or din < 0 or din != dout:
            return None
        if not self.moves_batch(site.module, dout, grad.dim()):
            return None
        x, b = inputs[0].movedim(din, 0), grad.movedim(dout, 0)
        return self.batch_pieces(site.module, x, b, ask)

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        """Whether :meth:`batch_pieces` holds for a call whose output (of ``ndim`` dims) holds
        the batch in ``dim``, moved to dim 0: true where the module acts on every position of
        that dim alike (a Linear over any leading dim). Default: dim 0 only."""
        return dim == 0

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces | None:
        """:meth:`pieces` of a one-input call with the batch in dim 0 of the input ``x`` and the
        output gradient ``b``. The default sums :meth:`per_example_gradients`."""
        per_example = self.per_example_gradients(module, x, b, ask.names)
        if per_example is None:
            return None
        sums = Sums(b.shape[0], b.device, ask)
        for name in ask.names:
            sums.add(name, per_example[name])
        return sums.result()

    def per_example_gradients(
        self, module: nn.Module, x: Tensor, b: Tensor, names: Names
    ) -> Mapping[str, Tensor] | None:
        """``{name: [N, *param.shape]}``: each example's gradient of the parameters ``names``
        from the input ``x`` and output gradient ``b`` (batch in dim 0), or ``None`` (the
        generic path). The simplest way to give a rule the cosine reward."""
        return None

    def rows_independent(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Whether each example's share depends on that example's inputs and output gradient
        alone, so that a subset of the rows gives exactly those rows' shares (``rows=``).
        Default: the class's ``independent_rows`` (False: the call is computed on the whole
        batch, then cut)."""
        return self.independent_rows

    def mixes_examples(self, module: nn.Module) -> bool:
        """Whether one example's output depends on another's in the module's present mode
        (BatchNorm with batch statistics)."""
        return False
