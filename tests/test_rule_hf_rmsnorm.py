"""Hugging Face's Llama-style RMSNorm, one rule registered by qualified name for the classes
that share Llama's forward: each such class importable here gives the rule's output, and the
rule's tangent and norms match the oracle."""

from __future__ import annotations

import importlib

import pytest
import torch

from adaptive_data.probe.rules import Request, rule_for
from adaptive_data.probe.rules.generic import jvp_tangent
from adaptive_data.probe.rules.hf_rmsnorm import LLAMA_STYLE, HFRMSNormRule, _normalised
from tests.test_rule_hf_conv1d import oracle


def _classes():
    found = []
    for name in LLAMA_STYLE:
        module, _, cls = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            continue
    return found


CLASSES = _classes()


def test_the_llama_norm_is_importable_here() -> None:
    assert any(cls.__name__ == "LlamaRMSNorm" for cls in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_registered_class_computes_what_the_rule_assumes(cls) -> None:
    g = torch.Generator().manual_seed(0)
    module = cls(6, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.randn(6, generator=g))
    assert isinstance(rule_for(module), HFRMSNormRule)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 6, generator=g).to(dtype)
        want = module.to(dtype)(x)
        got = module.weight * _normalised(module, x)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6)])
def test_the_rule_matches_the_oracle(shape) -> None:
    cls = next(c for c in CLASSES if c.__name__ == "LlamaRMSNorm")
    g = torch.Generator().manual_seed(1)
    module = cls(6)
    with torch.no_grad():
        module.weight.copy_(torch.randn(6, generator=g))
    x = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g)
    d = {"weight": torch.randn(6, generator=g)}
    rule = rule_for(module)
    torch.testing.assert_close(
        rule.tangent(module, (x,), {}, d), jvp_tangent(module, (x,), {}, d), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        sq, dot, _ = rule.batch_pieces(module, x, b, Request(["weight"], d))
        _, _, kept = rule.batch_pieces(module, x, b, Request(["weight"], d, keep=["weight"]))
    want_sq, want_dot, want_per_example = oracle(module, x, b, d, ["weight"])
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dot, want_dot, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept["weight"], want_per_example["weight"], rtol=1e-4, atol=1e-4)
