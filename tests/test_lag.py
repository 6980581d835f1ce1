"""The policy lag: the same seed draws the same batches and ends with the same weights whatever
the loader reads ahead (workers, prefetch), the update schedule, breaks and resumes, or a
clear error. Rewards come from the batches' content, so a batch drawn from another policy
changes every later batch and the weights."""

from __future__ import annotations

import contextlib
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data import GARSampler
from adaptive_data.policy._categorical import CategoricalPolicy
from adaptive_data.sampling._lag import DEFAULT_LAG, LaggedPolicies, UpdateStatistics, lag_needed

from .test_sampler import make, reward_of

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")


class ReadAhead:
    """A loader that draws ``ahead`` batches beyond the one it delivers, in this process: a
    DataLoader with ``num_workers * prefetch_factor == ahead`` draws that many when a pass
    starts and one more before each batch it hands out."""

    def __init__(self, sampler: GARSampler, ahead: int) -> None:
        self.sampler, self.ahead = sampler, ahead

    def __iter__(self):
        it = iter(self.sampler)
        buf: deque = deque()

        def pull() -> None:
            with contextlib.suppress(StopIteration):
                buf.append(next(it))

        for _ in range(self.ahead):  # at iter(), as DataLoader workers start prefetching
            pull()

        def deliver():
            while True:
                pull()
                if not buf:
                    return
                yield self.sampler.decode(buf.popleft())

        return deliver()


def loop(
    s: GARSampler,
    loader,
    epochs: int = 2,
    every: int = 1,
    delay: int = 0,
    stop: int | None = None,
    waiting: deque | None = None,
    limit: int | None = None,
) -> list[list[int]]:
    """The user's loop: the rewards of every ``every``-th batch of an epoch reach ``update``
    ``delay`` deliveries after the batch (``update(r, batch=id)``); ``stop`` breaks out of
    the first epoch after its batch ``stop``; ``limit`` ends the run after that many batches,
    leaving the rewards still waiting in ``waiting``."""
    seen: list[list[int]] = []
    waiting = deque() if waiting is None else waiting
    for e in range(epochs):
        for t, (sid, idx) in enumerate(loader):
            seen.append((sid * 100 + idx).tolist())
            if t % every == 0:
                waiting.append((len(seen) - 1, s.last_batch, reward_of(sid, idx)))
            while waiting and waiting[0][0] + delay <= len(seen) - 1:
                _, bid, r = waiting.popleft()
                s.update(r, batch=bid)
            if (stop is not None and e == 0 and t == stop) or len(seen) == limit:
                break
        if len(seen) == limit:
            break
    return seen


def outcome(s: GARSampler, seen: list[list[int]]) -> tuple:
    return seen, s.policy.state_dict()["logits"].tolist(), s.metrics()["batches_drawn"]


def run(ahead: int, **kw) -> tuple:
    lag = kw.pop("lag", DEFAULT_LAG)
    s = make(seed=kw.pop("seed", 0), lag=lag)
    return outcome(s, loop(s, s.track(ReadAhead(s, ahead)), **kw))


@settings(max_examples=30, deadline=None)
@given(
    ahead=st.integers(0, 6),
    every=st.integers(1, 3),
    delay=st.integers(0, 1),
    stop=st.one_of(st.none(), st.integers(0, 6)),
    seed=st.integers(0, 2**20),
)
def test_same_batches_and_weights_whatever_the_loader_reads_ahead(ahead, every, delay, stop, seed):
    kw = {"every": every, "delay": delay, "stop": stop, "seed": seed, "epochs": 3}
    assert run(ahead, **kw) == run(0, **kw)


@settings(max_examples=15, deadline=None)
@given(ahead=st.integers(0, 5), delay=st.integers(0, 2), extra=st.integers(0, 3))
def test_any_lag_that_covers_the_loader_gives_the_in_process_run(ahead, delay, extra):
    lag = lag_needed(ahead, delay) + extra
    assert run(ahead, lag=lag, delay=delay) == run(0, lag=lag, delay=delay)


def test_the_lag_changes_the_draws():
    """Not a no-op: another lag draws other batches once updates start to count."""
    assert run(0, lag=1)[0] != run(0, lag=DEFAULT_LAG)[0]


def test_a_late_update_raises_and_names_the_lag_it_needs():
    s = make(lag=4)
    loader = s.track(ReadAhead(s, 3))  # needs 3 + 1 + 1 = 5 with rewards one batch late
    with pytest.raises(RuntimeError, match=r"batch 0 arrived after batch 4 was drawn.*lag=5\)"):
        loop(s, loader, delay=1)
    assert s.metrics()["updates"] == 0  # nothing applied


def test_a_loader_that_reads_too_far_ahead_is_refused_at_its_first_batch():
    s = make(lag=4)
    s.reward_delay = 1
    it = iter(s.track(ReadAhead(s, 3)))
    with pytest.raises(ValueError, match=r"lag=4 is too small.*drawn 3 batch.*GARSampler\(lag=5\)"):
        next(it)
    s = make(lag=5)
    s.reward_delay = 1
    assert len(loop(s, s.track(ReadAhead(s, 3)), delay=1)) == 2 * len(s)


def test_gar_tells_the_sampler_its_reward_delay():
    """GAR with the next batch as reference rewards each batch one delivery later: a
    DataLoader whose 2 workers prefetch 4 batches each needs lag 10, and an explicit lag=8
    is refused when the pass starts."""
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    s = GARSampler(data, batch_size=4, seed=0, lag=8)
    ad.GAR(nn.Linear(3, 2), s)
    assert s.reward_delay == 1
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2, prefetch_factor=4))
    with pytest.raises(ValueError, match=r"lag=8 is too small.*GARSampler\(lag=10\)"):
        iter(loader)
    held_out = GARSampler(data, batch_size=4, seed=0)
    ref = ad.ReferenceBatches(data, batch_size=4, seed=0)
    ad.GAR(nn.Linear(3, 2), held_out, reference=ref, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    assert held_out.reward_delay == 0


def test_reward_delay_is_checked():
    s = make()
    assert s.reward_delay is None
    with pytest.raises(ValueError, match=r"reward_delay should be None or an int >= 0"):
        s.reward_delay = -1
    with pytest.raises(
        ValueError, match=r"lag should be a positive integer value or None, but got lag=0"
    ):
        make(lag=0)


@pytest.mark.parametrize("ahead", [2, 5])
def test_a_break_does_not_shift_what_follows(ahead):
    """The batches a loader read ahead before a break never reached the loop: they are
    drawn again, with the same ids, so the next epoch is the in-process run's."""
    s = make()
    seen = loop(s, s.track(ReadAhead(s, ahead)), stop=1, epochs=2)
    ref = make()
    assert seen == loop(ref, ref.track(ReadAhead(ref, 0)), stop=1, epochs=2)
    assert s.last_batch == ref.last_batch
    assert s.metrics()["batches_drawn"] == ref.metrics()["batches_drawn"]


@pytest.mark.parametrize(("before", "after"), [(4, 0), (0, 4), (2, 6)])
def test_resume_with_another_read_ahead_is_exact(before, after):
    """A state saved under one loader resumes exactly under another (what resuming with
    another num_workers does), rewards still waiting included: the same batches and, at the
    same point, the same weights as the uninterrupted in-process run."""
    full = make()
    want = loop(full, full.track(ReadAhead(full, 0)), delay=1)
    cut = len(full) + 3  # three batches into the second epoch
    first = make()
    waiting: deque = deque()
    seen = loop(first, first.track(ReadAhead(first, before)), delay=1, waiting=waiting, limit=cut)
    second = make()
    second.load_state_dict(first.state_dict())
    tail = deque((i - cut, bid, r) for i, bid, r in waiting)  # delivery indices of the new run
    more = loop(second, second.track(ReadAhead(second, after)), delay=1, waiting=tail, epochs=1)
    assert seen + more == want
    assert second.policy.state_dict()["logits"].tolist() == (
        full.policy.state_dict()["logits"].tolist()
    )


def test_weights_show_every_update_received():
    """sampler.weights is the live policy: it moves at once, while the draws wait for the lag."""
    s = make(lag=3)
    it = iter(s.track(ReadAhead(s, 0)))
    before = dict(s.weights)
    sid, idx = next(it)
    s.update(reward_of(sid, idx))
    assert s.weights != before


@pytest.mark.parametrize(
    ("workers", "prefetch"),
    [
        (1, 2),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(2, 3, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("delay", [0, 1])
def test_dataloader_workers_draw_the_in_process_batches(workers, prefetch, delay):
    """The README's claim for an explicit lag, with real worker processes: updates every
    batch, rewards from the content, num_workers 0 against num_workers > 0."""
    out = []
    for w in (0, workers):
        s = make(lag=10)
        kw = {"num_workers": w} if not w else {"num_workers": w, "prefetch_factor": prefetch}
        loader = s.track(DataLoader(s.dataset, batch_sampler=s, **kw))
        out.append(outcome(s, loop(s, loader, delay=delay, stop=2, epochs=3)))
    assert out[0] == out[1]


def test_lagged_policies_state_round_trip():
    live = CategoricalPolicy(3, lr=0.5)
    lagged = LaggedPolicies(2, live)
    stats = live.statistics(torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 0.0, -1.0, 2.0]))
    lagged.queue(5, UpdateStatistics(stats))
    lagged.queue(4, UpdateStatistics(stats))
    copy = LaggedPolicies(2, live)
    copy.load_state_dict(lagged.state_dict())
    assert len(copy) == 2
    copy.catch_up(6)  # applies batch 4's update only
    lagged.catch_up(6)
    assert len(copy) == len(lagged) == 1
    assert copy.policy.probs_list() == lagged.policy.probs_list() != live.probs_list()
    with pytest.raises(ValueError, match=r"state has lag=2, but this sampler has lag=3"):
        LaggedPolicies(3, live).load_state_dict(lagged.state_dict())


def test_state_with_another_lag_is_refused():
    s = make(lag=3)
    with pytest.raises(ValueError, match=r"state has lag=3, but this sampler has lag=4"):
        make(lag=4).load_state_dict(s.state_dict())


def test_resume_with_another_num_workers_from_the_sampler_state():
    """Saved under 2 real workers mid-epoch, resumed under none with a fresh DataLoader and the
    sampler's own state: the same batches and weights as the uninterrupted run under none."""
    full = make()
    want = loop(full, full.track(DataLoader(full.dataset, batch_sampler=full)), delay=1)
    cut = len(full) + 2
    first = make()
    waiting: deque = deque()
    two = first.track(DataLoader(first.dataset, batch_sampler=first, num_workers=2))
    seen = loop(first, two, delay=1, waiting=waiting, limit=cut)
    state = first.state_dict()
    del two
    second = make()
    second.load_state_dict(state)
    tail = deque((i - cut, bid, r) for i, bid, r in waiting)
    none = second.track(DataLoader(second.dataset, batch_sampler=second))
    assert seen + loop(second, none, delay=1, waiting=tail, epochs=1) == want
    assert second.policy.state_dict()["logits"].tolist() == (
        full.policy.state_dict()["logits"].tolist()
    )


def test_a_policy_loaded_from_outside_is_drawn_from_at_the_next_batch():
    """Setting the live policy directly (a baseline that computes its own weights) reaches
    the draws at the next batch instead of waiting for the next pass."""
    s = make(lag=4)
    it = iter(s.track(ReadAhead(s, 0)))
    next(it)
    state = s.policy.state_dict()
    state["logits"] = torch.tensor([0.0, -50.0, -50.0], dtype=torch.float64)  # all on source 0
    s.policy.load_state_dict(state)
    counts = torch.zeros(3)
    for _ in range(3):
        sid, _ = next(it)
        counts += torch.bincount(sid, minlength=3)
    assert counts[0] >= 14  # of 15: only the floor's share elsewhere


def test_drawing_weights_trail_the_live_weights_by_the_lag():
    s = make(lag=3)
    it = iter(s.track(ReadAhead(s, 0)))
    start = s.drawing_weights
    live = []
    for t in range(5):
        sid, idx = next(it)  # batch t, drawn from the updates of batches <= t - 3
        s.update(reward_of(sid, idx))
        live.append(dict(s.weights))
        # the next batch, t + 1, is drawn from the live weights after the update of t + 1 - 3
        assert s.drawing_weights == (start if t + 1 - 3 < 0 else live[t + 1 - 3])
    assert live[0] != start


@pytest.mark.parametrize("ahead", [0, 3])
def test_a_pass_abandoned_before_its_first_batch_leaves_no_trace(ahead):
    """A loop that calls iter() and drops it (a trainer checking its loader) has, with
    workers, made the sampler draw batches; without workers nothing. Either way the run that
    follows is the in-process run without the abandoned pass, its epoch number included."""
    s = make()
    loader = s.track(ReadAhead(s, ahead))
    iter(loader)  # prefetches `ahead` batches, delivers none
    seen = loop(s, loader, epochs=2)
    ref = make()
    assert seen == loop(ref, ref.track(ReadAhead(ref, 0)), epochs=2)
    assert s.metrics()["epoch"] == ref.metrics()["epoch"] == 1


# ---------------------------------------------------------------- the lag fitted to the loader


@pytest.mark.parametrize(
    ("workers", "prefetch", "delay", "lag"),
    [
        (0, 2, None, 8),
        (2, 2, 0, 8),
        (4, 2, 0, 10),
        (4, 2, 1, 11),
        (8, 4, None, 35),
        (16, 8, 0, 130),
    ],
)
def test_the_default_lag_fits_the_loader_when_its_pass_starts(workers, prefetch, delay, lag):
    """lag=None: 8, or num_workers * prefetch_factor + one wrapper's read-ahead + the reward
    delay (1 while unknown) + 1, from the loader's public settings, before anything is drawn;
    the reward window grows to hold what such a loader draws ahead."""
    s = make()
    if delay is not None:
        s.reward_delay = delay
    kw = {"num_workers": workers, "prefetch_factor": prefetch} if workers else {}
    iter(s.track(DataLoader(s.dataset, batch_sampler=s, **kw)))
    assert s.lag == lag
    assert s.reward_window >= max(256, workers * prefetch + 3)


def test_a_fitted_lag_grows_for_a_loader_that_reads_further_than_it_says():
    """A loader whose settings do not tell its read-ahead (here 12 batches, in process) gets a
    larger lag at its first delivery, or at a late update, instead of a refusal; an explicit
    lag refuses the same loader."""
    s = make(num_batches=30)
    s.reward_delay = 1
    seen = loop(s, s.track(ReadAhead(s, 12)), delay=1)
    assert s.lag == lag_needed(12, 1)
    assert len(seen) == 2 * len(s)
    assert s.metrics()["updates"] == len(seen) - 1
    s = make(num_batches=30)  # no rewarder announced the delay: a late update raises the lag
    seen = loop(s, s.track(ReadAhead(s, 12)), delay=2)
    assert s.lag == lag_needed(12, 2)
    assert s.metrics()["updates"] == len(seen) - 2  # the last two wait for more batches
    fixed = make(lag=8, num_batches=30)
    with pytest.raises(RuntimeError, match=r"arrived after batch 8 was drawn.*lag=None"):
        loop(fixed, fixed.track(ReadAhead(fixed, 12)), delay=2)


def test_a_fitted_lag_is_restored_and_refit_by_the_next_pass():
    """The state holds the pass's lag: a fitted sampler resumes with it, and under the same
    loader continues the uninterrupted run exactly; an explicit lag refuses another one."""
    full = make(num_batches=30)
    full.reward_delay = 1
    want = loop(full, full.track(ReadAhead(full, 12)), delay=1)
    cut = 30 + 3  # three batches into the second epoch
    first = make(num_batches=30)
    first.reward_delay = 1
    waiting: deque = deque()
    seen = loop(first, first.track(ReadAhead(first, 12)), delay=1, waiting=waiting, limit=cut)
    state = first.state_dict()
    assert first.lag == lag_needed(12, 1)
    second = make(num_batches=30)
    second.reward_delay = 1
    second.load_state_dict(state)
    assert second.lag == first.lag
    tail = deque((i - cut, bid, r) for i, bid, r in waiting)
    more = loop(second, second.track(ReadAhead(second, 12)), delay=1, waiting=tail, epochs=1)
    assert seen + more == want
    assert second.policy.state_dict()["logits"].tolist() == (
        full.policy.state_dict()["logits"].tolist()
    )
    with pytest.raises(ValueError, match=r"state has lag=14, but this sampler has lag=8"):
        make(lag=8, num_batches=30).load_state_dict(state)


@pytest.mark.parametrize(
    ("workers", "prefetch"),
    [
        (2, 4),
        pytest.param(4, 2, marks=pytest.mark.slow),
        pytest.param(8, 2, marks=pytest.mark.slow),
        pytest.param(4, 4, marks=pytest.mark.slow),
        pytest.param(8, 4, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("reference", ["held-out", "next batch"])
def test_default_gar_runs_and_learns_with_the_loaders_users_run(workers, prefetch, reference):
    """Every default, a real DataLoader with worker processes, GAR in the loop: no refusal,
    and the mixture moves to the source whose content the loss rewards (the clean one)."""
    torch.manual_seed(0)
    n = 256
    x = torch.randn(n, 2)
    y = (x[:, 0] > 0).long()
    clean = TensorDataset(x, y)
    noisy = TensorDataset(torch.randn(n, 2), torch.randint(0, 2, (n,)))
    if reference == "held-out":
        s = GARSampler({"clean": clean, "noisy": noisy}, batch_size=16, seed=0, lr=0.5)
        ref = ad.ReferenceBatches(clean, batch_size=32, seed=1)
        kw = {"reference": ref, "loss_fn": nn.CrossEntropyLoss(reduction="none")}
    else:
        s = GARSampler(clean, batch_size=16, seed=0)
        kw = {}
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gar = ad.GAR(model, s, optimizer=opt, **kw)
    loader = s.track(
        DataLoader(s.dataset, batch_sampler=s, num_workers=workers, prefetch_factor=prefetch)
    )
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            gar.step()
            opt.step()
    assert gar.metrics()["batches_rewarded"] > 0
    assert s.lag >= lag_needed(workers * prefetch, s.reward_delay)
    if reference == "held-out":
        assert s.weights["clean"] > 0.8
