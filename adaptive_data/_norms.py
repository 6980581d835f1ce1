"""Per-example squared gradient norms ``||g_i(theta_m)||^2`` of one module, from its input and
the gradient at its output, without materialising more than one layer's per-example gradients.

Used by ``GradientProbe(reward="cosine")`` with ``method="ghost"``. Each rule receives the
module, its call's ``args``/``kwargs``, the gradient ``B`` of ``sum_i l_i`` at its output (batch
in dim 0) and the names of its trainable parameters, and returns a float32 ``[N]``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

__all__: list[str] = []

NormFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Tensor, Collection[str]], Tensor]

_NORM_RULES: dict[type[nn.Module], NormFn] = {}


def _register(*types: type[nn.Module]) -> Callable[[NormFn], NormFn]:
    def decorate(fn: NormFn) -> NormFn:
        for cls in types:
            _NORM_RULES[cls] = fn
        return fn

    return decorate


def norm_rule(module: nn.Module) -> NormFn | None:
    return _NORM_RULES.get(type(module))


def supported() -> list[str]:
    return sorted(cls.__name__ for cls in _NORM_RULES)


def _sq(t: Tensor) -> Tensor:
    """Sum of squares over every dim but the first, in float32."""
    return t.float().pow(2).flatten(1).sum(1)


@_register(nn.Linear)
def _linear(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    n = b.shape[0]
    a = args[0].reshape(n, -1, args[0].shape[-1]).float()  # [N, T, in]
    g = b.reshape(n, -1, b.shape[-1]).float()  # [N, T, out]
    out = torch.zeros(n, device=b.device)
    if "weight" in names:
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if t == 1:
            out += _sq(a) * _sq(g)
        elif t * t * (d_in + d_out) < t * d_in * d_out:  # Gram form
            out += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).flatten(1).sum(1)
        else:  # the per-example gradient itself, [N, out, in]
            out += _sq(g.transpose(1, 2) @ a)
    if "bias" in names:
        out += _sq(g.sum(1))
    return out


_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


@_register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    conv = cast(nn.modules.conv._ConvNd, module)
    n = b.shape[0]
    out = torch.zeros(n, device=b.device)
    if "weight" in names:
        x = args[0]
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding: Any = 0
        else:
            padding = conv.padding
        dims = x.dim() - 2
        # The batch as groups: one weight gradient per example, [N * C_out, C_in / groups, *k].
        x_g = x.reshape(1, -1, *x.shape[2:]).float()
        b_g = b.reshape(1, -1, *b.shape[2:]).float()
        w = _CONV_WEIGHT[dims](
            x_g,
            (n * conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size),
            b_g,
            stride=conv.stride,
            padding=padding,
            dilation=conv.dilation,
            groups=n * conv.groups,
        )
        out += _sq(w.reshape(n, -1))
    if "bias" in names:
        out += _sq(b.flatten(2).sum(2))
    return out


@_register(nn.Embedding)
def _embedding(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    emb = cast(nn.Embedding, module)
    n = b.shape[0]
    if "weight" not in names:
        return torch.zeros(n, device=b.device)
    idx = args[0].reshape(n, -1)
    g = b.reshape(n, idx.shape[1], -1).float()
    if emb.padding_idx is not None:
        g = g.masked_fill((idx == emb.padding_idx).unsqueeze(-1), 0.0)
    if emb.scale_grad_by_freq:
        counts = torch.bincount(args[0].reshape(-1), minlength=emb.num_embeddings)
        g = g / counts[idx].unsqueeze(-1).float()
    # rows hit by the same index add up: sum over positions t, s with idx_t == idx_s of <g_t, g_s>
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
    return (same * (g @ g.transpose(1, 2))).flatten(1).sum(1)


def _affine_norm(
    normalised: Tensor,
    b: Tensor,
    names: Collection[str],
    channel_dims: list[int],
    shape: torch.Size,
) -> Tensor:
    """Per-example gradients of (weight, bias) of an affine normalisation: sums of ``b * xhat``
    and of ``b`` over the dims that are not the parameter's, then their squared norms."""
    n = b.shape[0]
    keep = [0, *channel_dims]
    other = [d for d in range(b.dim()) if d not in keep]
    out = torch.zeros(n, device=b.device)
    g = b.float()
    if "weight" in names:
        gw = (g * normalised.float()).sum(other) if other else g * normalised.float()
        out += _sq(gw.reshape(n, *shape))
    if "bias" in names:
        gb = g.sum(other) if other else g
        out += _sq(gb.reshape(n, *shape))
    return out


@_register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    bn = cast(nn.modules.batchnorm._BatchNorm, module)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    xhat = F.batch_norm(
        args[0],
        None if batch_stats else bn.running_mean,
        None if batch_stats else bn.running_var,
        None,
        None,
        training=batch_stats,
        momentum=0.0,
        eps=bn.eps,
    )
    return _affine_norm(xhat, b, names, [1], torch.Size([bn.num_features]))


@_register(nn.LayerNorm)
def _layer_norm(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    ln = cast(nn.LayerNorm, module)
    xhat = F.layer_norm(args[0], ln.normalized_shape, None, None, ln.eps)
    k = len(ln.normalized_shape)
    return _affine_norm(
        xhat, b, names, list(range(b.dim() - k, b.dim())), torch.Size(ln.normalized_shape)
    )


@_register(nn.GroupNorm)
def _group_norm(
    module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
) -> Tensor:
    gn = cast(nn.GroupNorm, module)
    xhat = F.group_norm(args[0], gn.num_groups, None, None, gn.eps)
    return _affine_norm(xhat, b, names, [1], torch.Size([gn.num_channels]))


if hasattr(nn, "RMSNorm"):

    @_register(nn.RMSNorm)
    def _rms_norm(
        module: nn.Module, args: tuple, kwargs: dict, b: Tensor, names: Collection[str]
    ) -> Tensor:
        shape = torch.Size(module.normalized_shape)  # type: ignore[arg-type]
        xhat = F.rms_norm(args[0], list(shape), None, module.eps)  # type: ignore[arg-type]
        return _affine_norm(xhat, b, names, list(range(b.dim() - len(shape), b.dim())), shape)
