"""Hugging Face's RMSNorms, one rule per convention registered by qualified name for the
classes that share it: each such class importable here computes what its rule says it does,
in float32 and bfloat16, and each rule's tangent and norms match the oracle."""

from __future__ import annotations

import importlib

import pytest
import torch

from adaptive_data.probe.rules import Request, rule_for
from adaptive_data.probe.rules.generic import jvp_tangent
from adaptive_data.probe.rules.hf_rmsnorm import (
    FLOAT_WEIGHT_STYLE,
    GEMMA_STYLE,
    LLAMA_STYLE,
    MOSHI_STYLE,
    OLMO2_STYLE,
    HFFloatWeightRMSNormRule,
    HFGemmaRMSNormRule,
    HFMoshiRMSNormRule,
    HFOlmo2RMSNormRule,
    HFRMSNormRule,
)
from tests.test_rule_hf_conv1d import oracle

pytest.importorskip("transformers")

STYLES = {
    HFRMSNormRule: LLAMA_STYLE,
    HFOlmo2RMSNormRule: OLMO2_STYLE,
    HFFloatWeightRMSNormRule: FLOAT_WEIGHT_STYLE,
    HFMoshiRMSNormRule: MOSHI_STYLE,
    HFGemmaRMSNormRule: GEMMA_STYLE,
}
# one class of each convention, for the oracle
REPRESENTATIVES = ["LlamaRMSNorm", "Olmo2RMSNorm", "HeliumRMSNorm", "MoshiRMSNorm", "GemmaRMSNorm"]


def _classes() -> list[tuple[type, type]]:
    """(class, the rule it is listed under) for each listed class importable here."""
    found = []
    for rule, names in STYLES.items():
        for name in names:
            module, _, cls = name.rpartition(".")
            try:
                found.append((getattr(importlib.import_module(module), cls), rule))
            except (ImportError, AttributeError):
                continue
    return found


CLASSES = _classes()
BY_NAME = {cls.__name__: cls for cls, _ in CLASSES}


def test_the_lists_are_disjoint_and_hold_the_main_models() -> None:
    names = [n for names in STYLES.values() for n in names]
    assert len(names) == len(set(names))
    assert set(REPRESENTATIVES) <= set(BY_NAME)
    assert {"Gemma2RMSNorm", "Gemma3RMSNorm", "Olmo3RMSNorm", "Qwen2RMSNorm"} <= set(BY_NAME)


def _filled(cls: type, g: torch.Generator) -> torch.nn.Module:
    module = cls(6, eps=1e-3)  # not the default: a rule reading another eps would differ
    with torch.no_grad():
        module.weight.copy_(torch.randn(6, generator=g))
    return module


@pytest.mark.parametrize(("cls", "rule"), CLASSES, ids=lambda c: c.__name__)
def test_each_registered_class_computes_what_its_rule_assumes(cls, rule) -> None:
    """The class's forward is the rule's convention, with the module's epsilon, in float32
    and in bfloat16 (input alone, and input and weight)."""
    g = torch.Generator().manual_seed(0)
    module = _filled(cls, g)
    assert type(rule_for(module)) is rule
    x = torch.randn(3, 4, 6, generator=g) * 0.05  # small: eps matters
    f32, bf16 = torch.float32, torch.bfloat16
    for dtype, weight_dtype in [(f32, f32), (bf16, f32), (bf16, bf16)]:
        module.to(weight_dtype)
        xd = x.to(dtype)
        got = rule_for(module).output(module, xd)  # type: ignore[union-attr]
        want = module(xd)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_rule_reads_the_modules_own_epsilon() -> None:
    """Gemma keeps epsilon in ``eps``, Llama in ``variance_epsilon``: each rule's output
    follows its own attribute when it changes."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, generator=g) * 0.05
    for name, attr in [("GemmaRMSNorm", "eps"), ("LlamaRMSNorm", "variance_epsilon")]:
        module = _filled(BY_NAME[name], g)
        setattr(module, attr, 0.5)
        torch.testing.assert_close(rule_for(module).output(module, x), module(x))  # type: ignore[union-attr]


@pytest.mark.parametrize("name", REPRESENTATIVES)
@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6)])
def test_the_rule_matches_the_oracle(name, shape) -> None:
    g = torch.Generator().manual_seed(1)
    module = _filled(BY_NAME[name], g)
    x = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g)
    d = {"weight": torch.randn(6, generator=g)}
    rule = rule_for(module)
    assert rule is not None
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


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_the_tangent_is_the_forward_modes_in_bfloat16(name) -> None:
    """Where the cast back happens (before or after the weight) shows in bfloat16."""
    g = torch.Generator().manual_seed(3)
    module = _filled(BY_NAME[name], g)
    x = torch.randn(4, 3, 6, generator=g).to(torch.bfloat16)
    d = {"weight": torch.randn(6, generator=g)}
    got = rule_for(module).tangent(module, (x,), {}, d)  # type: ignore[union-attr]
    want = jvp_tangent(module, (x,), {}, d)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
