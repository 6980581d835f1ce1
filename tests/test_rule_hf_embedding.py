"""Hugging Face's scaled word embeddings (Gemma's, BART's): one rule registered by qualified
name; each listed class importable here computes the lookup times its scale, and the rule's
tangent and norms match the oracle."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_data.probe.rules import Request, rule_for
from adaptive_data.probe.rules.generic import jvp_tangent
from adaptive_data.probe.rules.hf_embedding import (
    SCALED_EMBEDDINGS,
    HFScaledEmbeddingRule,
    embed_scale,
)
from tests.test_rule_hf_conv1d import oracle

pytest.importorskip("transformers")


def _classes() -> list[type]:
    found = []
    for name in SCALED_EMBEDDINGS:
        module, _, cls = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            continue
    return found


CLASSES = _classes()
BY_NAME = {cls.__name__: cls for cls in CLASSES}


def _filled(cls: type, padding_idx: int | None, g: torch.Generator) -> torch.nn.Module:
    module = cls(11, 4, padding_idx, embed_scale=math.sqrt(3.0))
    with torch.no_grad():
        module.weight.copy_(torch.randn(11, 4, generator=g))
    return module


def test_gemma_and_bart_are_listed_and_importable() -> None:
    assert {"GemmaTextScaledWordEmbedding", "BartScaledWordEmbedding"} <= set(BY_NAME)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_registered_class_is_a_scaled_lookup(cls) -> None:
    g = torch.Generator().manual_seed(0)
    module = _filled(cls, 0, g)
    assert type(rule_for(module)) is HFScaledEmbeddingRule
    ids = torch.randint(0, 11, (3, 5), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        module.to(dtype)
        want = module(ids)
        got = F.embedding(ids, module.weight, 0) * embed_scale(module)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["GemmaTextScaledWordEmbedding", "BartScaledWordEmbedding"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_the_rule_matches_the_oracle(name, padding_idx) -> None:
    """Repeated indices (rows that add up) and the padding row, which gets no gradient."""
    g = torch.Generator().manual_seed(1)
    module = _filled(BY_NAME[name], padding_idx, g)
    x = torch.randint(0, 5, (4, 6), generator=g)
    b = torch.randn(4, 6, 4, generator=g)
    d = {"weight": torch.randn(11, 4, generator=g)}
    rule = rule_for(module)
    assert rule is not None
    tangent = rule.tangent(module, (x,), {}, d)
    if padding_idx is None:
        torch.testing.assert_close(tangent, jvp_tangent(module, (x,), {}, d))
    with torch.no_grad():
        sq, dot, _ = rule.batch_pieces(module, x, b, Request(["weight"], d))
        _, _, kept = rule.batch_pieces(module, x, b, Request(["weight"], d, keep=["weight"]))
    want_sq, want_dot, want_per_example = oracle(module, x, b, d, ["weight"])
    # the dot from the tangent (the padding row's share left out, as the gradient leaves it)
    torch.testing.assert_close((b * tangent).flatten(1).sum(1), want_dot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, want_sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dot, want_dot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept["weight"], want_per_example["weight"], rtol=1e-5, atol=1e-5)
