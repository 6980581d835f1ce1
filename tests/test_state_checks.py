"""A loaded state is checked whole before any of it is applied: a refused one leaves the
sampler, the transform or the policy as it was, and every refusal names the key.

The fuzz corrupts one field of a mid-run state at a time (wrong type, negative, NaN, wrong
shape, missing key, out of range, off by one) and requires either a ``ValueError`` naming the
field's key or a load that gives back the state unchanged; after a refusal the target's own
``state_dict()`` is what it was.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_data import GARSampler, GARTransform
from adaptive_data.policy import CategoricalPolicy
from tests.test_lag import ReadAhead

# ---------------------------------------------------------------------- helpers


def sources() -> dict[str, Any]:
    return {"a": torch.arange(20), "b": torch.arange(100, 130), "c": torch.arange(200, 212)}


def make(transform: bool = False, **kw: Any) -> GARSampler:
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=3) if transform else None
    return GARSampler(sources(), batch_size=4, seed=0, num_batches=6, transform=tf, **kw)


def mid_run(s: GARSampler, steps: int = 4, ahead: int = 2) -> GARSampler:
    """``steps`` batches delivered through a loader that reads ``ahead`` batches ahead (they
    stay undelivered: the state's window), all but the last rewarded."""
    it = iter(s.track(ReadAhead(s, ahead)))
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        next(it)
        if i < steps - 1:
            s.update(torch.randn(4, generator=g, dtype=torch.float64))
    return s


def same(a: Any, b: Any) -> bool:
    """Deep equality: Tensors by dtype, shape and values (NaN equal to NaN), floats with NaN
    equal to NaN, containers entry by entry (a tuple is not a list)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(
                torch.equal(a, b)
                or (
                    a.is_floating_point()
                    and a.isnan().eq(b.isnan()).all()
                    and a.nan_to_num().equal(b.nan_to_num())
                )
            )
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def leaves(state: Any, path: tuple = ()) -> list[tuple]:
    """Every field of a state: the paths to its dict entries, list entries and Tensors."""
    out = []
    if isinstance(state, dict):
        for k, v in state.items():
            out.append((*path, k))
            out += leaves(v, (*path, k))
    elif isinstance(state, list):
        for i, v in enumerate(state):
            out.append((*path, i))
            out += leaves(v, (*path, i))
    return out


def key_of(path: tuple) -> str:
    """The name a refusal must carry: the last dict key on the path."""
    return next(p for p in reversed(path) if isinstance(p, str))


def get(state: Any, path: tuple) -> Any:
    for p in path:
        state = state[p]
    return state


def put(state: Any, path: tuple, value: Any) -> None:
    get(state, path[:-1])[path[-1]] = value


# Fields that may hold any value of their type (a corrupted number there is another valid
# state, not a lie): the generator's bytes, the running mean reward (negative, NaN before the
# first reward, inf after rewards that overflow float64), epoch numbers (set_epoch takes any),
# the rounds over a source, example seeds, counters without an upper bound, and the running
# mean of the policy's rewards, the logits (any within 50 of each other: a user may set them).
FREE = {
    "choice_generator",
    "reward_means",
    "rewards",  # each update's mean reward per source: any number, NaN where none
    "epoch",
    "next_epoch",
    "rounds",
    "rounds_before",
    "seeds",
    "running",
    "logits",
}
NAN_OK = {"reward_means", "rewards"}  # NaN before a source's first reward, or absent
# Keys a state saved by an earlier version may lack: it loads with their defaults
# (tests/test_state_compat.py), so removing them is not a corruption.
OPTIONAL = {
    "rank",
    "world_size",
    "lag",
    "history_every",
    "history_limit",
    "reward_window",
    "learn",
    "stream_first_batch",
}
# Integer fields with an upper bound (or a partner they must match): a huge value lies.
BOUNDED = {
    "position",
    "yielded",
    "next_id",
    "cursors",
    "cursors_before",
    "id",
    "keys",
    "sources",
    "ops",
    "bins",
    "queued_ids",
    "num_choices",
    "batch_size",
    "num_batches",
    "seed",
    "version",
    "sizes",
    "history_every",
    "history_limit",
    "reward_window",
}
KINDS = ("type", "negative", "nan", "shape", "missing", "large", "off_by_one")


def corrupt(state: dict, path: tuple, kind: str) -> bool:
    """Corrupt the field at ``path`` in place; ``False`` when ``kind`` does not apply."""
    value, key = get(state, path), key_of(path)
    free = any(p in FREE for p in path if isinstance(p, str))
    if kind == "type":
        put(state, path, "garbage")
    elif kind == "missing":
        if not isinstance(path[-1], str) or path[-1] in OPTIONAL:
            return False
        if path == ("transform",) and value is None:  # absent means none, as saved before it
            return False
        del get(state, path[:-1])[path[-1]]
    elif kind == "shape":
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            extra = (
                value[:1]
                if len(value)
                else torch.zeros_like(value[:1].new_zeros((1, *value.shape[1:])))
            )
            put(state, path, torch.cat([value, extra]))
        elif isinstance(value, list) and value:
            if isinstance(value[0], torch.Tensor) and value[0].numel() == 0:
                return False  # another empty block of a table: the same table
            put(state, path, [*value, copy.deepcopy(value[0])])
        else:
            return False
    elif (free and kind != "nan") or any(p in NAN_OK for p in path if isinstance(p, str)):
        return False
    elif kind == "negative":
        if (isinstance(value, torch.Tensor) and value.dtype != torch.bool and value.numel()) or (
            isinstance(value, int | float) and not isinstance(value, bool)
        ):
            put(state, path, -value - 1)
        else:
            return False
    elif kind == "nan":
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            put(state, path, torch.full_like(value, math.nan))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            put(state, path, math.nan)
        else:
            return False
    elif kind in ("large", "off_by_one"):
        if key not in BOUNDED and kind == "large":
            return False
        if kind == "off_by_one" and not (
            key in ("next_id", "id", "position", "yielded")
            or (path in (("counters", 0), ("counters", 1)) and "next_id" in state)
        ):  # the sampler's counters: batches drawn (== next_id), rewarded (== history rows)
            return False
        step = 10**9 if kind == "large" else 1
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.numel():
            if value.dtype == torch.bool:
                return False
            put(state, path, value + step)
        elif isinstance(value, int) and not isinstance(value, bool):
            put(state, path, value + step)
        else:
            return False
    return True


def check_corruption(saved: dict, target_factory, path: tuple, kind: str) -> None:
    state = copy.deepcopy(saved)
    if not corrupt(state, path, kind):
        return
    target = target_factory()
    before = target.state_dict()
    message = None
    try:
        target.load_state_dict(state)
    except ValueError as e:
        message = str(e)
    if message is not None:
        assert key_of(path) in message, (path, kind, message)
        assert same(target.state_dict(), before), (path, kind)
        return
    assert same(target.state_dict(), saved), (path, kind, "accepted a corrupted state")


# ---------------------------------------------------------------------- the fuzz


SAMPLER_STATE = mid_run(make()).state_dict()
TRANSFORM_SAMPLER_STATE = mid_run(make(transform=True)).state_dict()


def sampler_target() -> GARSampler:
    return mid_run(make(), steps=2, ahead=0)


def transform_sampler_target() -> GARSampler:
    return mid_run(make(transform=True), steps=2, ahead=0)


def test_the_fuzzed_states_have_every_part():
    """The states fuzzed hold what is checked: undelivered, unrewarded and spent batches,
    queued updates, history rows."""
    for state in (SAMPLER_STATE, TRANSFORM_SAMPLER_STATE):
        assert state["window"]
        assert state["unrewarded"]
        assert len(state["spent"])
        assert len(state["lag"]["queued_ids"])
        assert sum(len(t) for t in state["history"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_corrupted_sampler_state_is_refused_by_key_or_loads_unchanged(data):
    with_tf = data.draw(st.booleans(), label="transform")
    saved = TRANSFORM_SAMPLER_STATE if with_tf else SAMPLER_STATE
    path = data.draw(st.sampled_from(leaves(saved)), label="path")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    check_corruption(saved, transform_sampler_target if with_tf else sampler_target, path, kind)


def transform_target() -> GARTransform:
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=3, learn_ops=True)
    tf.policy.update([1, 0, 1], [2, 0, 1], torch.tensor([0.5, -1.0, 0.25]))
    return tf


TRANSFORM_STATE = (lambda tf: (tf.policy.update([0, 1], [0, 2], torch.tensor([1.0, 0.0])), tf)[1])(
    transform_target()
).state_dict()


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(leaves(TRANSFORM_STATE)), kind=st.sampled_from(KINDS))
def test_a_corrupted_transform_state_is_refused_by_key_or_loads_unchanged(path, kind):
    check_corruption(TRANSFORM_STATE, transform_target, path, kind)


@pytest.mark.parametrize("path", leaves(SAMPLER_STATE), ids=str)
def test_every_sampler_field_refuses_a_wrong_type(path):
    """Every key once (the fuzz draws at random): "garbage" in its place is refused by name
    and changes nothing."""
    check_corruption(SAMPLER_STATE, sampler_target, path, "type")


# ---------------------------------------------------------------------- the examples


def refused(state: dict, match: str, target: GARSampler | None = None) -> GARSampler:
    target = target or sampler_target()
    before = target.state_dict()
    weights = dict(target.weights)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert same(target.state_dict(), before)
    assert target.weights == weights
    return target


def test_a_garbage_window_is_refused_before_the_weights_change():
    state = copy.deepcopy(SAMPLER_STATE)
    state["window"] = "garbage"
    refused(state, r"state\['window'\] should be a list of batch records, but got 'garbage'")


def test_a_negative_next_id_is_refused():
    state = copy.deepcopy(SAMPLER_STATE)
    state["next_id"] = -1
    refused(state, r"state\['next_id'\] should be an int >= 0, but got -1")


def test_a_position_past_the_epoch_is_refused():
    state = copy.deepcopy(SAMPLER_STATE)
    state["position"] = 10000
    refused(state, r"state\['position'\] should be an int in \[0, 6\], but got 10000")


def test_a_lag_without_its_policy_is_refused():
    state = copy.deepcopy(SAMPLER_STATE)
    del state["lag"]["policy"]
    refused(state, r"state\['lag'\] lacks the key 'policy'")


def test_negative_cursors_are_refused():
    state = copy.deepcopy(SAMPLER_STATE)
    state["cursors"] = [-3, 0, 0]
    refused(state, r"state\['cursors'\] should hold int >= 0s, but holds -3")
    state["cursors"] = [0, 0, 12]  # source c has 12 examples: 12 is past its end
    refused(state, r"state\['cursors'\] should hold each source's place")


def test_a_nan_in_the_queued_statistics_is_refused():
    state = copy.deepcopy(SAMPLER_STATE)
    state["lag"]["queued_sources"][0, 1] = math.nan
    refused(state, r"state\['lag'\]\['queued_sources'\]\[0\] should hold whole, non-negative")


@pytest.mark.parametrize(
    ("option", "saved", "mine", "match"),
    [
        ("lr", {}, {"lr": 0.9}, r"has lr=0.3, but this sampler has lr=0.9"),
        ("rule", {}, {"rule": "reinforce"}, r"has rule='exp_grad', but this sampler has rule='re"),
        ("floor", {}, {"floor": 0.2}, r"has floor=0.00333.*, but this sampler has floor=0.2"),
        ("normalize", {"normalize": "none"}, {}, r"has normalize='none', but this sampler has"),
        ("reward_window", {}, {"reward_window": 64}, r"reward_window=256, but this sampler has"),
        ("history_limit", {}, {"history_limit": None}, r"history_limit=1024, but this sampler"),
    ],
)
def test_a_state_saved_with_other_settings_is_refused_naming_both(option, saved, mine, match):
    state = mid_run(make(**saved)).state_dict()
    refused(state, match, mid_run(make(**mine), steps=2, ahead=0))


def test_a_default_state_loads_into_a_default_sampler():
    first = mid_run(make())
    state = first.state_dict()
    second = make()
    second.load_state_dict(state)
    assert same(second.state_dict(), state)
    assert second.weights == first.weights
    assert str(second.history) == str(first.history)  # NaN rewards compared as text


def test_a_transform_state_with_other_learning_flags_is_refused():
    state = transform_target().state_dict()
    tf = GARTransform(["Identity", "Rotate"], num_magnitude_bins=3)
    with pytest.raises(ValueError, match=r"\[True, False\], but this policy has \[False, False\]"):
        tf.load_state_dict(state)


def test_a_policy_state_with_another_lr_is_refused_and_changes_nothing():
    state = CategoricalPolicy(3, lr=0.3).state_dict()
    policy = CategoricalPolicy(3, lr=0.9)
    before = policy.state_dict()
    with pytest.raises(ValueError, match=r"has lr=0.3, but this policy has lr=0.9"):
        policy.load_state_dict(state)
    assert same(policy.state_dict(), before)


def test_source_names_that_collide_after_str_are_refused():
    data = {1: torch.arange(4), "1": torch.arange(4), "b": torch.arange(4)}
    with pytest.raises(
        ValueError, match=r"source names should be distinct after str\(\), but 1 and '1' are both"
    ):
        GARSampler(data, batch_size=2)
    with pytest.raises(ValueError, match=r"weights names unknown source\(s\) \[1\]"):
        GARSampler({"1": torch.arange(4), "b": torch.arange(4)}, batch_size=2, weights={1: 1.0})


def test_policy_names_that_collide_after_str_are_refused():
    with pytest.raises(ValueError, match=r"names should be distinct after str\(\), but 1 and '1'"):
        CategoricalPolicy(2, names=[1, "1"])


def test_the_history_is_bounded_by_default():
    """6,000 updates of 1,000 sources: 48 MB of history unbounded; bounded by default at
    history_limit=1024 rows of (K + 1) float64 (8 MB), spread over the whole run."""
    data = {str(i): torch.arange(2) for i in range(1000)}
    s = GARSampler(data, batch_size=2, num_batches=10**6, history_limit=16)
    assert GARSampler(data, batch_size=2).state_dict()["history_limit"] == 1024  # the default
    it = iter(s.track(s))
    for _ in range(200):
        next(it)
        s.update(torch.ones(2))
    held = sum(t.numel() * t.element_size() for t in s.state_dict()["history"])
    assert held <= 16 * 1001 * 8
    history = s.history
    assert history[0]["batch"] is None
    assert 8 <= len(history) - 1 <= 16
    every = s.state_dict()["history_every"]
    assert [h["batch"] for h in history[1:]] == list(range(every - 1, 200, every))
    with pytest.raises(
        ValueError,
        match=r"history_limit should be an integer >= 2 or None, but got history_limit=1",
    ):
        GARSampler(data, batch_size=2, history_limit=1)
