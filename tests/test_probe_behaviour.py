"""The probe leaves no trace, covers or refuses every parameter, and rejects bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaptive_data as ad
from adaptive_data.probe.rules import _registry
from adaptive_data.probe.rules.linear import LinearRule
from tests import models
from tests.models import build, loss_fn, random_direction

ALL = list(ad.ESTIMATORS)


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            torch.testing.assert_close(after[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    for name, value in before["grads"].items():
        if value is None:
            assert after["grads"][name] is None, f".grad of {name} appeared"
        else:
            torch.testing.assert_close(after["grads"][name], value, rtol=0, atol=0)
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert torch.equal(after["rng"], before["rng"])


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = models.cnn_bn()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.body(x))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("train", [True, False])
def test_probe_never_edits_the_model(method: str, kind: str, train: bool) -> None:
    model = build(kind).train(train)
    g = torch.Generator().manual_seed(0)
    x, y = models.batch(kind, 4, g)
    # existing gradients must survive untouched, and parameters without .grad keep None
    loss_fn(model(x), y).sum().backward()
    first = next(model.parameters())
    first.grad = None
    before = _snapshot(model)
    probe = ad.GradientProbe(model, loss_fn, estimator=method)
    probe(x, y, reference=models.batch(kind, 3, g))
    probe(x, y, direction=random_direction(model, g))
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize(
    "method", [m for m in ALL if m != "head"]
)  # head: output is not a Linear's
def test_probe_restores_rng_with_dropout(method: str) -> None:
    model = WithDropout().train()
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("cnn", 4, g)
    before = _snapshot(model)
    ad.GradientProbe(model, loss_fn, estimator=method)(x, y, direction=random_direction(model, g))
    _assert_same(before, _snapshot(model))


def test_ghost_replays_dropout_mask_for_jvp_fallback() -> None:
    """A fallback module with dropout is replayed with the RNG of its original call."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x * self.scale, 0.5, training=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Noisy(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    d = random_direction(model, g)
    # per-example reference: jvp of the whole model with the same global RNG state
    state = torch.get_rng_state()
    jvp = ad.GradientProbe(model, loss_fn, estimator="jvp")(x, y, direction=d)
    probe = ad.GradientProbe(model, loss_fn, estimator="ghost")
    for _ in range(2):  # the verified first call and the fast later ones
        torch.set_rng_state(state)
        torch.testing.assert_close(probe(x, y, direction=d), jvp, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- coverage


class BareScale(nn.Module):
    """A module holding a bare Parameter: no ghost rule exists for it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_uncovered_module_is_refused_by_name_with_fallback_raise() -> None:
    model = nn.Sequential(nn.Linear(4, 4), BareScale(4), nn.Linear(4, 3))
    with pytest.raises(
        ValueError, match=r"no rule for the trainable parameters of \['1 \(BareScale\)'\]"
    ):
        ad.GradientProbe(model, loss_fn, fallback="raise")


def test_uncovered_module_is_covered_by_jvp_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), BareScale(4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    d = random_direction(model, g)
    torch.testing.assert_close(
        ad.GradientProbe(model, loss_fn)(x, y, direction=d),
        models.loop_oracle(model, x, y, d),
        rtol=1e-4,
        atol=1e-5,
    )


class TiedHead(nn.Module):
    """The output layer reads the embedding matrix directly: a use outside Embedding.forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(tokens).mean(1))
        return h @ self.embed.weight.T


def test_parameter_used_outside_its_module_is_detected_not_dropped() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 6, (5, 3), generator=g), torch.randint(0, 6, (5,), generator=g)
    d = random_direction(model, g)
    with pytest.raises(
        RuntimeError, match=r"used outside their module's forward.*embed \(Embedding\)"
    ):
        ad.GradientProbe(model, loss_fn)(x, y, direction=d)
    # jvp covers it, exactly
    torch.testing.assert_close(
        ad.GradientProbe(model, loss_fn, estimator="jvp")(x, y, direction=d),
        models.loop_oracle(model, x, y, d),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("n", [2, 5])  # 5: as many examples as positions
def test_ghost_finds_a_layer_that_sees_the_batch_in_dim_1(n: int) -> None:
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, 4]
            return self.out(self.lin(x.transpose(0, 1)).mean(0))

    torch.manual_seed(0)
    model = SeqFirst()
    x, y = torch.randn(n, 5, 4), torch.randint(0, 3, (n,))
    d = random_direction(model, torch.Generator().manual_seed(0))
    got = ad.GradientProbe(model, loss_fn, verify="never")(x, y, direction=d)
    torch.testing.assert_close(got, models.loop_oracle(model, x, y, d), rtol=1e-4, atol=1e-5)


def test_embedding_with_max_norm_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'0' is an Embedding with max_norm=1.0"):
        ad.GradientProbe(model, loss_fn)


def test_register_ghost_rule_refuses_overwrite() -> None:
    with pytest.raises(ValueError, match=r"a ghost rule for Linear is already registered"):
        ad.register_ghost_rule(nn.Linear)(lambda module, args, kwargs, direction: args[0])
    assert type(ad.ghost_rules()[nn.Linear]) is LinearRule  # the first rule stays


def test_register_ghost_rule_for_a_new_layer() -> None:
    class Gain(BareScale):
        pass

    @ad.register_ghost_rule(Gain)
    def _gain(module, args, kwargs, direction):  # output = x * gain is linear in gain
        return args[0] * direction.get("gain", torch.zeros_like(module.gain))

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), Gain(4), nn.Tanh(), nn.Linear(4, 3))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
        d = random_direction(model, g)
        probe = ad.GradientProbe(model, loss_fn, fallback="raise")
        torch.testing.assert_close(
            probe(x, y, direction=d), models.loop_oracle(model, x, y, d), rtol=1e-4, atol=1e-5
        )
    finally:
        _registry._RULES.pop(Gain)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def mlp_setup():
    model = build("mlp")
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("mlp", 4, g)
    return model, x, y, random_direction(model, g)


def test_unknown_method(mlp_setup) -> None:
    with pytest.raises(
        ValueError, match=r"estimator should be one of .* but got estimator='exact'"
    ):
        ad.GradientProbe(mlp_setup[0], loss_fn, estimator="exact")


def test_bad_constructor_arguments(mlp_setup) -> None:
    model = mlp_setup[0]
    with pytest.raises(TypeError, match=r"model should be an nn.Module, but got str"):
        ad.GradientProbe("model", loss_fn)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"loss_fn should be callable, but got int"):
        ad.GradientProbe(model, 3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"fallback should be 'jvp' or 'raise', but got fallback='skip'"
    ):
        ad.GradientProbe(model, loss_fn, fallback="skip")
    with pytest.raises(
        ValueError, match=r"rel_eps should be a positive finite number, but got rel_eps=0"
    ):
        ad.GradientProbe(model, loss_fn, rel_eps=0)
    with pytest.raises(
        ValueError,
        match=r"chunk_size should be a positive integer value or None, but got chunk_size=0",
    ):
        ad.GradientProbe(model, loss_fn, chunk_size=0)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model has no trainable parameters"):
        ad.GradientProbe(frozen, loss_fn)


@pytest.mark.parametrize("method", ALL)
def test_loss_fn_returning_a_scalar(mlp_setup, method: str) -> None:
    model, x, y, d = mlp_setup

    def mean_loss(out, target):
        return nn.functional.cross_entropy(out, target)

    with pytest.raises(ValueError, match=r"per-example losses of shape \[4\], but got a scalar"):
        ad.GradientProbe(model, mean_loss, estimator=method)(x, y, direction=d)


@pytest.mark.parametrize("method", ALL)
def test_loss_fn_returning_wrong_length(mlp_setup, method: str) -> None:
    model, x, y, d = mlp_setup

    def bad(out, target):
        return loss_fn(out, target)[:-1]

    with pytest.raises(ValueError, match=r"shape \[4\], but got shape \[3\]"):
        ad.GradientProbe(model, bad, estimator=method)(x, y, direction=d)


def test_loss_fn_returning_a_non_tensor(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    with pytest.raises(
        TypeError, match=r"should return a Tensor of per-example losses, but got list"
    ):
        ad.GradientProbe(model, lambda o, t: [1.0])(x, y, direction=d)


def test_direction_missing_extra_and_misshapen(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    probe = ad.GradientProbe(model, loss_fn)
    missing = {k: v for k, v in d.items() if k != "0.bias"}
    with pytest.raises(
        ValueError, match=r"direction is missing trainable parameters: \['0.bias'\]"
    ):
        probe(x, y, direction=missing)
    with pytest.raises(
        ValueError, match=r"not trainable parameters of the model: \['head.weight'\]"
    ):
        probe(x, y, direction={**d, "head.weight": torch.zeros(1)})
    with pytest.raises(
        ValueError,
        match=r"direction\['0.weight'\] has shape \[6, 8\], but the parameter has shape \[8, 6\]",
    ):
        probe(x, y, direction={**d, "0.weight": torch.zeros(6, 8)})
    with pytest.raises(
        TypeError,
        match=r"direction\['0.weight'\] should be floating point, but got dtype torch.int64",
    ):
        probe(x, y, direction={**d, "0.weight": torch.zeros(8, 6, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"direction should be a dict"):
        probe(x, y, direction=[1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_direction_with_nan_or_inf(mlp_setup, bad: float) -> None:
    model, x, y, d = mlp_setup
    d["2.bias"][3] = bad
    with pytest.raises(ValueError, match=r"direction\['2.bias'\] contains NaN or inf"):
        ad.GradientProbe(model, loss_fn)(x, y, direction=d)


def test_reference_gradient_with_nan(mlp_setup) -> None:
    model, x, y, _ = mlp_setup
    x_ref = x.clone()
    x_ref[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"the reference gradient of '0.weight' contains NaN or inf"
    ):
        ad.GradientProbe(model, loss_fn)(x, y, reference=(x_ref, y))


def test_empty_batch_and_mismatched_targets(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    probe = ad.GradientProbe(model, loss_fn)
    with pytest.raises(ValueError, match=r"x is an empty batch \(batch size 0\)"):
        probe(x[:0], y[:0], direction=d)
    with pytest.raises(
        ValueError, match=r"y should have batch size 4 like x, but holds a tensor of shape \(3,\)"
    ):
        probe(x, y[:3], direction=d)
    with pytest.raises(ValueError, match=r"x_ref is an empty batch"):
        probe(x, y, reference=(x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"share one batch size, but got sizes \[3, 4\]"):
        probe((x, x[:3]), y, direction=d)
    with pytest.raises(TypeError, match=r"x should be a Tensor, a tuple/list of tensors or a dict"):
        probe("pixels", y, direction=d)


def test_reference_and_direction_are_exclusive(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    probe = ad.GradientProbe(model, loss_fn)
    with pytest.raises(ValueError, match=r"pass exactly one of reference"):
        probe(x, y)
    with pytest.raises(ValueError, match=r"pass exactly one of reference"):
        probe(x, y, reference=(x, y), direction=d)
    with pytest.raises(TypeError, match=r"reference should be a pair .* of length 3"):
        probe(x, y, reference=(x, y, y))


def test_unsupported_or_foreign_optimizer(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    probe = ad.GradientProbe(model, loss_fn)
    with pytest.raises(
        TypeError, match=r"optimizer should be a torch.optim.Optimizer .* but got Sequential"
    ):
        probe(x, y, direction=d, optimizer=model)
    other = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"optimizer owns none of the model's trainable parameters"
    ):
        probe(x, y, direction=d, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def test_trainable_set_changed_after_construction(mlp_setup) -> None:
    model, x, y, d = mlp_setup
    probe = ad.GradientProbe(model, loss_fn)
    model[0].weight.requires_grad_(False)
    d.pop("0.weight")
    with pytest.raises(
        RuntimeError, match=r"trainable parameters changed since this GradientProbe was built"
    ):
        probe(x, y, direction=d)


def test_head_needs_a_linear_output() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(-1))
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(
        ValueError,
        match=r"estimator='head' needs the model's output to be the output of an nn.Linear",
    ):
        ad.GradientProbe(model, loss_fn, estimator="head")(x, y, reference=(x, y))


class RootGain(nn.Module):
    """A bare Parameter on the root module, with BatchNorm: ghost must replay the root."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.gain)


@pytest.mark.parametrize("train", [True, False])
def test_bare_parameter_on_the_root(train: bool) -> None:
    """Eval: examples are independent and ghost equals the oracle (computed by one root JVP).
    Train: BatchNorm couples them; ghost replays the root for its share and still sums to
    the batch gradient, while jvp gives the derivative of the batched losses."""
    torch.manual_seed(0)
    model = RootGain().train(train)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    d = random_direction(model, g)
    ghost = ad.GradientProbe(model, loss_fn)(x, y, direction=d)
    if not train:
        torch.testing.assert_close(ghost, models.loop_oracle(model, x, y, d), rtol=1e-4, atol=1e-5)
        return
    state = copy.deepcopy(model.state_dict())
    grads = torch.autograd.grad(loss_fn(model(x), y).sum(), list(model.parameters()))
    model.load_state_dict(state)
    names = [n for n, _ in model.named_parameters()]
    expected = sum((gr * d[n]).sum() for n, gr in zip(names, grads, strict=True))
    torch.testing.assert_close(ghost.sum(), expected, rtol=1e-4, atol=1e-5)
    jvp = ad.GradientProbe(model, loss_fn, estimator="jvp")(x, y, direction=d)
    assert not torch.allclose(ghost, jvp, atol=1e-3)  # the share is not the batched derivative


@pytest.mark.parametrize("method", ALL)
def test_probe_works_inside_no_grad(method: str) -> None:
    """Users often score batches in evaluation code wrapped in torch.no_grad()."""
    model = build("mlp")
    g = torch.Generator().manual_seed(0)
    x, y = models.batch("mlp", 4, g)
    ref = models.batch("mlp", 3, g)
    probe = ad.GradientProbe(model, loss_fn, estimator=method)
    expected = probe(x, y, reference=ref)
    with torch.no_grad():
        got = probe(x, y, reference=ref)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- the former spelling


def test_method_and_finite_difference_are_deprecated_spellings(mlp_setup) -> None:
    """method= and "finite_difference" still work, with a FutureWarning naming the new
    spelling, and give what estimator= gives; ad.METHODS likewise."""
    model, x, y, d = mlp_setup
    with pytest.warns(FutureWarning, match=r"GradientProbe\(method=\.\.\.\) is deprecated"):
        old = ad.GradientProbe(model, loss_fn, method="jvp")
    assert old.estimator == "jvp"
    torch.testing.assert_close(
        old(x, y, direction=d), ad.GradientProbe(model, loss_fn, "jvp")(x, y, direction=d)
    )
    with pytest.warns(FutureWarning, match=r"estimator='finite_difference' is deprecated.*'fd'"):
        fd = ad.GradientProbe(model, loss_fn, "finite_difference")
    assert fd.estimator == "fd"
    torch.testing.assert_close(
        fd(x, y, direction=d), ad.GradientProbe(model, loss_fn, "fd")(x, y, direction=d)
    )
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"not both"):
        ad.GradientProbe(model, loss_fn, "jvp", method="ghost")
    with pytest.warns(FutureWarning, match=r"adaptive_data.METHODS is deprecated"):
        assert "finite_difference" in ad.METHODS


def test_the_public_names_of_the_estimators_are_the_table() -> None:
    from adaptive_data.probe._estimators import ESTIMATORS as table
    from adaptive_data.probe._keepers import KEEPERS

    assert tuple(table) == ad.ESTIMATORS
    assert set(KEEPERS) <= set(table)  # what GAR takes is a subset of the probe's
