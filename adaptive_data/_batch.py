"""Batches as the probe sees them: a tensor, or a tuple/dict of tensors, with one batch size."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["split_batch"]

Inputs = Any  # a Tensor, a tuple/list of tensors (positional), or a dict of tensors (keywords)


def split_batch(
    batch: Any, *, target_key: str = "labels", input_key: str | None = None
) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch: a pair ``(x, y)`` as it is, or a dict batch split by key.

    A dict follows the Hugging Face convention by default: the target is ``batch["labels"]``
    and every other key is a keyword input of the model (``input_ids``, ``attention_mask``),
    so the probe calls ``model(**inputs)``. With ``input_key`` the inputs are
    ``batch[input_key]`` alone, passed positionally (``model(batch["x"])``). The probe and
    ``GAR`` split dict batches with the defaults; for other names, split them with this.

    Raises if the dict lacks a named key (naming the keys it has) or holds nothing but its
    target.
    """
    if isinstance(batch, Mapping):
        keys = list(batch)
        if target_key not in batch:
            raise ValueError(
                f"the batch should hold its target under target_key={target_key!r}, but its "
                f"keys are {keys}; split it with adaptive_data.split_batch(batch, "
                "target_key=...)"
            )
        if input_key is not None:
            if input_key not in batch:
                raise ValueError(
                    f"the batch should hold its inputs under input_key={input_key!r}, but its "
                    f"keys are {keys}"
                )
            return batch[input_key], batch[target_key]
        inputs = {k: v for k, v in batch.items() if k != target_key}
        if not inputs:
            raise ValueError(f"the batch holds nothing but its target {target_key!r}: keys {keys}")
        return inputs, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(
        "a batch should be a pair (x, y) or a dict with its target under 'labels', but got "
        f"{type(batch).__name__}{length}"
    )


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


def lead_batch_size(x: Inputs, what: str = "x") -> int:
    """Dim 0 of the first tensor in ``x`` (the model's main input): the batch size of a
    training forward, whose other arguments may hold no batch (an attention mask ``[T, T]``)."""
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"{what} should contain at least one tensor, but got {type(x).__name__}")
    if leaves[0].dim() == 0 or leaves[0].shape[0] == 0:
        raise ValueError(
            f"the first tensor of {what} should hold the batch in dim 0, but has shape "
            f"{tuple(leaves[0].shape)}"
        )
    return int(leaves[0].shape[0])


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
