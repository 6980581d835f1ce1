"""``nn.Linear``: ``y = x W^T + b`` over any leading dims.

The dot: the layer's own forward with ``D`` in place of ``(W, b)``. The norms: example i's
weight gradient is ``G_i^T A_i`` (``A_i`` its inputs ``[T, in]``, ``G_i`` its output gradients
``[T, out]``), squared by whichever form is cheaper for the shapes: rank one (``T = 1``), the
Gram form ``<A_i A_i^T, G_i G_i^T>`` (``T x T``), or the gradient itself.
"""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, Sums, param_direction, square_norms
from ._registry import register_ghost_rule

__all__ = ["LinearRule", "linear_pieces"]


def linear_pieces(x: Tensor, b: Tensor, ask: Request) -> Pieces:
    """The pieces of ``y = x W^T + b`` (names ``"weight"``, ``"bias"``) from the input ``x``
    and the output gradient ``b``, batch in dim 0 of both."""
    names, keep = ask.names, ask.keep
    n = b.shape[0]
    a = x.reshape(n, -1, x.shape[-1]).float()  # [N, T, in]
    g = b.reshape(n, -1, b.shape[-1]).float()  # [N, T, out]
    out = Sums(n, b.device, ask)
    if "weight" in names:
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if "weight" in keep:  # the per-example gradient itself, [N, out, in]
            out.add("weight", g.transpose(1, 2) @ a)
        elif t == 1:  # rank one: ||g a^T||^2 = ||g||^2 ||a||^2, <g a^T, D> = g^T D a
            out.sq += square_norms(a) * square_norms(g)
            if out.dot is not None:
                out.dot += ((a.squeeze(1) @ out.d("weight").T) * g.squeeze(1)).sum(1)
        elif t * t * (d_in + d_out) < t * d_in * d_out:  # Gram form, and D a for the dot
            out.sq += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).flatten(1).sum(1)
            if out.dot is not None:
                out.dot += ((a @ out.d("weight").T) * g).flatten(1).sum(1)
        else:  # the per-example gradient itself, [N, out, in]
            out.add("weight", g.transpose(1, 2) @ a)
    if "bias" in names:
        out.add("bias", g.sum(1))
    return out.result()


@register_ghost_rule(nn.Linear)
class LinearRule(GhostRule):
    """``nn.Linear``: exact dot and norms from the layer's input and output gradient."""

    independent_rows = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        return F.linear(
            args[0],
            cast(Tensor, param_direction(module, "weight", direction)),
            param_direction(module, "bias", direction),
        )

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        return dim < ndim - 1  # any dim but the features

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        return linear_pieces(x, b, ask)
