"""History: the append-only table of policy weights behind ``sampler.history``/``tf.history``."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"list of float64 Tensors \[n, 3\], but got \{\}"):
        h.load({})
    with pytest.raises(ValueError, match=r"list of float64 Tensors \[n, 3\], but got \[tensor"):
        h.load([torch.zeros(2, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"holds 2 rows, but the state counts 5 updates"):
        h.load([torch.zeros(2, 3, dtype=torch.float64)], seen=5, every=1)
    assert len(h) == 0  # every refusal left it as it was


@pytest.mark.parametrize("limit", [2, 3, 4, 7, 10])
@pytest.mark.parametrize("n", [0, 1, 5, 11, 40, 129])
def test_a_bounded_history_keeps_evenly_spread_updates_within_its_limit(limit, n):
    """With limit=L the table holds the rows of updates every, 2 * every, ... (every a power
    of two), never more than L rows: the oracle is the unbounded table's rows at those
    updates."""
    full = filled(n)
    h = History(3, block=4, limit=limit)
    for i in range(n):
        h.append([i, 1.0 / (i + 3), -(i**0.5)])
        assert len(h) <= limit
        assert len(h) == (i + 1) // h.every
    assert h.every & (h.every - 1) == 0  # a power of two
    assert h.rows() == full.rows()[h.every - 1 :: h.every]
    if n >= limit:
        assert len(h) > limit // 2 - 1  # thinned by halving only: at least half the limit
    back = History(3, block=4, limit=limit)
    back.load(h.state(), seen=n, every=h.every)
    assert back.rows() == h.rows()
    back.append([n, 0.0, 0.0])
    h.append([n, 0.0, 0.0])
    assert back.rows() == h.rows()


def test_a_state_saved_without_a_bound_is_thinned_to_the_limit_on_load():
    full = filled(37)
    h = History(3, block=4, limit=8)
    h.load(full.state(), seen=37, every=None)  # every=None: one row per update, as before
    assert h.every == 8
    assert h.rows() == full.rows()[7::8]
    with pytest.raises(ValueError, match=r"holds 37 rows, more than this history's limit=8"):
        History(3, block=4, limit=8).load(full.state(), seen=37, every=1)


def test_a_bounded_history_holds_its_stated_memory_in_a_long_run():
    """The memory stated in the docs: at most limit * width * 8 bytes of rows, whatever the
    number of updates (here 1,000 sources, 6,000 updates: 48 MB unbounded)."""
    width = 1001
    h = History(width, limit=64)
    row = [0.0] * width
    for _ in range(6000):
        h.append(row)
    held = sum(t.numel() * t.element_size() for t in h.state())
    assert len(h) <= 64
    assert held <= 64 * width * 8


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
    # The batches, weights and each update's rewards resume (NaN compared as text).
    assert [(e["batch"], e["weights"], str(e["rewards"])) for e in t.history] == [
        (e["batch"], e["weights"], str(e["rewards"])) for e in s.history
    ]
    assert len(t.history) == 601  # the initial weights, then one entry per update
