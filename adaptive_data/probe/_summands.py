"""A covered module whose output holds no batch but is added to a tensor that does: a learned
position embedding called on ``arange(T)`` and added to the token embeddings (GPT-2's ``wpe``,
BERT's position embeddings, a stock encoder's). Its share of each example's reward comes from
the gradient at the sum, where the examples are apart, instead of a replay of the whole model
at its root.

The sum is found in the forward's autograd graph from an input of a later covered call (the
first layer norm): that input is the sum itself, or reaches it through operations that keep
its shape (dropout). The module is then seen as called on its inputs broadcast to the sum's
examples (the embedding of every example's positions), whose output is what its own output was
broadcast to; its rule gives the shares, and with ``rows=`` only the rewarded rows'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._layout import CallLayout
from ._model_state import RngSnapshot
from ._plan import Entry

__all__: list[str] = []

# Backward nodes whose output has their input's shape: the path from the sum to a covered
# call's input may pass them (dropout, as a mask product or fused, a copy, a cast).
_SHAPE_KEEPING = frozenset(
    {"NativeDropoutBackward0", "MulBackward0", "CloneBackward0", "ToCopyBackward0"}
)
_DEPTH = 4  # nodes walked from a covered call's input towards the sum


@dataclasses.dataclass
class Loose:
    """A covered call whose output holds no batch, waiting for the sum that takes it."""

    entry: Entry
    output: Tensor
    args: tuple  # as kept (detached where the owner keeps them past the backward)
    rng: RngSnapshot | None


def find_sum(loose: Loose, x: Tensor) -> Any:
    """The ``AddBackward0`` node of the sum that adds ``loose``'s output into ``x``'s value,
    walking from ``x`` through shape-keeping nodes; None where there is none."""
    node, target = x.grad_fn, loose.output.grad_fn
    for _ in range(_DEPTH):
        if node is None or target is None:
            return None
        name = type(node).__name__
        if name == "AddBackward0":
            return node if any(f is target for f, _ in node.next_functions) else None
        if name not in _SHAPE_KEEPING:
            return None
        inputs = [f for f, _ in node.next_functions if f is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def broadcast_call(
    loose: Loose, sum_shape: Sequence[int], dim: int
) -> tuple[tuple, CallLayout] | None:
    """The loose call's tensor inputs broadcast as its output was, to a sum of shape
    ``sum_shape`` holding the batch in ``dim``, and the layout of that call; None where the
    output was not simply broadcast along the batch (or an input is not a tensor laid out as
    the output's leading dims: an index tensor of an Embedding, the input of a Linear)."""
    out = tuple(loose.output.shape)
    extra = len(sum_shape) - len(out)
    aligned = (1,) * extra + out
    if extra < 0 or aligned[dim] != 1:
        return None
    if any(a not in (1, s) for a, s in zip(aligned, sum_shape, strict=True)):
        return None
    lead = len(out) - 1  # the output's dims before its features
    args = []
    for a in loose.args:
        if not isinstance(a, Tensor) or tuple(a.shape[:lead]) != out[:lead]:
            return None
        target = (*sum_shape[: extra + lead], *a.shape[lead:])
        args.append(a.reshape((1,) * extra + tuple(a.shape)).expand(target))
    dims = tuple(dim for _ in args)
    return tuple(args), CallLayout(dims, (dim,), (True,))
