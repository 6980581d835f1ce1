"""Hugging Face ``transformers``' scaled word embeddings (Gemma's, BART's and the models that
copy them): ``nn.Embedding`` subclasses whose forward is the lookup times a constant
``embed_scale`` (``sqrt(hidden_size)`` in Gemma, a buffer cast to the weight's dtype; a float
in BART). The dot is the lookup's tangent times the scale; each example's gradient is the
lookup's of the output gradient times the scale. Registered by qualified names, so the core
never imports ``transformers``.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from ._base import Direction, Pieces, Request
from ._registry import register_ghost_rule
from .embedding import EmbeddingRule
from .hf_rmsnorm import transformers_classes

__all__ = ["SCALED_EMBEDDINGS", "HFScaledEmbeddingRule"]

# The classes whose forward is ``super().forward(ids) * embed_scale`` (with or without a cast
# of a buffer to the weight's dtype); T5Gemma-2's also overwrites some rows and is not here.
SCALED_EMBEDDINGS = transformers_classes(
    """
    bart.BartScaledWordEmbedding bigbird_pegasus.BigBirdPegasusScaledWordEmbedding
    biogpt.BioGptScaledWordEmbedding blenderbot.BlenderbotScaledWordEmbedding
    diffusion_gemma.DiffusionGemmaTextScaledWordEmbedding
    embedding_gemma2.EmbeddingGemma2TextScaledWordEmbedding
    gemma.GemmaTextScaledWordEmbedding gemma2.Gemma2TextScaledWordEmbedding
    gemma3.Gemma3TextScaledWordEmbedding gemma3n.Gemma3nTextScaledWordEmbedding
    gemma4.Gemma4TextScaledWordEmbedding gemma4_unified.Gemma4UnifiedTextScaledWordEmbedding
    m2m_100.M2M100ScaledWordEmbedding mbart.MBartScaledWordEmbedding
    minicpm3.MiniCPM3ScaledWordEmbedding nllb_moe.NllbMoeScaledWordEmbedding
    pegasus_x.PegasusXScaledWordEmbedding plbart.PLBartScaledWordEmbedding
    pp_formulanet.PPFormulaNetScaledWordEmbedding seamless_m4t.SeamlessM4TScaledWordEmbedding
    seamless_m4t_v2.SeamlessM4Tv2ScaledWordEmbedding trocr.TrOCRScaledWordEmbedding
    vaultgemma.VaultGemmaTextScaledWordEmbedding xglm.XGLMScaledWordEmbedding
    """
)


def embed_scale(module: nn.Module) -> Tensor | float:
    """The constant the module multiplies its lookup by, as its forward uses it."""
    scale = module.embed_scale
    if isinstance(scale, Tensor):
        return scale.to(cast(Tensor, module.weight).dtype)
    return cast(float, scale)


@register_ghost_rule(*SCALED_EMBEDDINGS)
class HFScaledEmbeddingRule(EmbeddingRule):
    """A word embedding scaled by a constant: :class:`EmbeddingRule`'s dot and norms, scaled."""

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        return super().tangent(module, args, kwargs, direction) * embed_scale(module)

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        # each example's gradient is linear in the output gradient: scale that
        return super().batch_pieces(module, x, b * embed_scale(module), ask)
