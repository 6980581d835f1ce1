"""Hugging Face ``transformers``' RMSNorm of Llama and the models that copy it (Mistral,
Mixtral, Qwen2, Qwen3, Phi-3, Granite, SmolLM3): ``weight * (x * rsqrt(mean(x^2) + eps))``,
normalised in float32 and cast back before the weight. Registered by qualified names, so the
core never imports ``transformers``; the dot and the norms are an affine normalisation's
(:func:`affine_pieces`). Gemma's ``(1 + weight)`` and OLMo-2's norms differ and are not here.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, param_direction
from ._registry import register_ghost_rule
from .norms import affine_pieces

__all__ = ["LLAMA_STYLE", "HFRMSNormRule"]

# The RMSNorm classes whose forward is Llama's, line for line.
LLAMA_STYLE = tuple(
    f"transformers.models.{path}RMSNorm"
    for path in (
        "llama.modeling_llama.Llama",
        "mistral.modeling_mistral.Mistral",
        "mixtral.modeling_mixtral.Mixtral",
        "qwen2.modeling_qwen2.Qwen2",
        "qwen3.modeling_qwen3.Qwen3",
        "phi3.modeling_phi3.Phi3",
        "granite.modeling_granite.Granite",
        "smollm3.modeling_smollm3.SmolLM3",
    )
)


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` in float32, cast back to ``x``'s dtype, as the module."""
    h = x.to(torch.float32)
    eps = float(module.variance_epsilon)  # type: ignore[arg-type]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


@register_ghost_rule(*LLAMA_STYLE)
class HFRMSNormRule(GhostRule):
    """Llama-style RMSNorm: exact dot and norms (a weight over the last dim, no bias)."""

    independent_rows = True

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        weight = cast(Tensor, param_direction(module, "weight", direction))
        return weight * _normalised(module, args[0])

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        return dim < ndim - 1  # any dim but the features

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        return affine_pieces(_normalised(module, x), b, [b.dim() - 1], ask)
