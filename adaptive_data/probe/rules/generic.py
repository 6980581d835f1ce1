"""The last resort, for a module no rule covers (bare parameters, a type nobody registered):
the tangent by forward-mode AD of the module alone, and the norms from one backward per
example through the module's forward run again. Exact, and several times a layer's cost."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._model_state import RngSnapshot, forward_ad_friendly
from ._base import Direction, GhostRule, Pieces, Request, Sums

__all__ = ["FALLBACK_RULE", "JvpRule", "generic_pieces", "jvp_tangent"]


def jvp_tangent(
    module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
) -> Any:
    """Tangent of ``module(*args, **kwargs)`` along ``direction`` by forward-mode AD.

    Only the parameters named in ``direction`` (dotted names relative to ``module``) move;
    everything else, children included, keeps its value.
    """
    with torch.no_grad(), forward_ad_friendly(), fwad.dual_level():
        duals = {
            name: fwad.make_dual(module.get_parameter(name).detach(), d)
            for name, d in direction.items()
        }
        out = torch.func.functional_call(module, duals, args, kwargs)
        leaves, spec = tree_flatten(out)
        tangents = []
        for leaf in leaves:
            t = fwad.unpack_dual(leaf).tangent if isinstance(leaf, Tensor) else None
            if t is None and isinstance(leaf, Tensor):
                t = torch.zeros_like(leaf)
            tangents.append(t)
    return spec.unflatten(tangents)


_COTANGENT_CHUNK = 8  # examples per batched backward of the generic norm rule


def generic_pieces(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    rng: RngSnapshot | None,
    grads: Mapping[int, Tensor],
    dims: Sequence[int | None],
    names: Sequence[str],
    direction: Mapping[str, Tensor] | None,
    keep: Collection[str],
) -> Pieces:
    """Per-example gradients of ``module``'s parameters ``names`` (dotted, relative to it), for
    any module: its forward is run again on the whole batch (the call's RNG state replayed, so
    dropout draws the same masks) and one backward per example, batched, takes the gradient at
    its outputs restricted to that example (``grads``: output index -> gradient, batch in
    ``dims[index]``). Exact for examples that are independent in the module (else each
    example's share, as ghost defines it); costs one forward and N backwards of the module."""
    params = {nm: cast(Tensor, module.get_parameter(nm)).detach().requires_grad_() for nm in names}
    replay = rng.replay() if rng is not None else contextlib.nullcontext()
    with torch.enable_grad(), replay:
        out = torch.func.functional_call(module, params, args, kwargs)
    leaves = tree_flatten(out)[0]
    used = [(leaves[i], g, cast(int, dims[i])) for i, g in sorted(grads.items())]
    first, first_dim = used[0][1], used[0][2]
    n = first.shape[first_dim]
    sums = Sums(n, first.device, Request(names, direction, keep))
    for lo in range(0, n, _COTANGENT_CHUNK):
        c = min(_COTANGENT_CHUNK, n - lo)
        rows = torch.arange(lo, lo + c, device=first.device)
        cotangents = []
        for _, g, dim in used:
            g0 = g.movedim(dim, 0)
            z = g0.new_zeros(c, *g0.shape)
            z[torch.arange(c, device=g.device), rows] = g0[rows]
            cotangents.append(z.movedim(1, dim + 1))
        got = torch.autograd.grad(
            [o for o, _, _ in used],
            list(params.values()),
            cotangents,
            retain_graph=lo + c < n,
            allow_unused=True,
            is_grads_batched=True,
        )
        for (nm, p), g in zip(params.items(), got, strict=True):
            sums.add(nm, p.new_zeros(c, *p.shape) if g is None else g, rows=slice(lo, lo + c))
    return sums.result()


class JvpRule(GhostRule):
    """The rule of a module no registered rule covers, and of the model's root: the tangent by
    forward-mode AD (which replays the forward), the norms by the generic path."""

    replays_forward = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        return jvp_tangent(module, args, kwargs, direction)


FALLBACK_RULE = JvpRule()
