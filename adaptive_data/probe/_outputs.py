"""Which of a module's outputs carry the examples' shares: an output that holds the batch is
kept; one that does not but is computed from kept ones alone (a model's own scalar loss,
computed from its logits) is skipped, its gradient already in theirs; one that depends on the
parameters otherwise cannot be split into examples, and one that holds the batch but is
computed from another kept output would count its share twice: a gradient reaching either
raises."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__: list[str] = []


def _reaches(start: Any, stops: Mapping[Any, int], params: frozenset[int]) -> tuple[set, bool]:
    """Walk the autograd graph from ``start``: the indices of the ``stops`` nodes met (not
    walked through) and whether a trainable parameter is reached without passing one."""
    met: set[int] = set()
    hit_param = False
    seen: set[int] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node is not start and node in stops:
            met.add(stops[node])
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in params:
            hit_param = True
            continue
        todo.extend(nxt for nxt, _ in node.next_functions)
    return met, hit_param


# What to do with each output leaf that requires grad: "keep" its gradient (it holds the
# batch), "skip" it (computed from kept outputs alone: its gradient reaches them),
# "unattributable" (no batch and it depends on the parameters otherwise: raise if a gradient
# reaches it), or ("nested", j): it holds the batch but is computed from kept output j, whose
# gradient would then count its share twice (raise if a gradient reaches it).
Action = Any


def output_actions(
    leaves: Sequence[Any], dims: Sequence[int | None], params: frozenset[int]
) -> dict[int, Action]:
    """The action for each output leaf that requires grad (see above). One walk of the
    autograd graph per output leaf when there are several; none for a single batch output."""
    grad_leaves = [
        i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad
    ]
    batch = [i for i in grad_leaves if (dim := dims[i]) is not None and dim >= 0]
    if len(grad_leaves) == 1 and batch:
        return {batch[0]: "keep"}
    stops = {leaves[i].grad_fn: i for i in batch if leaves[i].grad_fn is not None}
    actions: dict[int, Action] = {}
    for i in grad_leaves:
        fn = leaves[i].grad_fn
        met, hit = (set(), False) if fn is None else _reaches(fn, stops, params)
        met.discard(i)
        if i in batch:
            others = sorted(j for j in met if j != i)
            actions[i] = ("nested", others[0]) if others else "keep"
        else:
            actions[i] = "unattributable" if hit or fn is None else "skip"
    return actions


def nested(who: str, i: int, j: int, shape: list[int], grad: Tensor) -> None:
    raise ValueError(
        f"{who} cannot split the model's output {i} (shape {shape}) into examples' shares: it "
        f"is computed from the model's output {j}, whose gradient then holds its share too and "
        "would count it twice. Return only the outputs the loss reads (or outputs computed "
        "apart from each other)"
    )


def unattributable(who: str, name: str, shape: list[int], grad: Tensor) -> None:
    raise ValueError(
        f"the loss reads an output of {name} of shape {shape} that does not hold the batch "
        "(and depends on the parameters otherwise than through the outputs that do), so "
        f"{who} cannot split its gradient into examples; loss_fn should use outputs that hold "
        "the batch"
    )


def guard(who: str, name: str, leaf: Tensor, i: int, action: Action) -> None:
    """Hook ``leaf`` (output ``i`` of ``name``) to raise if a gradient reaches it, where its
    action says it cannot be attributed; nothing for the outputs kept or skipped."""
    if action == "unattributable":
        leaf.register_hook(functools.partial(unattributable, who, name, list(leaf.shape)))
    elif isinstance(action, tuple):
        leaf.register_hook(functools.partial(nested, who, i, action[1], list(leaf.shape)))
