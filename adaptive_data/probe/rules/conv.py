"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``.

The dot: the layer's own ``_conv_forward`` with ``D`` in place of its weight (padding modes
included). The norms: per-example weight gradients from a grouped weight-gradient call over a
chunk of examples, or, where cheaper (2-d, ungrouped), the Gram form of the unfolded input and
the output gradient (``L x L`` per example).
"""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

from ._base import Direction, GhostRule, Pieces, Request, Sums, param_direction
from ._registry import register_ghost_rule

__all__ = ["ConvRule"]

_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
_CONV_CHUNK = 8  # examples per grouped weight-gradient call (see ConvRule.batch_pieces)


def gram_is_cheaper(conv: nn.modules.conv._ConvNd, b: Tensor) -> bool:
    """Whether the Gram form (per-example ``L x L`` products of the unfolded input and of ``B``)
    costs fewer multiply-adds than the per-example weight gradients (``C_out x C_in k x L``)."""
    if b.dim() != 4 or conv.groups != 1:  # unfold is 2-d only; grouped convs stay direct
        return False
    length = b.shape[2] * b.shape[3]
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return length * (fan_in + conv.out_channels) < conv.out_channels * fan_in


def unfold2d(
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


@register_ghost_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(GhostRule):
    """Convolutions: exact dot and norms from the layer's input and output gradient."""

    independent_rows = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        # _conv_forward is the layer's own forward for a given weight (it handles padding_mode).
        return module._conv_forward(  # type: ignore[operator]
            args[0],
            param_direction(module, "weight", direction),
            param_direction(module, "bias", direction),
        )

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        conv = cast(nn.modules.conv._ConvNd, module)
        n = b.shape[0]
        out = Sums(n, b.device, ask)
        if "weight" in ask.names:
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                # padding modes, and "same" (which may pad one more on the right): pad explicitly
                mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
                x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
                padding: Any = (0,) * (x.dim() - 2)
            else:
                padding = conv.padding
            if gram_is_cheaper(conv, b) and "weight" not in ask.keep:
                # U_i: [C_in k k, L], B_i: [C_out, L]; ||B_i U_i^T||^2 = <U_i^T U_i, B_i^T B_i>
                u = unfold2d(x.float(), conv.kernel_size, conv.dilation, padding, conv.stride)
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
        if "bias" in ask.names:
            out.add("bias", b.flatten(2).sum(2))
        return out.result()
