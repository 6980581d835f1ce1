"""Hugging Face ``transformers``' RMSNorms: ``scale * (x * rsqrt(mean(x^2) + eps))``,
normalised in float32, in the few conventions the models copy from one another. Registered
by qualified names, so the core never imports ``transformers``; the dot and the norms are an
affine normalisation's (:func:`affine_pieces`), the scale's derivative in the weight being 1
whether the scale is ``weight`` or Gemma's ``1 + weight``.

The conventions differ in where the float32 result is cast back to the input's dtype and in
the name of epsilon's attribute:

* Llama (:data:`LLAMA_STYLE`): ``weight * normed.to(dtype)``, ``variance_epsilon``;
* OLMo-2 (:data:`OLMO2_STYLE`): ``(weight * normed).to(dtype)``, ``variance_epsilon``;
* Helium (:data:`FLOAT_WEIGHT_STYLE`): ``(weight.float() * normed).to(dtype)``,
  ``variance_epsilon``;
* Moshi (:data:`MOSHI_STYLE`): the same, ``eps``;
* Gemma (:data:`GEMMA_STYLE`): ``(normed * (1 + weight.float())).to(dtype)``, ``eps``.

The class lists are the installed ``transformers``' (5.25) classes whose forward is one of
these line for line; others (Gemma-3n's optional scale, Idefics', grouped or input-scaled
norms) take the generic path.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ._base import Direction, GhostRule, Pieces, Request, param_direction
from ._registry import register_ghost_rule
from .norms import affine_pieces

__all__ = [
    "FLOAT_WEIGHT_STYLE",
    "GEMMA_STYLE",
    "LLAMA_STYLE",
    "MOSHI_STYLE",
    "OLMO2_STYLE",
    "HFFloatWeightRMSNormRule",
    "HFGemmaRMSNormRule",
    "HFMoshiRMSNormRule",
    "HFOlmo2RMSNormRule",
    "HFRMSNormRule",
]


def transformers_classes(table: str) -> tuple[str, ...]:
    """``"llama.LlamaRMSNorm ..."`` -> the classes' qualified names (each model's classes live
    in ``transformers.models.<model>.modeling_<model>``), for a rule's registration."""
    out = []
    for entry in table.split():
        model, cls = entry.split(".")
        out.append(f"transformers.models.{model}.modeling_{model}.{cls}")
    return tuple(out)


LLAMA_STYLE = transformers_classes(
    """
    aimv2.Aimv2RMSNorm apertus.ApertusRMSNorm apertus1p5.Apertus1p5TextRMSNorm
    arcee.ArceeRMSNorm aria.AriaTextRMSNorm axk1.AXK1RMSNorm axk2.AXK2RMSNorm
    bailing_hybrid.BailingHybridRMSNorm bamba.BambaRMSNorm bitnet.BitNetRMSNorm
    blt.BltRMSNorm chameleon.ChameleonRMSNorm clvp.ClvpRMSNorm cohere2_moe.Cohere2MoeRMSNorm
    cosmos3_edge.Cosmos3EdgeTextRMSNorm csm.CsmRMSNorm cwm.CwmRMSNorm
    deepseek_ocr2.DeepseekOcr2TextRMSNorm deepseek_ocr2.DeepseekOcr2VisionRMSNorm
    deepseek_v2.DeepseekV2RMSNorm deepseek_v3.DeepseekV3RMSNorm
    deepseek_v32.DeepseekV32RMSNorm deimv2.Deimv2RMSNorm dia.DiaRMSNorm
    diffllama.DiffLlamaRMSNorm doge.DogeRMSNorm dots1.Dots1RMSNorm
    dots3_note.Dots3NoteRMSNorm emu3.Emu3RMSNorm ernie4_5.Ernie4_5RMSNorm
    ernie4_5_moe.Ernie4_5_MoeRMSNorm ernie4_5_vl_moe.Ernie4_5_VLMoeRMSNorm
    eurobert.EuroBertRMSNorm evolla.EvollaRMSNorm exaone4.Exaone4RMSNorm
    exaone4_5.Exaone4_5_RMSNorm exaone_moe.ExaoneMoeRMSNorm falcon_h1.FalconH1RMSNorm
    falcon_mamba.FalconMambaRMSNorm glm.GlmRMSNorm glm4.Glm4RMSNorm glm4_moe.Glm4MoeRMSNorm
    glm4_moe_lite.Glm4MoeLiteRMSNorm glm4v.Glm4vRMSNorm glm4v_moe.Glm4vMoeRMSNorm
    glm4v_moe.Glm4vMoeTextRMSNorm glm5_next.Glm5NextRMSNorm glm5_next.Glm5NextTextRMSNorm
    glm_image.GlmImageRMSNorm glm_moe_dsa.GlmMoeDsaRMSNorm glm_ocr.GlmOcrRMSNorm
    granite.GraniteRMSNorm granite4_vision.Granite4VisionTextRMSNorm
    granite_docling.GraniteDoclingTextRMSNorm granite_swa.GraniteSWARMSNorm
    granitemoe.GraniteMoeRMSNorm granitemoe_swa.GraniteMoeSWARMSNorm
    granitemoehybrid.GraniteMoeHybridRMSNorm granitemoeshared.GraniteMoeSharedRMSNorm
    higgs_audio_v2.HiggsAudioV2RMSNorm hunyuan_v1_dense.HunYuanDenseV1RMSNorm
    hunyuan_v1_moe.HunYuanMoEV1RMSNorm hunyuan_vl.HunYuanVLRMSNorm hy_v3.HYV3RMSNorm
    hy_v4.HYV4RMSNorm hy_v4_vl.HYV4VLRMSNorm hyperclovax.HyperCLOVAXRMSNorm
    idefics2.Idefics2RMSNorm idefics3.Idefics3RMSNorm inkling.InklingRMSNorm
    internvl.InternVLVisionRMSNorm jamba.JambaRMSNorm jetmoe.JetMoeRMSNorm
    kimi_linear.KimiLinearRMSNorm kolibri1.Kolibri1RMSNorm kolibri1_1.Kolibri1_1RMSNorm
    laguna.LagunaRMSNorm lfm2.Lfm2RMSNorm lfm2_moe.Lfm2MoeRMSNorm lfm3.Lfm3RMSNorm
    lfm3_vl.Lfm3VlVisionRMSNorm lighton_ocr.LightOnOcrRMSNorm llama.LlamaRMSNorm
    llama4.Llama4TextRMSNorm longcat_flash.LongcatFlashRMSNorm mamba.MambaRMSNorm
    mamba2.Mamba2RMSNorm mellum.MellumRMSNorm mimo_v2_flash.MiMoV2FlashRMSNorm
    minicpm3.MiniCPM3RMSNorm minicpm5_moe.MiniCPM5MoeRMSNorm minimax.MiniMaxRMSNorm
    minimax_m2.MiniMaxM2RMSNorm ministral.MinistralRMSNorm ministral3.Ministral3RMSNorm
    mistral.MistralRMSNorm mistral3.Mistral3RMSNorm mistral4.Mistral4RMSNorm
    mistral_large4.MistralLarge4RMSNorm mixtral.MixtralRMSNorm mllama.MllamaTextRMSNorm
    molmo2.Molmo2RMSNorm muse_glimmer_assistant.MuseGlimmerAssistantRMSNorm
    neucodec.NeuCodecRMSNorm olmoe.OlmoeRMSNorm ovis2.Ovis2RMSNorm
    paddleocr_vl.PaddleOCRRMSNorm pe_audio.PeAudioEncoderRMSNorm
    pe_audio_video.PeAudioVideoEncoderRMSNorm pe_video.PeVideoEncoderRMSNorm
    phi3.Phi3RMSNorm phi4_multimodal.Phi4MultimodalRMSNorm pixtral.PixtralRMSNorm
    qianfan_ocr.QianfanOCRVisionRMSNorm qwen2.Qwen2RMSNorm qwen2_5_omni.Qwen2_5OmniRMSNorm
    qwen2_5_vl.Qwen2_5_VLRMSNorm qwen2_moe.Qwen2MoeRMSNorm qwen2_vl.Qwen2VLRMSNorm
    qwen3.Qwen3RMSNorm qwen3_moe.Qwen3MoeRMSNorm qwen3_omni_moe.Qwen3OmniMoeCode2WavRMSNorm
    qwen3_omni_moe.Qwen3OmniMoeRMSNorm qwen3_omni_moe.Qwen3OmniMoeTextRMSNorm
    qwen3_omni_moe.Qwen3OmniMoeThinkerTextRMSNorm qwen3_vl.Qwen3VLTextRMSNorm
    qwen3_vl_moe.Qwen3VLMoeTextRMSNorm sapiens2.Sapiens2RMSNorm seed_oss.SeedOssRMSNorm
    smollm3.SmolLM3RMSNorm solar_open.SolarOpenRMSNorm timesfm.TimesFmRMSNorm
    timesfm2_5.TimesFm2_5RMSNorm ultrabert.UltrabertRMSNorm ultravbert.UltraVBertRMSNorm
    unlimited_ocr.UnlimitedOcrTextRMSNorm vibevoice.VibeVoiceRMSNorm
    vibevoice_acoustic_tokenizer.VibeVoiceAcousticTokenizerRMSNorm
    vibevoice_asr.VibeVoiceAsrRMSNorm voxtral_realtime.VoxtralRealtimeRMSNorm
    xcodec2.Xcodec2RMSNorm youtu.YoutuRMSNorm zamba.ZambaRMSNorm zamba2.Zamba2RMSNorm
    zaya.ZayaRMSNorm
    """
)
OLMO2_STYLE = transformers_classes(
    """
    afmoe.AfmoeRMSNorm beam.BeamRMSNorm deepseek_v4.DeepseekV4RMSNorm
    flex_olmo.FlexOlmoRMSNorm flint.FlintRMSNorm gpt_oss.GptOssRMSNorm
    inkling2.Inkling2RMSNorm inkling2_loop.Inkling2LoopRMSNorm olmo2.Olmo2RMSNorm
    olmo3.Olmo3RMSNorm olmo_hybrid.OlmoHybridRMSNorm
    openai_privacy_filter.OpenAIPrivacyFilterRMSNorm
    """
)
FLOAT_WEIGHT_STYLE = transformers_classes(
    """
    helium.HeliumRMSNorm lara_mini.LaraMiniRMSNorm nemotron_h.NemotronHRMSNorm
    nemotron_h_omni.NemotronH_Omni_RMSNorm
    """
)
MOSHI_STYLE = transformers_classes(
    """
    kyutai_speech_to_text.KyutaiSpeechToTextRMSNorm moshi.MoshiRMSNorm
    """
)
GEMMA_STYLE = transformers_classes(
    """
    gemma.GemmaRMSNorm gemma2.Gemma2RMSNorm gemma3.Gemma3RMSNorm
    minimax_m3_vl.MiniMaxM3VLRMSNorm muse_glimmer.MuseGlimmerTextCenteredRMSNorm
    qwen3_5.Qwen3_5RMSNorm qwen3_5_moe.Qwen3_5MoeRMSNorm qwen3_next.Qwen3NextRMSNorm
    recurrent_gemma.RecurrentGemmaRMSNorm step3p7.Step3p7RMSNorm t5gemma.T5GemmaRMSNorm
    t5gemma2.T5Gemma2RMSNorm vaultgemma.VaultGemmaRMSNorm
    """
)


def _normalised(module: nn.Module, x: Tensor, eps_name: str = "variance_epsilon") -> Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` in float32, with the module's epsilon (attribute
    ``eps_name``)."""
    h = x.to(torch.float32)
    eps = float(getattr(module, eps_name))
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@register_ghost_rule(*LLAMA_STYLE)
class HFRMSNormRule(GhostRule):
    """Llama-style RMSNorm: exact dot and norms (a weight over the last dim, no bias). The
    other conventions are subclasses that change its class attributes."""

    independent_rows = True
    eps_name: ClassVar[str] = "variance_epsilon"
    offset: ClassVar[float] = 0.0  # the scale is offset + weight
    # where the weight multiplies: the normalised input cast back first (Llama), or the
    # float32 one, the product cast back (float_weight: the weight cast to float32 first)
    cast_first: ClassVar[bool] = True
    float_weight: ClassVar[bool] = False

    def output(self, module: nn.Module, x: Tensor) -> Tensor:
        """The module's forward as this rule reads it (tests hold it to the class's own)."""
        return self._scaled(module, x, cast(Tensor, module.weight), self.offset)

    def _scaled(self, module: nn.Module, x: Tensor, weight: Tensor, offset: float) -> Tensor:
        """``(offset + weight) * normalised x`` in the convention's dtypes (offset 0: the
        tangent along ``weight``)."""
        normed = _normalised(module, x, self.eps_name)
        if self.cast_first:
            return (weight + offset if offset else weight) * normed.to(x.dtype)
        w = weight.float() if self.float_weight else weight
        return ((w + offset if offset else w) * normed).to(x.dtype)

    def tangent(self, module: nn.Module, args: tuple, kwargs: dict, direction: Direction) -> Any:
        d = cast(Tensor, param_direction(module, "weight", direction))
        return self._scaled(module, args[0], d, 0.0)

    def moves_batch(self, module: nn.Module, dim: int, ndim: int) -> bool:
        return dim < ndim - 1  # any dim but the features

    def batch_pieces(self, module: nn.Module, x: Tensor, b: Tensor, ask: Request) -> Pieces:
        normed = _normalised(module, x, self.eps_name)
        return affine_pieces(
            normed.to(x.dtype) if self.cast_first else normed, b, [b.dim() - 1], ask
        )


@register_ghost_rule(*OLMO2_STYLE)
class HFOlmo2RMSNormRule(HFRMSNormRule):
    """OLMo-2-style RMSNorm: the weight times the float32 normalised input, cast back."""

    cast_first = False


@register_ghost_rule(*FLOAT_WEIGHT_STYLE)
class HFFloatWeightRMSNormRule(HFRMSNormRule):
    """Helium-style RMSNorm: the weight in float32 times the normalised input, cast back."""

    cast_first = False
    float_weight = True


@register_ghost_rule(*MOSHI_STYLE)
class HFMoshiRMSNormRule(HFFloatWeightRMSNormRule):
    """Moshi-style RMSNorm: Helium's, with epsilon in ``eps``."""

    eps_name = "eps"


@register_ghost_rule(*GEMMA_STYLE)
class HFGemmaRMSNormRule(HFMoshiRMSNormRule):
    """Gemma-style RMSNorm: the scale is ``1 + weight`` (zero-initialised weight), in float32;
    its derivative in the weight is Moshi's."""

    offset = 1.0
