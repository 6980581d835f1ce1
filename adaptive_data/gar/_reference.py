"""The reference batches as the training forward takes them: how a reference batch is passed
to the model (as the loop passes its training batches), checked against the training
forward's structure, and errors inside the model or ``loss_fn`` that name the reference.

A reference batch of dict rows (``{"input_ids": ..., "labels": ...}``, what a Hugging Face
split gives) is split by its ``"labels"`` and its other keys are keyword inputs; a loop that
calls ``model(batch["input_ids"])`` passes its one input positionally, and so is the
reference's one input then.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__: list[str] = []


class CallShape:
    """How the loop called the model at its first training forward: how many positional
    inputs, which keyword inputs, and each tensor's dtype and shape (for messages)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.positional = len(args)
        self.keywords = tuple(kwargs)
        self.text = describe(args, kwargs)
        self.kinds = _kinds(args, kwargs)


def _kinds(args: tuple, kwargs: dict) -> dict[str, bool]:
    """For each input that is a tensor, by place: whether it holds floating-point values."""
    places = {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    return {k: v.dtype.is_floating_point for k, v in places.items() if isinstance(v, Tensor)}


def describe(args: tuple, kwargs: dict) -> str:
    """``model(Tensor[16, 128] int64, attention_mask=Tensor[...])``: the call, for messages."""

    def one(value: Any) -> str:
        if isinstance(value, Tensor):
            return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        leaves = [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]
        return f"{type(value).__name__} of {len(leaves)} tensor(s)"

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return f"model({', '.join(parts)})"


def as_training_call(args: tuple, kwargs: dict, call: CallShape | None) -> tuple[tuple, dict]:
    """A reference batch's ``(args, kwargs)`` passed as the training forward's were: one
    keyword input (a dict batch's) positionally where the loop passes one positional input;
    raises, naming the reference, when the two cannot be the same call (another number of
    positional inputs, or floating-point values where the loop passes integers or the
    reverse)."""
    if call is None:
        return args, kwargs
    if not args and len(kwargs) == 1 and call.positional == 1 and not call.keywords:
        return (next(iter(kwargs.values())),), {}
    # Keyword inputs may differ (a Trainer's forward gets the labels, a reference batch's
    # are split off; optional inputs): a model that refuses them says so, and failed()
    # names the reference.
    kinds = _kinds(args, kwargs)
    if len(args) != call.positional or any(kinds.get(k, v) != v for k, v in call.kinds.items()):
        raise ValueError(
            f"GAR's reference batches do not match the training batches: a reference batch "
            f"calls {describe(args, kwargs)}, but the loop calls {call.text}. Make the "
            "reference batches the training batches' kind, e.g. ReferenceBatches(val_set, "
            "batch_size, collate_fn=...) returning (x, y) as the loop passes x to the model, "
            "or a dict whose keys other than 'labels' are the model's keyword inputs"
        )
    return args, kwargs


def failed(error: Exception, args: tuple, kwargs: dict, call: CallShape | None) -> RuntimeError:
    """The error to raise when the model or ``loss_fn`` failed on a reference batch: it names
    the reference and both calls (the original error is its cause)."""
    loop = "" if call is None else f"; the loop's training forward calls {call.text}"
    return RuntimeError(
        f"GAR's reference batch failed in the model's forward or in loss_fn: "
        f"{type(error).__name__}: {error}. The reference batch calls "
        f"{describe(args, kwargs)}{loop}: check the reference= batches (their shapes, dtypes "
        "and labels) against the training batches"
    )
