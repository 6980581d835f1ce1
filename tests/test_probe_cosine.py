"""reward="cosine": <g_i, D> / (||g_i|| ||D||) with per-example gradient norms from ghost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptive_data as ad
from tests import models
from tests.models import build, loss_fn, random_direction
from tests.test_probe_oracle import _layer_models


def _loop_cosine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, d: dict) -> torch.Tensor:
    """The cosine from N single-example backward passes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    d_norm = torch.sqrt(sum(t.pow(2).sum() for t in d.values()))
    out = []
    for i in range(len(y)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        dot = sum((g * d[n]).sum() for n, g in zip(params, grads, strict=True))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        out.append(dot / (norm * d_norm))
    return torch.stack(out)


CASES = {**_layer_models()}


@pytest.mark.parametrize("case", [*CASES, "mlp", "cnn"])
@pytest.mark.parametrize("method", ["ghost", "per_sample"])
def test_cosine_matches_single_example_loop(case: str, method: str) -> None:
    if case in CASES:
        model, x = CASES[case]
    else:
        model = build(case).eval()
        x = models.batch(case, 5, torch.Generator().manual_seed(4))[0]
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    d = random_direction(model, g)
    for m in model.modules():  # the probe zeroes the padding row of D: no step moves it
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            d[next(n for n, p in model.named_parameters() if p is m.weight)][m.padding_idx] = 0
    got = ad.GradientProbe(model, loss_fn, estimator=method, reward="cosine")(x, y, direction=d)
    torch.testing.assert_close(got, _loop_cosine(model, x, y, d), rtol=1e-4, atol=1e-6)
    assert bool((got.abs() <= 1 + 1e-6).all())


def test_cosine_with_a_reference_and_adam() -> None:
    """D = P d: the cosine is between g_i and the preconditioned direction."""
    model = build("cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("cnn", 6, g)
    ref = models.batch("cnn", 4, g)
    opt = torch.optim.Adam(model.parameters())
    loss_fn(model(x), y).mean().backward()
    opt.step()
    opt.zero_grad()
    dot = ad.GradientProbe(model, loss_fn)(x, y, reference=ref, optimizer=opt)
    cos = ad.GradientProbe(model, loss_fn, reward="cosine")(x, y, reference=ref, optimizer=opt)
    ratio = dot / cos  # ||g_i|| ||D||: positive, and ||D|| is common to all examples
    assert bool((ratio > 0).all())
    norms = ad.GradientProbe(model, loss_fn, estimator="per_sample", reward="cosine")(
        x, y, reference=ref, optimizer=opt
    )
    torch.testing.assert_close(cos, norms, rtol=1e-4, atol=1e-6)


def test_zero_direction_gives_zero_not_nan() -> None:
    model = build("mlp")
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("mlp", 4, g)
    d = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    r = ad.GradientProbe(model, loss_fn, reward="cosine")(x, y, direction=d)
    assert torch.equal(r, torch.zeros(4))


def test_cosine_needs_a_method_with_norms() -> None:
    model = build("mlp")
    with pytest.raises(
        ValueError, match=r"reward='cosine' needs per-example gradient norms.*estimator='jvp'"
    ):
        ad.GradientProbe(model, loss_fn, estimator="jvp", reward="cosine")
    with pytest.raises(
        ValueError, match=r"reward should be one of dot, cosine, but got reward='cos'"
    ):
        ad.GradientProbe(model, loss_fn, reward="cos")


@pytest.mark.parametrize("batch_first", [True, False])
def test_cosine_of_the_transformer_block_matches_single_example_loop(batch_first: bool) -> None:
    """MultiheadAttention (either layout) and the root's bare position Parameter have norms."""
    torch.manual_seed(0)
    model = models.transformer(batch_first).eval()
    g = torch.Generator().manual_seed(4)
    x, y = models.batch("transformer", 5, g)  # 5 examples of 5 positions
    d = random_direction(model, g)
    d["embed.weight"][0] = 0  # the padding row: no step moves it
    got = ad.GradientProbe(model, loss_fn, reward="cosine")(x, y, direction=d)
    torch.testing.assert_close(got, _loop_cosine(model, x, y, d), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_cosine_never_edits_the_model(train: bool) -> None:
    from tests.test_probe_behaviour import _assert_same, _snapshot

    model = build("cnn").train(train)
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("cnn", 4, g)
    before = _snapshot(model)
    probe = ad.GradientProbe(model, loss_fn, reward="cosine")
    for _ in range(2):
        probe(x, y, reference=models.batch("cnn", 3, g))
    _assert_same(before, _snapshot(model))
