"""GAR's state: every field checked before anything is applied.

A corrupted state either raises, naming the key, with the GAR left exactly as it was, or
loads to a GAR that holds what the state says (its ``state_dict()`` equals the state given).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

import adaptive_data as ad

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(scope="module")
def trained():
    """A GAR (held-out, default budget, a reference reused for 4 steps) after 21 steps, and
    its state."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from reference_choice import teacher_task
    finally:
        sys.path.pop(0)
    sources, target = teacher_task(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ad.GARSampler(sources, batch_size=32, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(target, batch_size=64, seed=0)
    gar = ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=LOSS, reference_refresh=4)
    for i, (x, y) in enumerate(loader):
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        gar.step()
        opt.step()
        if i == 20:
            break
    return gar, gar.state_dict()


def paths(state: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a state: its keys, and the entries of its dicts and lists."""
    out = []
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, list)
        else ()
    )
    for k, v in items:
        out.append((*prefix, k))
        out += paths(v, (*prefix, k))
    return out


def same(a: Any, b: Any) -> bool:
    """Equal states (tensors by value, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return a == b if numbers else type(a) is type(b) and a == b


def corruptions(value: Any) -> list[Any]:
    """Values a corrupted or hand-edited state might hold in place of ``value``."""
    out: list[Any] = ["garbage", None, -1, -2.5, math.nan, math.inf, True, 10**12, [], {}]
    if isinstance(value, torch.Tensor):
        out += [
            torch.full_like(value, math.nan),
            torch.full_like(value, math.inf),
            value.flatten()[:1].clone(),
            value.long(),
        ]
    return out


SETTINGS = ("version", "mode", "every", "reward", "reference_refresh", "rows", "estimator")
NAMELESS = {"version"}  # refused as "not a GAR state" rather than by name
# Keys absent from states saved before they existed (their default is loaded).
OPTIONAL = {"dropped_by", "seconds", "estimator", "budget_state"}


def key_named(path: tuple) -> str:
    """The name a refusal should give: the innermost key of ``path`` that is a name."""
    return next(str(k) for k in reversed(path) if isinstance(k, str))


def set_at(state: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(state)
    here = out
    for k in path[:-1]:
        here = here[k]
    if value is _DELETE:
        del here[path[-1]]
    else:
        here[path[-1]] = value
    return out


# Keys a budget state saved before update(weight=) lacks: they load as their defaults.
OPTIONAL_NESTED = {("budget_state", "last_kept"), ("budget_state", "stride")}

_DELETE = object()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_corrupted_state_raises_naming_the_key_and_changes_nothing(trained, data):
    gar, original = trained
    path = data.draw(st.sampled_from(paths(original)))
    here: Any = original
    for k in path:
        here = here[k]
    choices = [*corruptions(here)]
    if isinstance(path[-1], str):
        choices.append(_DELETE)
    value = data.draw(st.sampled_from(choices))
    corrupted = set_at(original, path, value)
    before = gar.state_dict()
    try:
        gar.load_state_dict(corrupted)
    except (ValueError, TypeError) as error:
        assert same(gar.state_dict(), before), f"{path} = {value!r} half-loaded"
        message = str(error)
        if path[0] not in NAMELESS:
            assert key_named(path) in message or str(path[0]) in message, (path, message)
        return
    # Accepted: the GAR holds what the state says.
    try:
        held = gar.state_dict()
        if value is _DELETE and tuple(path) in OPTIONAL_NESTED:
            held[path[0]].pop(path[1])
        elif value is _DELETE and path[0] in OPTIONAL:
            held.pop(path[0])  # a state saved before the key existed: its default
        assert same(held, corrupted), f"{path} = {value!r} loaded as something else"
    finally:
        gar.load_state_dict(original)


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("reference_gradient", "0.weight"), "nan", r"reference_gradient\['0.weight'\].*NaN"),
        (("steps",), -1, r"steps should be a non-negative int"),
        (("last_mean",), math.inf, r"last_mean should be a finite number"),
        (("skipped_nonfinite",), 10**6, r"skipped_nonfinite=1000000 steps skipped"),
        (("reference_step",), 99, r"reference_step should be an int in \[0, steps=21\]"),
        (("seconds",), [0.0, 1.0], r"seconds should be \[seconds in step\(\)"),
        (("reference", "cursor"), 10**6, r"invalid position"),
        (("budget_state", "kept"), -3, r"budget\['kept'\]"),
        (("dropped_by",), {"no_backward": 1}, r"dropped_by should map each of"),
    ],
)
def test_states_that_lie_are_refused(trained, path, value, match):
    """The lies the issue names: a NaN reference gradient (its rewards would be NaN and
    dropped while counted as rewarded), counters out of range, a position past the
    stream."""
    gar, original = trained
    if value == "nan":
        value = torch.full_like(original["reference_gradient"]["0.weight"], math.nan)
    before = gar.state_dict()
    with pytest.raises(ValueError, match=match):
        gar.load_state_dict(set_at(original, path, value))
    assert same(gar.state_dict(), before)


def test_a_state_loads_into_its_gar_unchanged(trained):
    gar, original = trained
    gar.load_state_dict(original)
    assert same(gar.state_dict(), original)


def test_check_state_refuses_as_load_does_and_changes_nothing(trained):
    gar, original = trained
    gar.check_state(original)
    bad = set_at(original, ("reference", "cursor"), 10**6)
    before = gar.state_dict()
    with pytest.raises(ValueError, match=r"state's reference .* was refused: .*invalid position"):
        gar.check_state(bad)
    assert same(gar.state_dict(), before)


def test_an_integration_state_with_a_refused_gar_part_leaves_the_sampler_as_it_was(trained):
    """The Trainer's and Lightning's state holds the sampler's and GAR's: GAR's is checked
    before the sampler's is applied, so a refused one changes neither."""
    from adaptive_data.integrations._common import Wiring

    gar, _ = trained
    wiring = Wiring(gar.sampler, gar, None, None, "")
    state = wiring.state_dict()
    s = gar.sampler
    fresh = ad.GARSampler(dict(zip(s.names, s.dataset.sources, strict=True)), 32, seed=0)
    state["sampler"] = fresh.state_dict()  # a valid state, of another position and weights
    state["gar"] = set_at(state["gar"], ("steps",), -1)
    sampler_before = gar.sampler.state_dict()
    with pytest.raises(ValueError, match=r"steps should be a non-negative int"):
        wiring.load_state_dict(state)
    assert same(gar.sampler.state_dict(), sampler_before)
