"""The affine normalisations: ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.RMSNorm``.

Each is ``y = xhat * weight + bias`` with ``xhat`` the normalised input, which does not depend
on the parameters. The dot: the layer's own forward with ``D`` in place of ``(weight, bias)``.
The norms: example i's gradients are the sums of ``B_i * xhat_i`` and of ``B_i`` over the dims
that are not the parameter's. BatchNorm with batch statistics mixes the examples: each
example's share is then its part of the batch gradient (docs/concepts.md).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, Sums, param_direction
from ._registry import register_ghost_rule

__all__ = ["BatchNormRule", "GroupNormRule", "LayerNormRule", "RMSNormRule", "affine_pieces"]


def affine_pieces(normalised: Tensor, b: Tensor, channel_dims: list[int], ask: Request) -> Pieces:
    """Per-example gradients of (weight, bias) of an affine normalisation: sums of ``b * xhat``
    and of ``b`` over the dims that are not the parameter's (``channel_dims``, batch in 0)."""
    n = b.shape[0]
    own = [0, *channel_dims]
    other = [d for d in range(b.dim()) if d not in own]
    out = Sums(n, b.device, ask)
    g = b.float()
    if "weight" in ask.names:
        out.add("weight", (g * normalised.float()).sum(other) if other else g * normalised.float())
    if "bias" in ask.names:
        out.add("bias", g.sum(other) if other else g)
    return out.result()


def _trailing(b: Tensor, shape: Any) -> list[int]:
    """The dims of ``b`` that a trailing ``normalized_shape`` covers."""
    k = len(shape)
    return list(range(b.dim() - k, b.dim()))


def uses_batch_stats(module: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a BatchNorm normalises by the batch's statistics (train mode, or no running
    statistics)."""
    return module.training or (module.running_mean is None and module.running_var is None)


@register_ghost_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(GhostRule):
    """BatchNorm: with batch statistics each example's share of the batch gradient."""

    family = (nn.modules.batchnorm._BatchNorm,)

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        bn = cast(nn.modules.batchnorm._BatchNorm, module)
        batch_stats = uses_batch_stats(bn)
        # With batch statistics the running buffers are not read: pass None so nothing is updated.
        return F.batch_norm(
            args[0],
            None if batch_stats else bn.running_mean,
            None if batch_stats else bn.running_var,
            param_direction(bn, "weight", direction),
            param_direction(bn, "bias", direction),
            training=batch_stats,
            momentum=0.0,
            eps=bn.eps,
        )

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        bn = cast(nn.modules.batchnorm._BatchNorm, module)
        batch_stats = uses_batch_stats(bn)
        xhat = F.batch_norm(
            x,
            None if batch_stats else bn.running_mean,
            None if batch_stats else bn.running_var,
            None,
            None,
            training=batch_stats,
            momentum=0.0,
            eps=bn.eps,
        )
        return affine_pieces(xhat, b, [1], ask)

    def rows_independent(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return not self.mixes_examples(module)

    def mixes_examples(self, module: nn.Module) -> bool:
        return uses_batch_stats(cast(nn.modules.batchnorm._BatchNorm, module))


@register_ghost_rule(nn.LayerNorm)
class LayerNormRule(GhostRule):
    """LayerNorm over the trailing ``normalized_shape``."""

    independent_rows = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        ln = cast(nn.LayerNorm, module)
        return F.layer_norm(
            args[0],
            ln.normalized_shape,
            param_direction(ln, "weight", direction),
            param_direction(ln, "bias", direction),
            ln.eps,
        )

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        return dim < ndim - len(cast(nn.LayerNorm, module).normalized_shape)

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        ln = cast(nn.LayerNorm, module)
        xhat = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
        return affine_pieces(xhat, b, _trailing(b, ln.normalized_shape), ask)


@register_ghost_rule(nn.GroupNorm)
class GroupNormRule(GhostRule):
    """GroupNorm: statistics per example and group."""

    independent_rows = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        gn = cast(nn.GroupNorm, module)
        return F.group_norm(
            args[0],
            gn.num_groups,
            param_direction(gn, "weight", direction),
            param_direction(gn, "bias", direction),
            gn.eps,
        )

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        gn = cast(nn.GroupNorm, module)
        xhat = F.group_norm(x, gn.num_groups, None, None, gn.eps)
        return affine_pieces(xhat, b, [1], ask)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register_ghost_rule(nn.RMSNorm)
    class RMSNormRule(GhostRule):
        """RMSNorm over the trailing ``normalized_shape`` (a weight, no bias)."""

        independent_rows = True

        def tangent(
            self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction
        ) -> Any:
            return F.rms_norm(
                args[0],
                module.normalized_shape,  # type: ignore[arg-type]
                param_direction(module, "weight", direction),
                module.eps,  # type: ignore[arg-type]
            )

        def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
            return dim < ndim - len(module.normalized_shape)  # type: ignore[arg-type]

        def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
            shape = torch.Size(module.normalized_shape)  # type: ignore[arg-type]
            xhat = F.rms_norm(x, list(shape), None, module.eps)  # type: ignore[arg-type]
            return affine_pieces(xhat, b, _trailing(b, shape), ask)
