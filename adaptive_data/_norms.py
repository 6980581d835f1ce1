"""Per-example squared gradient norms ``||g_i(theta_m)||^2`` of one module, from its input and
the gradient at its output, without materialising more than one layer's per-example gradients;
and, given a direction ``D``, the module's share ``<g_i(theta_m), D_m>`` of the rewards from the
same per-example pieces (no second pass over the layer).

Used by ``reward="cosine"`` (``GradientProbe(method="ghost")`` and ``GAR``). Each rule receives
the module, the input ``x`` of its call, the gradient ``B`` of ``sum_i l_i`` at its output (batch
in dim 0), the names of its trainable parameters, their directions (``None``: norms only) and
the names to *keep*, and returns ``(sq, dot, kept)``: float32 ``[N]`` vectors (``dot`` ``None``
without a direction) and ``{name: [N, numel]}``, the per-example gradients of the kept names.
A parameter used by several calls (tied weights, a layer run twice) is kept instead of squared:
its per-example gradient is the sum over its uses, and the norm has cross terms between them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

__all__: list[str] = []

Names = Collection[str]  # the module's trainable parameters (local names)
Dir = Mapping[str, Tensor] | None  # their directions, or None for the norms alone
# (sq, dot, kept): float32 [N] each, and the kept names' per-example gradients [N, numel]
Pieces = tuple[Tensor, "Tensor | None", dict[str, Tensor]]
NormFn = Callable[[nn.Module, Tensor, Tensor, Names, Dir, Names], Pieces]

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


def applies(module: nn.Module, din: int | None, dout: int | None, out_dims: int) -> bool:
    """Whether ``module``'s rule applies to a call whose input holds the batch in dim ``din``
    and whose output (``out_dims`` dims) holds it in dim ``dout``: the rules take the batch in
    dim 0, and a batch dim is moved there only where the layer acts on each position alike."""
    if din is None or dout is None or din < 0 or din != dout:
        return False
    if isinstance(module, nn.Linear):
        return dout < out_dims - 1
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
        return dout < out_dims - len(module.normalized_shape)  # type: ignore[arg-type]
    if isinstance(module, nn.Embedding):
        return True
    return dout == 0


def _sq(t: Tensor) -> Tensor:
    """Sum of squares over every dim but the first, in float32."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float32).square()


class _Sums:
    """Accumulates ``sq`` and (with a direction) ``dot`` over a module's parameters, and the
    per-example gradients of the names in ``keep``."""

    def __init__(
        self,
        n: int,
        device: torch.device,
        direction: Mapping[str, Tensor] | None,
        keep: Names = (),
    ):
        self.n = n
        self.sq = torch.zeros(n, device=device)
        self.direction = direction
        self.dot = None if direction is None else torch.zeros(n, device=device)
        self.keep = keep
        self.kept: dict[str, Tensor] = {}

    def add(self, name: str, per_example: Tensor, rows: slice = slice(None)) -> None:
        """Add the parameter ``name``'s per-example gradients, ``[N, *param.shape]`` (or those
        of the examples ``rows``)."""
        g = per_example.flatten(1).float()
        if name in self.keep:
            if name not in self.kept:
                self.kept[name] = g.new_zeros(self.n, g.shape[1])
            self.kept[name][rows] += g
        else:
            self.sq[rows] += _sq(g)
        if self.dot is not None:
            self.dot[rows] += g @ self.d(name).reshape(-1)

    def d(self, name: str) -> Tensor:
        if self.direction is None:  # rules read D only when they were given one
            raise RuntimeError(
                f"the direction of parameter {name!r} was read by a gradient-norm rule called "
                "without a direction (norms only)"
            )
        return self.direction[name].float()

    def result(self) -> Pieces:
        return self.sq, self.dot, self.kept


@_register(nn.Linear)
def _linear(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    n = b.shape[0]
    a = x.reshape(n, -1, x.shape[-1]).float()  # [N, T, in]
    g = b.reshape(n, -1, b.shape[-1]).float()  # [N, T, out]
    out = _Sums(n, b.device, direction, keep)
    if "weight" in names:
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if "weight" in keep:  # the per-example gradient itself, [N, out, in]
            out.add("weight", g.transpose(1, 2) @ a)
        elif t == 1:  # rank one: ||g a^T||^2 = ||g||^2 ||a||^2, <g a^T, D> = g^T D a
            out.sq += _sq(a) * _sq(g)
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


_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
_CONV_CHUNK = 8  # examples per grouped weight-gradient call (see _conv)


def _conv_gram_is_cheaper(conv: nn.modules.conv._ConvNd, b: Tensor) -> bool:
    """Whether the Gram form (per-example ``L x L`` products of the unfolded input and of ``B``)
    costs fewer multiply-adds than the per-example weight gradients (``C_out x C_in k x L``)."""
    if b.dim() != 4 or conv.groups != 1:  # unfold is 2-d only; grouped convs stay direct
        return False
    length = b.shape[2] * b.shape[3]
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return length * (fan_in + conv.out_channels) < conv.out_channels * fan_in


def _unfold2d(
    x: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> Tensor:
    """``F.unfold`` ([N, C k k, L]) as one strided view and one copy: several times faster
    than ``F.unfold`` on CPU for strided convolutions, and the same values."""
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
    return view.reshape(n, c * kh * kw, ho * wo)


@_register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    conv = cast(nn.modules.conv._ConvNd, module)
    n = b.shape[0]
    out = _Sums(n, b.device, direction, keep)
    if "weight" in names:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            # padding modes, and "same" (which may pad one more on the right): pad explicitly
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding: Any = (0,) * (x.dim() - 2)
        else:
            padding = conv.padding
        if _conv_gram_is_cheaper(conv, b) and "weight" not in keep:
            # U_i: [C_in k k, L], B_i: [C_out, L]; ||B_i U_i^T||^2 = <U_i^T U_i, B_i^T B_i>
            u = _unfold2d(x.float(), conv.kernel_size, conv.dilation, padding, conv.stride)
            g = b.flatten(2).float()
            out.sq += ((u.transpose(1, 2) @ u) * (g.transpose(1, 2) @ g)).flatten(1).sum(1)
            if out.dot is not None:  # <B_i U_i^T, D> = <B_i, D U_i>
                out.dot += ((out.d("weight").flatten(1) @ u) * g).flatten(1).sum(1)
        else:
            weight_grad = _CONV_WEIGHT[x.dim() - 2]
            # A chunk of examples as groups: one weight gradient per example,
            # [c * C_out, C_in / groups, *k]. Chunks bound the memory of the per-example
            # gradients and run faster on CPU than the whole batch as groups.
            for lo in range(0, n, _CONV_CHUNK):
                xc, bc = x[lo : lo + _CONV_CHUNK], b[lo : lo + _CONV_CHUNK]
                c = xc.shape[0]
                w = weight_grad(
                    xc.reshape(1, -1, *x.shape[2:]).float(),
                    (c * conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size),
                    bc.reshape(1, -1, *b.shape[2:]).float(),
                    stride=conv.stride,
                    padding=padding,
                    dilation=conv.dilation,
                    groups=c * conv.groups,
                )
                out.add("weight", w.reshape(c, -1), rows=slice(lo, lo + c))
    if "bias" in names:
        out.add("bias", b.flatten(2).sum(2))
    return out.result()


@_register(nn.Embedding)
def _embedding(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    emb = cast(nn.Embedding, module)
    n = b.shape[0]
    out = _Sums(n, b.device, direction, keep)
    if "weight" not in names:
        return out.result()
    idx = x.reshape(n, -1)
    g = b.reshape(n, idx.shape[1], -1).float()
    if emb.padding_idx is not None:
        g = g.masked_fill((idx == emb.padding_idx).unsqueeze(-1), 0.0)
    if emb.scale_grad_by_freq:
        counts = torch.bincount(x.reshape(-1), minlength=emb.num_embeddings)
        g = g / counts[idx].unsqueeze(-1).float()
    if "weight" in keep:  # the per-example gradient itself, [N, num_embeddings, dim]
        rows = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
        full = g.new_zeros(n, emb.num_embeddings, g.shape[2])
        out.add("weight", full.index_put_((rows, idx), g, accumulate=True))
        return out.result()
    # rows hit by the same index add up: sum over positions t, s with idx_t == idx_s of <g_t, g_s>
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
    out.sq += (same * (g @ g.transpose(1, 2))).flatten(1).sum(1)
    if out.dot is not None:  # sum over positions t of <g_t, D[idx_t]>
        out.dot += (g * F.embedding(idx, out.d("weight"))).flatten(1).sum(1)
    return out.result()


def _affine_norm(
    normalised: Tensor,
    b: Tensor,
    names: Collection[str],
    channel_dims: list[int],
    shape: torch.Size,
    direction: Mapping[str, Tensor] | None,
    keep: Names,
) -> Pieces:
    """Per-example gradients of (weight, bias) of an affine normalisation: sums of ``b * xhat``
    and of ``b`` over the dims that are not the parameter's."""
    n = b.shape[0]
    own = [0, *channel_dims]
    other = [d for d in range(b.dim()) if d not in own]
    out = _Sums(n, b.device, direction, keep)
    g = b.float()
    if "weight" in names:
        out.add("weight", (g * normalised.float()).sum(other) if other else g * normalised.float())
    if "bias" in names:
        out.add("bias", g.sum(other) if other else g)
    return out.result()


@_register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    bn = cast(nn.modules.batchnorm._BatchNorm, module)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
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
    return _affine_norm(xhat, b, names, [1], torch.Size([bn.num_features]), direction, keep)


@_register(nn.LayerNorm)
def _layer_norm(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    ln = cast(nn.LayerNorm, module)
    xhat = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
    k = len(ln.normalized_shape)
    return _affine_norm(
        xhat,
        b,
        names,
        list(range(b.dim() - k, b.dim())),
        torch.Size(ln.normalized_shape),
        direction,
        keep,
    )


@_register(nn.GroupNorm)
def _group_norm(
    module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
) -> Pieces:
    gn = cast(nn.GroupNorm, module)
    xhat = F.group_norm(x, gn.num_groups, None, None, gn.eps)
    return _affine_norm(xhat, b, names, [1], torch.Size([gn.num_channels]), direction, keep)


if hasattr(nn, "RMSNorm"):

    @_register(nn.RMSNorm)
    def _rms_norm(
        module: nn.Module, x: Tensor, b: Tensor, names: Names, direction: Dir, keep: Names = ()
    ) -> Pieces:
        shape = torch.Size(module.normalized_shape)  # type: ignore[arg-type]
        xhat = F.rms_norm(x, list(shape), None, module.eps)  # type: ignore[arg-type]
        return _affine_norm(
            xhat, b, names, list(range(b.dim() - len(shape), b.dim())), shape, direction, keep
        )
