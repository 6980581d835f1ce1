"""Hugging Face's ``Conv1D`` (GPT-2's projections), the rule added in the rule-per-file form:
its tangent, norms and kept per-example gradients against an oracle, and a stock tiny GPT-2
probed exactly with every Conv1D covered by it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import adaptive_data as ad
from adaptive_data.probe._plan import plan
from adaptive_data.probe.rules import Request, rule_for
from adaptive_data.probe.rules.generic import jvp_tangent
from adaptive_data.probe.rules.hf_conv1d import HFConv1DRule
from tests.models import loop_rewards


def oracle(module, x, b, direction, names):
    """Per-example gradients by one autograd call per example: their squared norms, their
    dots with the direction and the gradients themselves."""
    params = dict(module.named_parameters())
    sq, dot, per_example = [], [], {n: [] for n in names}
    for i in range(x.shape[0]):
        out = module(x[i : i + 1])
        grads = torch.autograd.grad(out, [params[n] for n in names], b[i : i + 1])
        sq.append(sum(g.pow(2).sum() for g in grads))
        dot.append(sum((g * direction[n]).sum() for n, g in zip(names, grads, strict=True)))
        for n, g in zip(names, grads, strict=True):
            per_example[n].append(g.flatten())
    return torch.stack(sq), torch.stack(dot), {n: torch.stack(v) for n, v in per_example.items()}


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 7), (4, 5, 7)])
@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_conv1d_rule_matches_the_oracle(shape, frozen) -> None:
    """Rank one (no sequence), Gram form and direct form, with a frozen parameter."""
    g = torch.Generator().manual_seed(0)
    module = Conv1D(11, 7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    names = [n for n, _ in module.named_parameters() if n != frozen]
    x = torch.randn(shape, generator=g)
    b = torch.randn((*shape[:-1], 11), generator=g)
    d = {n: torch.randn(getattr(module, n).shape, generator=g) for n in names}
    rule = rule_for(module)
    assert isinstance(rule, HFConv1DRule)
    torch.testing.assert_close(
        rule.tangent(module, (x,), {}, d), jvp_tangent(module, (x,), {}, d), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        sq, dot, kept = rule.batch_pieces(module, x, b, Request(names, d))
        _, dot_kept, per_example = rule.batch_pieces(module, x, b, Request(names, d, keep=names))
    want_sq, want_dot, want_per_example = oracle(module, x, b, d, names)
    torch.testing.assert_close(sq, want_sq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dot, want_dot, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dot_kept, want_dot, rtol=1e-4, atol=1e-4)
    assert kept == {}
    for n in names:  # in the parameter's own layout, to sum with other uses of it
        torch.testing.assert_close(per_example[n], want_per_example[n], rtol=1e-4, atol=1e-4)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=17,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


class Logits(nn.Module):
    """The model's logits, so the test's loss reads a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def lm_loss(logits, y):
    return nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_stock_gpt2_is_probed_exactly_with_its_conv1d_covered(reward) -> None:
    model = Logits(tiny_gpt2())
    entries = plan(model, dict(model.named_parameters()), "jvp")
    convs = [e for e in entries if isinstance(e.module, Conv1D)]
    assert len(convs) == 8
    assert all(isinstance(e.rule, HFConv1DRule) for e in convs)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 17, (5, 12), generator=g)
    y = torch.randint(0, 17, (5, 12), generator=g)
    d = {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
    got = ad.GradientProbe(model, lm_loss, reward=reward)(x, y, direction=d)
    dots, cosines = loop_rewards(model, lm_loss, x, y, d)
    want = dots if reward == "dot" else cosines
    assert ((got - want).norm() / want.norm()) < 1e-4
