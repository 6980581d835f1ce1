"""CategoricalPolicy: a valid distribution with its floor under any rewards; both rules learn."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_data.policy._categorical import (
    NORMALIZATIONS,
    RULES,
    CategoricalPolicy,
    ChoiceStatistics,
)


def assert_valid(policy: CategoricalPolicy) -> None:
    p = policy.probs
    assert bool(torch.isfinite(p).all())
    assert abs(float(p.sum()) - 1.0) < 1e-9
    assert float(p.min()) >= policy.floor * (1 - 1e-9)
    assert float(p.min()) > 0.0
    assert bool(torch.isfinite(policy.logits).all())


special = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 1e-30, 3e38])
reward = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), special)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    rule=st.sampled_from(RULES),
    normalize=st.sampled_from(NORMALIZATIONS),
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 5), reward), min_size=0, max_size=12),
        min_size=1,
        max_size=8,
    ),
    lr=st.sampled_from([0.0, 1e-3, 0.1, 10.0, 1e6]),
)
def test_valid_distribution_under_any_rewards(k, rule, normalize, batches, lr):
    policy = CategoricalPolicy(k, rule=rule, normalize=normalize, lr=lr)
    start = policy.probs
    nonfinite = 0
    for batch in batches:
        choices = torch.tensor([c % k for c, _ in batch], dtype=torch.long)
        rewards = torch.tensor([r for _, r in batch], dtype=torch.float32)
        nonfinite += int((~torch.isfinite(rewards)).sum())
        policy.update(choices, rewards)
        assert_valid(policy)
    assert policy.metrics()["nonfinite_rewards"] == nonfinite
    assert policy.metrics()["updates"] == len(batches)
    if lr == 0.0:  # lr=0 never moves, bit for bit, whatever the rewards
        assert torch.equal(policy.probs, start)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_learns_the_rewarded_choice(rule, normalize):
    g = torch.Generator().manual_seed(0)
    policy = CategoricalPolicy(3, rule=rule, normalize=normalize, lr=0.2)
    for _ in range(200):
        c = policy.sample(32, g)
        r = (c == 1).double() + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)
        policy.update(c, r)
    p = policy.probs
    assert int(p.argmax()) == 1
    assert float(p[1]) > 0.9
    assert float(p.min()) >= policy.floor - 1e-12


def test_nan_rewards_are_dropped_not_applied():
    policy = CategoricalPolicy(2, lr=1.0)
    before = policy.probs
    policy.update(torch.tensor([0, 1]), torch.tensor([math.nan, math.inf]))
    assert torch.equal(policy.probs, before)
    m = policy.metrics()
    assert m["nonfinite_rewards"] == 2
    assert m["skipped_updates"] == 1
    # A batch with one NaN: the finite rewards still count.
    policy.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, math.nan, -1.0]))
    assert policy.metrics()["rewards_applied"] == 2
    assert float(policy.probs[0]) > float(before[0])


def test_initial_weights_and_floor():
    policy = CategoricalPolicy(3, weights=[0.7, 0.3, 0.0], floor=0.01)
    p = policy.probs
    assert float(p[2]) == pytest.approx(0.01)
    assert float(p.sum()) == pytest.approx(1.0)
    exact = CategoricalPolicy(2, weights=[0.8, 0.2], floor=0.05).probs
    assert exact.tolist() == pytest.approx([0.8, 0.2])
    named = CategoricalPolicy(2, weights={"b": 1.0}, names=["a", "b"], floor=0.0)
    assert named.weights["b"] > 0.999999
    prop = CategoricalPolicy(2, weights="proportional", sizes=[30, 10], floor=0.0)
    assert prop.probs.tolist() == pytest.approx([0.75, 0.25])


def test_state_roundtrip_continues_identically():
    g = torch.Generator().manual_seed(1)
    a = CategoricalPolicy(4, rule="exp_grad", normalize="running")
    for _ in range(5):
        c = torch.randint(0, 4, (8,), generator=g)
        a.update(c, torch.randn(8, generator=g))
    b = CategoricalPolicy(4, rule="exp_grad", normalize="running")  # the same settings
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.probs, b.probs)
    c = torch.randint(0, 4, (8,), generator=g)
    r = torch.randn(8, generator=g)
    a.update(c, r)
    b.update(c, r)
    assert torch.equal(a.probs, b.probs)
    assert a.metrics() == b.metrics()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_choices": 0},
            r"num_choices should be a positive integer value, but got num_choices=0",
        ),
        (
            {"num_choices": 2, "floor": 0.5},
            r"floor should be a number in \[0, 1/num_choices\).*floor=0.5",
        ),
        ({"num_choices": 2, "floor": -0.1}, r"floor=-0.1"),
        (
            {"num_choices": 2, "rule": "adam"},
            r"rule should be one of reinforce, exp_grad, but got rule='adam'",
        ),
        ({"num_choices": 2, "normalize": "l2"}, r"normalize=.l2."),
        (
            {"num_choices": 2, "lr": -0.1},
            r"lr should be a non-negative finite number, but got lr=-0.1",
        ),
        ({"num_choices": 2, "lr": math.nan}, r"lr=nan"),
        ({"num_choices": 2, "momentum": 1.0}, r"momentum=1.0"),
        (
            {"num_choices": 2, "weights": [1.0, -1.0]},
            r"non-negative, but got weights=\[1.0, -1.0\]",
        ),
        ({"num_choices": 2, "weights": [1.0, math.nan]}, r"weights=\[1.0, nan\]"),
        (
            {"num_choices": 2, "weights": [0.0, 0.0]},
            r"should not all be zero, but got weights=\[0.0, 0.0\]",
        ),
        ({"num_choices": 2, "weights": [1.0]}, r"one entry per choice \(2\), but got 1"),
        ({"num_choices": 2, "weights": "zipf"}, r"weights='zipf'"),
        (
            {"num_choices": 2, "weights": {"c": 1.0}, "names": ["a", "b"]},
            r"unknown source\(s\) \['c'\]",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CategoricalPolicy(**kwargs)


def test_bad_update_inputs_raise():
    policy = CategoricalPolicy(3)
    c = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"shape \(3,\), one per example, but got shape=\(2,\)"):
        policy.update(c, torch.zeros(2))
    with pytest.raises(TypeError, match=r"floating-point Tensor, but got dtype=torch.int64"):
        policy.update(c, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch.Tensor, but got list"):
        policy.update(c, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"device=meta"):
        policy.update(c, torch.zeros(3, device="meta"))
    with pytest.raises(
        ValueError, match=r"choices should lie in \[0, 3\), but got values in \[0, 3\]"
    ):
        policy.update(torch.tensor([0, 3, 1]), torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"state\['num_choices'\] is 5, but this policy has 3 choices"
    ):
        policy.load_state_dict(CategoricalPolicy(5).state_dict())


def test_statistics_layout_and_wrong_length_apply():
    """statistics() is [non-finite, n, sum r, sum r^2, S_0..S_{K-1}, n_0..n_{K-1}]; apply()
    refuses a list of another length (a rank's list cut or padded by mistake)."""
    policy = CategoricalPolicy(3)
    r = torch.tensor([1.0, float("nan"), 2.0, -1.0], dtype=torch.float64)
    stats = policy.statistics(torch.tensor([0, 1, 2, 2]), r)
    assert stats == ChoiceStatistics(1.0, 3.0, 2.0, 6.0, (1.0, 0.0, 1.0), (1.0, 0.0, 2.0))
    assert stats.flat() == [1.0, 3.0, 2.0, 6.0, 1.0, 0.0, 1.0, 1.0, 0.0, 2.0]
    assert ChoiceStatistics.from_flat(stats.flat(), 3) == stats
    with pytest.raises(ValueError, match=r"should hold 4 \+ 2K = 10 numbers, but got 11"):
        policy.apply([*stats.flat(), 1.0])
    with pytest.raises(ValueError, match=r"stats are for 3 choices, but this policy has 4"):
        CategoricalPolicy(4).apply(stats)
    assert policy.metrics()["updates"] == 0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", -0.3, r"lr should be a non-negative"),
        ("rule", "adam", r"rule should be one of reinforce, exp_grad, but got rule='adam'"),
        ("floor", 0.5, r"floor should be a number in \[0, 1/num_choices\)"),
        ("momentum", 1.0, r"momentum should be a number in \[0, 1\)"),
    ],
)
def test_a_state_with_a_bad_configuration_is_refused(field, value, match):
    """The configuration comes from the state, so it is checked as the constructor's is (a
    negative lr would make the policy move away from high rewards)."""
    state = CategoricalPolicy(3).state_dict()
    state["config"][field] = value
    policy = CategoricalPolicy(3, lr=0.1)
    with pytest.raises(ValueError, match=match):
        policy.load_state_dict(state)
    assert policy.lr == 0.1


def test_sample_needs_a_generator():
    policy = CategoricalPolicy(3)
    with pytest.raises(TypeError, match=r"generator should be a torch.Generator, but got NoneType"):
        policy.sample(4, None)
    with pytest.raises(ValueError, match=r"n should be a non-negative integer value, but got n=-1"):
        policy.sample(-1, torch.Generator())
    assert policy.sample(0, torch.Generator()).shape == (0,)


def test_rewards_whose_sums_overflow_leave_the_policy_unchanged():
    """Finite rewards near float64's limit overflow the sums: no error, no step."""
    policy = CategoricalPolicy(2, lr=1.0)
    before = policy.probs
    policy.update(
        torch.tensor([0, 1, 0]), torch.tensor([-2.6e298, -1.79e308, -1.79e308], dtype=torch.float64)
    )
    assert torch.equal(policy.probs, before)
    assert policy.metrics()["rewards_applied"] == 3
