"""The rule registry and a user's own rule: a layer type registered by a user gets the same
dot, norm and rows paths as a built-in one (cut to the rewarded rows, the cosine without the
generic path), and the registry refuses what it cannot take."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.probe import _calls
from adaptive_data.probe.rules import _registry
from tests.models import loop_rewards

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

N, M = 10, 4


class ScaleShift(nn.Module):
    """``y = x * scale + shift`` over the last dim: no built-in rule covers it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ScaleShiftRule(ad.GhostRule):
    """A user's rule: the tangent, the per-example gradients and the rows, nothing else."""

    def tangent(self, module, args, kwargs, direction):
        x = args[0]
        return x * direction.get("scale", torch.zeros_like(module.scale)) + direction.get(
            "shift", torch.zeros_like(module.shift)
        )

    def moves_batch(self, module, dim, ndim):
        return dim < ndim - 1

    def per_example_gradients(self, module, x, b, names):
        n, d = b.shape[0], b.shape[-1]
        grads = {}
        if "scale" in names:
            grads["scale"] = (x * b).reshape(n, -1, d).sum(1)
        if "shift" in names:
            grads["shift"] = b.reshape(n, -1, d).sum(1)
        return grads

    def rows_independent(self, module, args, kwargs):
        return True


@pytest.fixture
def user_rule():
    ad.register_ghost_rule(ScaleShift)(ScaleShiftRule)
    try:
        yield
    finally:
        _registry._RULES.pop(ScaleShift)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), ScaleShift(6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def no_generic_path(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the generic path (one backward per example) ran")

    monkeypatch.setattr(_calls, "generic_pieces", refuse)


@pytest.mark.usefixtures("user_rule")
@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_a_user_rule_is_exact_without_the_generic_path(monkeypatch, reward) -> None:
    no_generic_path(monkeypatch)
    net = model()
    x, y = data(N, 1).tensors
    g = torch.Generator().manual_seed(2)
    d = {k: torch.randn(p.shape, generator=g) for k, p in net.named_parameters()}
    got = ad.GradientProbe(net, loss_fn, fallback="raise", reward=reward)(x, y, direction=d)
    dots, cosines = loop_rewards(net, loss_fn, x, y, d)
    torch.testing.assert_close(got, dots if reward == "dot" else cosines, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("user_rule")
def test_a_user_rule_is_cut_to_the_rewarded_rows(monkeypatch) -> None:
    """GAR(rows=M, reward="cosine"): the user's layer keeps M rows, as a Linear does, and the
    rows' rewards are the whole batch's rewards of those rows."""
    no_generic_path(monkeypatch)

    def run(rows):
        net = model()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sampler = ad.GARSampler(data(4 * N, 1), batch_size=N, seed=0, num_batches=3)
        got = []
        sampler.update = lambda r, batch=None, rows=None: got.append((r, rows))  # type: ignore[method-assign]
        gar = ad.GAR(net, sampler, optimizer=opt, rows=rows, budget=None)
        kept_rows = []
        for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
            opt.zero_grad()
            loss_fn(net(x), y).mean().backward()
            calls = gar._schedule.pending[-1].calls  # this batch's kept calls
            kept_rows.append({type(c.call.entry.module): c.rows for c in calls})
            gar.step()
            opt.step()
        return got, kept_rows

    full, _ = run(None)
    part, kept = run(M)
    assert len(part) == len(full) >= 2
    assert kept
    assert all(len(k[ScaleShift]) == M for k in kept)
    assert all(torch.equal(k[ScaleShift], k[nn.Linear]) for k in kept)
    for (r_full, _), (r_part, rows) in zip(full, part, strict=True):
        torch.testing.assert_close(r_part, r_full[rows], rtol=1e-4, atol=1e-6)


def test_a_tangent_alone_gets_the_generic_norms() -> None:
    """The function form registers the tangent only: the cosine then comes from the generic
    path, still exact."""

    @ad.register_ghost_rule(ScaleShift)
    def tangent(module, args, kwargs, direction):
        return ScaleShiftRule().tangent(module, args, kwargs, direction)

    try:
        rule = ad.ghost_rules()[ScaleShift]
        assert rule.per_example_gradients(ScaleShift(2), None, None, ()) is None
        net = model()
        x, y = data(N, 1).tensors
        g = torch.Generator().manual_seed(2)
        d = {k: torch.randn(p.shape, generator=g) for k, p in net.named_parameters()}
        got = ad.GradientProbe(net, loss_fn, reward="cosine")(x, y, direction=d)
        torch.testing.assert_close(
            got, loop_rewards(net, loss_fn, x, y, d)[1], rtol=1e-4, atol=1e-6
        )
    finally:
        _registry._RULES.pop(ScaleShift)


def test_the_registry_refuses_overwrites_and_bad_types() -> None:
    with pytest.raises(ValueError, match=r"a ghost rule for Linear is already registered"):
        ad.register_ghost_rule(nn.Linear)(ScaleShiftRule)
    with pytest.raises(ValueError, match=r"a ghost rule for transformers.pytorch_utils.Conv1D"):
        ad.register_ghost_rule("transformers.pytorch_utils.Conv1D")(ScaleShiftRule)
    with pytest.raises(TypeError, match=r"takes nn.Module subclasses or qualified names.*int"):
        ad.register_ghost_rule(int)
    with pytest.raises(TypeError, match=r"needs at least one module type"):
        ad.register_ghost_rule()
    with pytest.raises(TypeError, match=r"decorates a GhostRule subclass or a tangent function"):
        ad.register_ghost_rule(ScaleShift)(3)
    assert ScaleShift not in ad.ghost_rules()


def test_errors_list_the_registered_types() -> None:
    with pytest.raises(ValueError, match=r"rules exist for BatchNorm1d.*Conv1D \(transformers\)"):
        ad.GradientProbe(model(), loss_fn, fallback="raise")


def test_a_rule_registered_for_many_classes_is_counted_not_listed() -> None:
    from adaptive_data.probe.rules import registered_names
    from adaptive_data.probe.rules.hf_rmsnorm import GEMMA_STYLE, LLAMA_STYLE

    names = registered_names()
    assert f"HFRMSNormRule's {len(LLAMA_STYLE)} classes (transformers)" in names
    assert f"HFGemmaRMSNormRule's {len(GEMMA_STYLE)} classes (transformers)" in names
    assert "Conv1D (transformers)" in names
    assert "LlamaRMSNorm" not in names
    assert "GemmaRMSNorm (transformers)" in registered_names(most=len(GEMMA_STYLE))


def test_a_rule_speaks_for_the_subclasses_of_its_family() -> None:
    """SyncBatchNorm has no rule of its own, but mixes the examples as BatchNorm does."""
    from adaptive_data.probe._plan import couples_examples

    assert couples_examples(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)))
    assert not couples_examples(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2).eval()))
