"""Every probe method against per_sample, and per_sample against a loop of single backwards."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from torch import nn

import adaptive_data as ad
from tests import models
from tests.models import build, loop_oracle, loss_fn, random_direction

KINDS = ["mlp", "cnn", "transformer"]
# "ghost" checks itself on its first call (a backward that also computes weight gradients);
# "ghost_unverified" is the fast path every later call takes (anchor gradients only).
EXACT = ["ghost", "ghost_unverified", "jvp"]


def probe_for(model: nn.Module, method: str) -> ad.GradientProbe:
    if method == "ghost_unverified":
        return ad.GradientProbe(model, loss_fn, estimator="ghost", verify="never")
    return ad.GradientProbe(model, loss_fn, estimator=method)


def _setup(kind: str, n: int = 6, seed: int = 0, train: bool = False):
    model = build(kind, seed).train(train)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = models.batch(kind, n, g)
    return model, x, y, random_direction(model, g)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().item() + 1e-6
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_matches_loop_of_single_backwards(kind: str) -> None:
    model, x, y, d = _setup(kind)
    expected = loop_oracle(model, x, y, d)
    got = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=d)
    _close(got, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_match_per_sample(kind: str, method: str) -> None:
    model, x, y, d = _setup(kind)
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=d)
    got = probe_for(model, method)(x, y, direction=d)
    assert got.shape == (len(y),)
    assert got.dtype == torch.float32
    _close(got, expected)


def _approximately(got: torch.Tensor, expected: torch.Tensor) -> None:
    """An approximate method: same ranking, and most examples within 2% of the scale."""
    assert spearmanr(got, expected).statistic > 0.9
    error = (got - expected).abs() / expected.abs().max()
    assert error.median() < 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_finite_difference_close_to_per_sample(kind: str) -> None:
    model, x, y, d = _setup(kind, n=12)
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=d)
    got = ad.GradientProbe(model, loss_fn, estimator="fd")(x, y, direction=d)
    _approximately(got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_head_is_exact_for_the_last_layer(kind: str) -> None:
    """head == per_sample with the direction restricted to the last Linear's parameters."""
    model, x, y, d = _setup(kind)
    head_names = {"mlp": "5.", "cnn": "11.", "transformer": "head."}[kind]
    restricted = {n: t if n.startswith(head_names) else torch.zeros_like(t) for n, t in d.items()}
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=restricted)
    got = ad.GradientProbe(model, loss_fn, estimator="head")(x, y, direction=d)
    _close(got, expected)


def test_head_ranks_like_per_sample_with_a_reference() -> None:
    """As an approximation of the full reward: rank correlation on the MLP, reference mode."""
    model, x, y, _ = _setup("mlp", n=32)
    g = torch.Generator().manual_seed(5)
    ref = models.batch("mlp", 16, g)
    full = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, reference=ref)
    head = ad.GradientProbe(model, loss_fn, estimator="head")(x, y, reference=ref)
    assert spearmanr(head, full).statistic > 0.7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ghost", "jvp", "per_sample", "fd"])
def test_reference_mode_equals_explicit_gradient(kind: str, method: str) -> None:
    model, x, y, _ = _setup(kind)
    g = torch.Generator().manual_seed(9)
    x_ref, y_ref = models.batch(kind, 4, g)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = loss_fn(model(x_ref), y_ref).mean()
    d = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    probe = ad.GradientProbe(model, loss_fn, estimator=method)
    _close(probe(x, y, reference=(x_ref, y_ref)), probe(x, y, direction=d))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("method", EXACT)
def test_batchnorm_train_mode_sums_to_batch_gradient(kind: str, method: str) -> None:
    model, x, y, d = _setup(kind, train=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = loss_fn(model(x), y).sum()
    grads = torch.autograd.grad(total, list(params.values()))
    model.load_state_dict(state)  # undo the running-stat update of the forward above
    expected = sum((g * d[n]).sum() for n, g in zip(params, grads, strict=True))
    got = probe_for(model, method)(x, y, direction=d)
    torch.testing.assert_close(got.sum(), expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_train_mode_jvp_is_derivative_of_batched_loss() -> None:
    """jvp and finite differences agree per example: both differentiate the batched l_i."""
    model, x, y, d = _setup("cnn", n=12, train=True)
    jvp = ad.GradientProbe(model, loss_fn, estimator="jvp")(x, y, direction=d)
    fd = ad.GradientProbe(model, loss_fn, estimator="fd")(x, y, direction=d)
    _approximately(fd, jvp)


def test_multihead_attention_sequence_first() -> None:
    model = models.transformer(batch_first=False).eval()
    g = torch.Generator().manual_seed(3)
    x, y = models.batch("transformer", 5, g)
    d = random_direction(model, g)
    expected = loop_oracle(model, x, y, d)
    for method in ("ghost", "ghost_unverified"):
        _close(probe_for(model, method)(x, y, direction=d), expected)


def test_inputs_as_tuple_and_dict() -> None:
    model, x, y, d = _setup("transformer")
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True  # the last position is padding for every example
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")((x, mask), y, direction=d)
    for method in EXACT:
        probe = probe_for(model, method)
        _close(probe((x, mask), y, direction=d), expected)
        _close(probe({"tokens": x, "mask": mask}, y, direction=d), expected)


# ---------------------------------------------------------------- every layer type ghost covers


def _layer_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = nn.Flatten()
    cases = {
        "linear_3d_input": (
            nn.Sequential(nn.Linear(4, 5), nn.ReLU(), head, nn.Linear(15, 3)),
            torch.randn(4, 3, 4, generator=g),
        ),
        "conv1d": (
            nn.Sequential(
                nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), head, nn.LazyLinear(3)
            ),
            torch.randn(4, 2, 9, generator=g),
        ),
        "conv3d_groups": (
            nn.Sequential(nn.Conv3d(2, 4, 2, groups=2, padding=1), head, nn.LazyLinear(3)),
            torch.randn(4, 2, 3, 3, 3, generator=g),
        ),
        "conv2d_circular": (
            nn.Sequential(
                nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), head, nn.LazyLinear(3)
            ),
            torch.randn(4, 2, 5, 5, generator=g),
        ),
        "embedding": (
            nn.Sequential(nn.Embedding(7, 4, padding_idx=2), head, nn.Linear(12, 3)),
            torch.randint(0, 7, (4, 3), generator=g),
        ),
        "batchnorm1d_eval": (
            nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
            torch.randn(4, 5, generator=g),
        ),
        "groupnorm": (
            nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), head, nn.LazyLinear(3)),
            torch.randn(4, 2, 3, 3, generator=g),
        ),
        "rmsnorm": (
            nn.Sequential(nn.Linear(5, 4), nn.RMSNorm(4), nn.Linear(4, 3)),
            torch.randn(4, 5, generator=g),
        ),
        "layernorm_no_bias": (
            nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4, bias=False), nn.Linear(4, 3)),
            torch.randn(4, 5, generator=g),
        ),
    }
    for model, x in cases.values():
        model(x)  # materialise lazy layers
        model.eval()
        with torch.no_grad():  # non-trivial norm affine parameters
            for m in model.modules():
                if isinstance(m, (nn.BatchNorm1d, nn.GroupNorm, nn.RMSNorm, nn.LayerNorm)):
                    m.weight.uniform_(0.5, 1.5)
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-1, 1)
                    m.bias.uniform_(-1, 1)
    return cases


@pytest.mark.parametrize("case", list(_layer_models()))
def test_every_ghost_layer_matches_loop_oracle(case: str) -> None:
    model, x = _layer_models()[case]
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    d = random_direction(model, g)
    expected = loop_oracle(model, x, y, d)
    for method in EXACT:
        _close(probe_for(model, method)(x, y, direction=d), expected)


def test_embedding_scale_grad_by_freq_shares_sum_to_batch_gradient() -> None:
    """scale_grad_by_freq couples examples in backward only: ghost gives each example's share."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3)
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g)
    d = random_direction(model, g)
    grads = torch.autograd.grad(loss_fn(model(x), y).sum(), list(model.parameters()))
    expected = sum(
        (gr * d[n]).sum() for (n, _), gr in zip(model.named_parameters(), grads, strict=True)
    )
    got = ad.GradientProbe(model, loss_fn)(x, y, direction=d)
    torch.testing.assert_close(got.sum(), expected, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_not_part_of_d() -> None:
    model, x, y, _ = _setup("mlp")
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    d = random_direction(model, g)
    assert "0.weight" not in d
    expected = loop_oracle(model, x, y, d)
    for method in [*EXACT, "per_sample"]:
        _close(probe_for(model, method)(x, y, direction=d), expected)


def test_weight_used_twice_in_one_forward_is_summed() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    torch.manual_seed(0)
    model = Twice()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    d = random_direction(model, g)
    for method in EXACT:
        _close(probe_for(model, method)(x, y, direction=d), loop_oracle(model, x, y, d))


# ---------------------------------------------------------------- hypothesis: sizes and shapes


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 7),
    d_in=st.integers(1, 6),
    hidden=st.integers(1, 6),
    method=st.sampled_from([*EXACT, "fd"]),
    seed=st.integers(0, 2**16),
)
def test_mlp_any_shape(n: int, d_in: int, hidden: int, method: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    d = {k: v.double() for k, v in random_direction(model, g).items()}
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=d)
    got = probe_for(model, method)(x, y, direction=d)
    assert got.shape == (n,)
    _close(got, expected.float(), rtol=1e-2 if method == "fd" else 1e-4)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(5, 7),
    seed=st.integers(0, 2**16),
)
def test_conv_any_geometry(
    n: int, groups: int, kernel: int, stride: int, padding: int, dilation: int, size: int, seed: int
) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    d = random_direction(model, g)
    expected = ad.GradientProbe(model, loss_fn, estimator="per_sample")(x, y, direction=d)
    for method in EXACT:
        _close(probe_for(model, method)(x, y, direction=d), expected)
