"""History: the append-only table of policy weights behind ``sampler.history``/``tf.history``."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_data.policy._history import History


def filled(n: int, width: int = 3, block: int = 4) -> History:
    h = History(width, block=block)
    for i in range(n):
        h.append([i, 1.0 / (i + 3), -(i**0.5)])
    return h


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 11])
def test_rows_round_trip_exactly_across_block_boundaries(n):
    h = filled(n)
    assert len(h) == n
    expected = [[float(i), 1.0 / (i + 3), -(i**0.5)] for i in range(n)]
    assert h.rows() == expected  # float64 throughout: exact
    back = History(3, block=4)
    back.load(h.state())
    assert back.rows() == expected
    back.append([99, 0.5, 0.25])  # the loaded history goes on appending
    assert back.rows() == [*expected, [99.0, 0.5, 0.25]]


def test_states_share_the_full_blocks_and_later_appends_do_not_change_a_state():
    """What keeps state_dict() cheap in a long run: full blocks are frozen and shared, only the
    last partial block is converted per call."""
    h = filled(10)
    first = h.state()
    assert [len(t) for t in first] == [4, 4, 2]
    h.append([10, 0.0, 0.0])
    second = h.state()
    assert second[0] is first[0]
    assert second[1] is first[1]
    assert [len(t) for t in first] == [4, 4, 2]  # the earlier state is unchanged
    assert len(second[2]) == 3


def test_bad_rows_and_states_raise():
    h = History(3)
    with pytest.raises(ValueError, match=r"should hold 3 numbers, got 2"):
        h.append([1.0, 2.0])
    with pytest.raises(ValueError, match=r"list of float64 Tensors \[n, 3\], but got dict"):
        h.load({})
    with pytest.raises(ValueError, match=r"but got list"):
        h.load([torch.zeros(2, 4, dtype=torch.float64)])


def test_sampler_history_survives_a_resume_past_several_blocks():
    from adaptive_data import GARSampler

    data = {"a": torch.arange(40), "b": torch.arange(30)}
    s = GARSampler(data, batch_size=4, seed=0, num_batches=1000)
    g = torch.Generator().manual_seed(0)
    it = iter(s.track(s))
    for _ in range(600):  # past two blocks of 256
        next(it)
        s.update(torch.randn(4, generator=g))
    state = s.state_dict()
    t = GARSampler(data, batch_size=4, seed=0, num_batches=1000)
    t.load_state_dict(state)
    # The batches and weights resume; each update's rewards are not in the state (NaN).
    assert [(e["batch"], e["weights"]) for e in t.history] == [
        (e["batch"], e["weights"]) for e in s.history
    ]
    assert all(math.isnan(v) for e in t.history for v in e["rewards"].values())
    assert len(t.history) == 601  # the initial weights, then one entry per update
