"""Batches as the probe sees them: a tensor, or a tuple/dict of tensors, with one batch size."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__: list[str] = []

Inputs = Any  # a Tensor, a tuple/list of tensors (positional), or a dict of tensors (keywords)


def call_args(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How ``x`` is passed to the model: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    raise TypeError(
        "x should be a Tensor, a tuple/list of tensors or a dict of tensors, "
        f"but got {type(x).__name__}"
    )


def batch_size(x: Inputs, what: str = "x") -> int:
    """The common size of dim 0 over the tensors in ``x``; raises if it is 0 or not common."""
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"{what} should contain at least one tensor, but got {type(x).__name__}")
    sizes = {tuple(t.shape[:1]) for t in leaves}
    if () in sizes:
        raise ValueError(f"{what} should have a batch dimension, but it holds a 0-dim tensor")
    if len(sizes) != 1:
        found = sorted(s[0] for s in sizes)
        raise ValueError(
            f"the tensors in {what} should share one batch size, but got sizes {found}"
        )
    (n,) = sizes.pop()
    if n == 0:
        raise ValueError(
            f"{what} is an empty batch (batch size 0); the probe needs at least one example"
        )
    return n


def check_same_batch(y: Any, n: int) -> None:
    """Raise if a tensor in the targets ``y`` does not have ``n`` rows."""
    for t in tree_flatten(y)[0]:
        if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != n):
            shape = tuple(t.shape)
            raise ValueError(
                f"y should have batch size {n} like x, but holds a tensor of shape {shape}"
            )


def per_example_losses(
    loss_fn: Callable[[Any, Any], Tensor], output: Any, y: Any, n: int
) -> Tensor:
    """``loss_fn(output, y)``, checked to be a floating tensor of shape ``[n]``."""
    losses = loss_fn(output, y)
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"loss_fn should return a Tensor of per-example losses, but got {type(losses).__name__}"
        )
    if losses.dim() == 0:
        raise ValueError(
            f"loss_fn should return per-example losses of shape [{n}], but got a scalar; "
            "use a loss with reduction='none'"
        )
    if tuple(losses.shape) != (n,):
        raise ValueError(
            f"loss_fn should return per-example losses of shape [{n}], "
            f"but got shape {list(losses.shape)}"
        )
    if not losses.is_floating_point():
        raise TypeError(
            f"loss_fn should return floating-point losses, but got dtype {losses.dtype}"
        )
    return losses
