"""Hugging Face ``transformers``' ``Conv1D`` (GPT-2's projections): ``y = x W + b`` with the
weight stored ``[in, out]``, a Linear layer with its weight transposed.

Registered by qualified name, so the core never imports ``transformers``: the rule is matched
when such a module is met. The dot is the layer's own product with ``D``; the norms are
Linear's (:func:`linear_pieces`) with the weight's direction and kept gradients transposed.
"""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Direction, Pieces, Request, param_direction
from ._registry import register_ghost_rule
from .linear import LinearRule, linear_pieces

__all__ = ["HFConv1DRule"]


@register_ghost_rule("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(LinearRule):
    """``transformers.pytorch_utils.Conv1D``: exact dot and norms, as ``nn.Linear``."""

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        weight = cast(Tensor, param_direction(module, "weight", direction))
        return F.linear(args[0], weight.T, param_direction(module, "bias", direction))

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        d = ask.direction
        if d is not None and "weight" in d:
            ask = ask._replace(direction={**d, "weight": d["weight"].T})
        sq, dot, kept = linear_pieces(x, b, ask)
        if "weight" in kept:  # Linear's layout [N, out * in] -> the parameter's [N, in * out]
            n, (d_in, d_out) = kept["weight"].shape[0], cast(Tensor, module.weight).shape
            kept["weight"] = kept["weight"].view(n, d_out, d_in).transpose(1, 2).reshape(n, -1)
        return sq, dot, kept
