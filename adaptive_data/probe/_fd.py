"""Forward-only rewards: ``<g_i, D>`` by a central finite difference at the model's outputs.

With ``out_i`` the model's output for example i and ``B_i = dL/d out_i`` the gradient the
user's own backward leaves there, ``<g_i, D> = <B_i, J_i D>`` and

    J_i D ~= (out_i(theta + eps D) - out_i(theta - eps D)) / (2 eps)

two no-grad forwards of the rewarded rows (``torch.func.functional_call`` on moved copies of
the parameters and cloned buffers: the model is never edited), with the training forward's
RNG state replayed before each so that dropout draws the same masks. ``eps`` is relative:
``eps = sqrt(u) * max(||theta||, 1) / ||D||`` with ``u`` the parameters' machine epsilon
(3.5e-4 in float32, 1.5e-8 in float64). Smaller than the textbook ``cbrt(u)`` of a smooth
function: on small ReLU networks the truncation error (kinks crossed, curvature) dominated at
every step measured down to 1e-4, and the rounding errors of the two forwards mostly cancel in
the dot with the output gradient. Measured errors: docs/howto-gar.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._model_state import RngSnapshot, preserved
from ._outputs import guard
from ._sharding import Shards, local

__all__: list[str] = []


def relative_step(dtype: torch.dtype) -> float:
    """``sqrt(machine epsilon)`` of ``dtype``: ``eps * ||D|| / ||theta||`` of the difference."""
    return float(torch.finfo(dtype).eps) ** 0.5


@dataclasses.dataclass
class Kept:
    """What ``estimator='fd'`` keeps of one training forward of the root module: its inputs
    (the rewarded rows only, or the whole batch where the rows cannot be forwarded alone), the
    RNG state it started from (None: it drew no random numbers) and the gradients at its
    outputs (output leaf index -> (gradient of the rewarded rows, batch dim))."""

    args: tuple
    kwargs: dict
    whole: bool  # the inputs hold the whole batch: cut the outputs to the rows
    rng: RngSnapshot | None
    dims: tuple[int | None, ...]  # batch dim of each output leaf (None: no batch)
    grads: dict[int, tuple[Tensor, int]] = dataclasses.field(default_factory=dict)
    versions: list[tuple[Tensor, int]] = dataclasses.field(default_factory=list)

    def release(self) -> None:
        """Let go of the inputs and gradients (memory: the hooks on the outputs hold this)."""
        self.args, self.kwargs, self.rng = (), {}, None
        self.grads.clear()
        self.versions.clear()


def rng_changed(before: RngSnapshot) -> bool:
    """Whether the global RNG moved since ``before`` (the forward drew random numbers)."""
    if not torch.equal(before.cpu, torch.get_rng_state()):
        return True
    return any(
        not torch.equal(state, torch.cuda.get_rng_state(d))
        for d, state in zip(before.devices, before.cuda, strict=True)
    )


def cut_inputs(
    args: tuple, kwargs: dict, dims: Sequence[int | None], rows: Tensor
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every tensor that holds the batch (in ``dims``, one per leaf)
    cut to ``rows``; the others as they are."""
    leaves, spec = tree_flatten((args, kwargs))
    kept = [
        leaf.index_select(dim, rows.to(leaf.device))
        if isinstance(leaf, Tensor) and dim is not None and dim >= 0
        else leaf
        for leaf, dim in zip(leaves, dims, strict=True)
    ]
    return tree_unflatten(kept, spec)


def register(
    kept: Kept, leaves: Sequence[Any], actions: Mapping[int, Any], rows: Tensor | None
) -> None:
    """Tensor hooks on the output leaves: keep the gradients of the rewarded rows of the
    outputs that count, raise where a gradient reaches one that cannot be attributed."""
    for i, action in actions.items():
        leaf = leaves[i]
        if action == "keep":
            leaf.register_hook(functools.partial(_on_grad, kept, i, rows))
        else:
            guard("GAR(estimator='fd')", "the model", leaf, i, action)


def _on_grad(kept: Kept, i: int, rows: Tensor | None, grad: Tensor) -> None:
    dim = cast(int, kept.dims[i])  # only outputs that hold the batch are kept
    grad = grad.detach()
    if rows is not None:
        grad = grad.index_select(dim, rows.to(grad.device))
    kept.grads[i] = (grad, dim)


# ---------------------------------------------------------------------- the rewards


def central_difference(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    d: Mapping[str, Tensor],
    args: tuple,
    kwargs: dict,
    rng: RngSnapshot | None,
    rel_step: float | None = None,
    shards: Shards | None = None,
) -> tuple[Any, Any, float] | None:
    """The model's outputs at ``theta + eps D`` and ``theta - eps D``: two no-grad forwards
    of ``model(*args, **kwargs)`` on moved copies of the parameters and cloned buffers (the
    model is never edited), the RNG state ``rng`` replayed before each (every device's), and
    ``eps = rel_step * max(||theta||, 1) / ||D||`` (``rel_step`` default: the square root of
    the parameters' machine epsilon). ``None`` when ``D`` is zero.

    With the ``shards`` of an FSDP2 model, the norms are summed over the ranks and each rank's
    shards are moved in place instead (FSDP's forward gathers the moved weights), then put back
    bit for bit, the buffers too: every rank must call it (the forwards are collectives).
    """
    names = list(params)
    p_list = [params[k].detach() for k in names]
    d_list = [d[k] for k in names]
    first = local(p_list[0])
    dtype = first.dtype if first.is_floating_point() else torch.float32
    sharded = shards is not None and shards.active
    if sharded:
        sq = shards.sums(  # type: ignore[union-attr]
            {
                k: torch.stack([local(p).double().square().sum(), local(t).double().square().sum()])
                for k, p, t in zip(names, p_list, d_list, strict=True)
            }
        )
        norms = sq.sqrt()
    else:
        norms = torch.stack(
            [
                torch.stack(torch._foreach_norm(p_list)).double().square().sum(),
                torch.stack(torch._foreach_norm(d_list)).double().square().sum(),
            ]
        ).sqrt()
    theta_norm, d_norm = (float(v) for v in norms)  # one host sync
    if d_norm == 0.0:
        return None
    step = relative_step(dtype) if rel_step is None else rel_step
    eps = step * max(theta_norm, 1.0) / d_norm
    if sharded:
        return _moved_in_place(model, cast(Shards, shards), p_list, d_list, args, kwargs, rng, eps)
    outs = []
    for sign in (1.0, -1.0):
        moved = dict(zip(names, torch._foreach_add(p_list, d_list, alpha=sign * eps), strict=True))
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        replay = rng.replay() if rng is not None else contextlib.nullcontext()
        with torch.no_grad(), replay:
            outs.append(torch.func.functional_call(model, {**moved, **buffers}, args, kwargs))
        del moved, buffers
    return outs[0], outs[1], eps


def _moved_in_place(
    model: nn.Module,
    shards: Shards,
    params: list[Tensor],
    d: list[Tensor],
    args: tuple,
    kwargs: dict,
    rng: RngSnapshot | None,
    eps: float,
) -> tuple[Any, Any, float]:
    """:func:`central_difference`'s forwards on an FSDP2 model: its shards moved in place
    (``functional_call`` would swap the sharded parameters, which FSDP's forward replaces by
    the weights it gathers from the shards)."""
    outs = []
    with shards.moved(params, d, (eps, -eps)) as move:
        for k in range(2):
            move(k)
            replay = rng.replay() if rng is not None else contextlib.nullcontext()
            with preserved(model), torch.no_grad(), replay:
                outs.append(model(*args, **kwargs))
    return outs[0], outs[1], eps


def output_rewards(
    core: nn.Module,
    kept: Kept,
    params: Mapping[str, nn.Parameter],
    d: Mapping[str, Tensor],
    rows: Tensor | None,
    n: int,
    shards: Shards | None = None,
) -> Tensor:
    """``<B_i, J_i D>`` of the rewarded rows (``rows``; None: all ``n``), ``[m]``, float32
    (float64 for a float64 model): the :func:`central_difference` of the kept inputs dotted
    with the kept output gradients."""
    for t, version in kept.versions:
        if t._version != version:
            raise RuntimeError(
                "an input of the model was modified in place after its training forward, so "
                "GAR(estimator='fd') cannot run it again; do not edit the batch in place "
                "before step()"
            )
    first = local(next(iter(params.values())))
    dtype = first.dtype if first.is_floating_point() else torch.float32
    m = n if rows is None else len(rows)
    moved = None
    if kept.grads:  # on every rank of an FSDP2 model (FdKeeper.rewards agrees first)
        moved = central_difference(core, params, d, kept.args, kept.kwargs, kept.rng, shards=shards)
    if moved is None:
        return torch.zeros(m, dtype=torch.float32, device=first.device)
    plus, minus = (tree_flatten(out)[0] for out in moved[:2])
    eps = moved[2]
    r = torch.zeros(m, dtype=torch.float64, device=first.device)
    for i, (grad, dim) in kept.grads.items():
        diff = plus[i] - minus[i]
        if kept.whole and rows is not None:
            diff = diff.index_select(dim, rows.to(diff.device))
        g = grad.movedim(dim, 0).reshape(m, -1).double()
        r += (g * diff.movedim(dim, 0).reshape(m, -1).double()).sum(1) / (2.0 * eps)
    return r if dtype == torch.float64 else r.float()
