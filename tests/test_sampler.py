"""GARSampler: keys, exact reward attribution through DataLoaders, reproducibility, resume."""

from __future__ import annotations

import math
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from adaptive_data.policy._categorical import CategoricalPolicy
from adaptive_data.sampling._sampler import GARSampler, MixtureDataset

# Every example is (source id, index in source): the data itself says where it came from, so
# a reward computed from it exposes any misattribution.
SIZES = {"a": 23, "b": 17, "c": 11}


def tagged(sid: int, n: int) -> TensorDataset:
    return TensorDataset(torch.full((n,), sid, dtype=torch.long), torch.arange(n))


def sources() -> dict[str, TensorDataset]:
    return {name: tagged(i, n) for i, (name, n) in enumerate(SIZES.items())}


def reward_of(sid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Depends on the source and on the position, so a batch with the same sources in another
    # order, or another batch, gives a different update.
    return (sid == 0).float() - 0.5 * (sid == 2).float() + 0.03 * idx.float()


def make(**kw) -> GARSampler:
    args = {"batch_size": 5, "seed": 0, "lr": 0.7}
    args.update(kw)
    return GARSampler(sources(), **args)


class Oracle:
    """Replays the updates from the batches' content on a fresh policy."""

    def __init__(self, sampler: GARSampler) -> None:
        p = sampler.policy
        self.policy = CategoricalPolicy(
            p.num_choices,
            floor=p.floor,
            lr=p.lr,
            rule=p.rule,
            normalize=p.normalize,
            momentum=p.momentum,
        )
        self.policy.load_state_dict(p.state_dict())

    def update(self, sid: torch.Tensor, idx: torch.Tensor) -> None:
        self.policy.update(sid, reward_of(sid, idx).double())


def train(
    sampler: GARSampler,
    loader,
    epochs: int = 2,
    k: int = 1,
    stop: int | None = None,
    delayed: bool = False,
    oracle: Oracle | None = None,
) -> list[list[int]]:
    """The user's loop: update every k-th batch (or the previous batch's, delayed)."""
    seen: list[list[int]] = []
    pending = None
    for _ in range(epochs):
        for t, (sid, idx) in enumerate(loader):
            seen.append((sid * 100 + idx).tolist())
            if delayed:
                if pending is not None:
                    sampler.update(reward_of(*pending[1]), batch=pending[0])
                    if oracle:
                        oracle.update(*pending[1])
                pending = (sampler.last_batch, (sid, idx))
            elif t % k == 0:
                sampler.update(reward_of(sid, idx))
                if oracle:
                    oracle.update(sid, idx)
            if stop is not None and t == stop:
                break
    return seen


# ------------------------------------------------------------------ keys


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch=st.integers(1, 7),
    seed=st.integers(0, 2**31),
    weights=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    nb=st.integers(1, 12),
)
def test_keys_in_range_and_without_replacement(sizes, batch, seed, weights, nb):
    w = weights[: len(sizes)]
    if sum(w) == 0:
        w[0] = 1.0
    srcs = [tagged(i, n) for i, n in enumerate(sizes)]
    s = GARSampler(srcs, batch_size=batch, seed=seed, weights=w, num_batches=nb)
    drawn: dict[int, list[int]] = {i: [] for i in range(len(sizes))}
    batches = list(s)
    assert len(batches) == nb
    for keys in batches:
        assert len(keys) == batch
        assert all(0 <= k < sum(sizes) for k in keys)
        src, idx = s.decode(keys)
        for a, b in zip(src.tolist(), idx.tolist(), strict=True):
            drawn[a].append(b)
    for i, n in enumerate(sizes):  # each pass over a source is a permutation of it
        seq = drawn[i]
        for start in range(0, len(seq) - n + 1, n):
            assert sorted(seq[start : start + n]) == list(range(n))


def test_dataset_returns_examples_unchanged_and_uses_getitems():
    calls = []

    class Counted(TensorDataset):
        def __getitems__(self, idx):
            calls.append(list(idx))
            return [self[i] for i in idx]

    ds = MixtureDataset([tagged(0, 4), Counted(torch.arange(10, 13), torch.arange(3))], ["x", "y"])
    assert len(ds) == 7
    assert ds[5][0] == 11
    out = ds.__getitems__([6, 0, 4, 3])
    assert [o[0].item() for o in out] == [12, 0, 10, 0]
    assert calls == [[2, 0]]
    with pytest.raises(IndexError, match=r"key should lie in \[0, 7\), but got key=7"):
        ds[7]


def test_len_and_epochs():
    s = make()
    assert len(s) == sum(SIZES.values()) // 5
    assert len(list(s)) == len(s)
    assert len(list(s)) == len(s)
    assert s.metrics()["epoch"] == 1
    s.set_epoch(7)
    list(s)
    assert s.metrics()["epoch"] == 7
    assert len(make(num_batches=3)) == 3


# ------------------------------------------------------------------ attribution

LOADER_CASES = [
    # num_workers, prefetch_factor, persistent, k, stop (break after batch `stop`)
    (0, None, False, 1, None),
    (0, None, False, 3, 4),
    (1, 4, False, 1, None),
    (2, 2, True, 2, 3),
    (2, 4, False, 1, 5),
    (2, 4, True, 3, None),
]


@pytest.mark.parametrize(("workers", "prefetch", "persistent", "k", "stop"), LOADER_CASES)
def test_update_attributes_to_the_batch_just_received(workers, prefetch, persistent, k, stop):
    s = make(lag=max(8, workers * (prefetch or 0) + 1))  # the lag this read-ahead needs
    kw = {"num_workers": workers}
    if workers:
        kw.update(prefetch_factor=prefetch, persistent_workers=persistent)
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, **kw))
    oracle = Oracle(s)
    train(s, loader, epochs=3, k=k, stop=stop, oracle=oracle)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)
    assert s.metrics()["updates"] == oracle.policy.metrics()["updates"] > 0


@pytest.mark.parametrize("loader_cls", [DataLoader, StatefulDataLoader])
def test_delayed_rewards_by_batch_id(loader_cls):
    s = make()
    loader = s.track(loader_cls(s.dataset, batch_sampler=s, num_workers=2, prefetch_factor=3))
    oracle = Oracle(s)
    train(s, loader, epochs=2, delayed=True, oracle=oracle)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("workers", [0, 2])
def test_update_after_break_and_after_the_epoch(workers):
    s = make()
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=workers))
    oracle = Oracle(s)
    for sid, idx in loader:
        last = (sid, idx)
        if int(idx.sum()) % 3 == 0:
            break
    s.update(reward_of(*last))  # the loader iterator is gone: the count is inferred
    oracle.update(*last)
    for sid, idx in loader:  # a whole epoch, then the update after the loop
        last = (sid, idx)
    s.update(reward_of(*last))
    oracle.update(*last)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)


def test_iterated_directly_counts_batches():
    s = make()
    it = iter(s.track(s))
    keys = next(it)
    src, idx = s.decode(keys)
    s.update(reward_of(src, idx))
    assert s.last_batch == 0
    next(it)
    assert s.last_batch == 1


def test_unmatchable_rewards_raise():
    s = make()
    with pytest.raises(RuntimeError, match=r"before any batch was received"):
        s.update(torch.zeros(5))
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2, prefetch_factor=2))
    it = iter(loader)
    next(it)
    bid = s.last_batch
    with pytest.raises(ValueError, match=r"shape \(5,\), one per example, but got shape=\(4,\)"):
        s.update(torch.zeros(4))
    with pytest.raises(TypeError, match=r"floating-point Tensor, but got dtype=torch.int32"):
        s.update(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"device=meta"):
        s.update(torch.zeros(5, device="meta"))
    with pytest.raises(ValueError, match=rf"batch={bid + 1} is still prefetched"):
        s.update(torch.zeros(5), batch=bid + 1)
    with pytest.raises(ValueError, match=r"batch=999 has not been drawn"):
        s.update(torch.zeros(5), batch=999)
    with pytest.raises(TypeError, match=r"batch should be an int id"):
        s.update(torch.zeros(5), batch="0")
    s.update(torch.zeros(5))
    with pytest.raises(ValueError, match=rf"batch {bid} already received its rewards"):
        s.update(torch.ones(5))
    del it


def test_nonfinite_rewards_are_counted_and_skipped():
    s = make()
    it = iter(s.track(s))
    next(it)
    s.update(torch.tensor([math.nan, math.inf, 1e30, -1e30, 0.0]))
    m = s.metrics()
    assert m["nonfinite_rewards"] == 2
    p = s.policy.probs
    assert bool(torch.isfinite(p).all())
    assert abs(float(p.sum()) - 1) < 1e-9
    assert abs(sum(s.weights.values()) - 1) < 1e-9


def test_in_order_false_is_refused():
    s = make()
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=1, in_order=False))
    with pytest.raises(ValueError, match=r"in order .* but got in_order=False"):
        next(iter(loader))


# ------------------------------------------------------------------ reproducibility


def keys_of(loader, epochs=2):
    return [(sid * 100 + idx).tolist() for _ in range(epochs) for sid, idx in loader]


def test_same_seed_same_batches_with_any_num_workers():
    runs = []
    for workers in (0, 1, 2):
        s = make(seed=3)
        runs.append(keys_of(s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=workers))))
    assert runs[0] == runs[1] == runs[2]
    s = make(seed=4)
    assert keys_of(s.track(DataLoader(s.dataset, batch_sampler=s))) != runs[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_run_with_updates(workers):
    out = []
    for _ in range(2):
        s = make()
        loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=workers))
        out.append((train(s, loader, epochs=2), s.weights))
    assert out[0] == out[1]


# ------------------------------------------------------------------ resume


def direct_run(s: GARSampler, n: int) -> list[list[int]]:
    """n batches straight from the sampler (epochs chained), updating after each."""
    out: list[list[int]] = []
    while len(out) < n:
        for keys in s.track(s):
            out.append(keys)
            s.update(reward_of(*s.decode(keys)))
            if len(out) == n:
                break
    return out


@settings(max_examples=20, deadline=None)
@given(
    stop=st.integers(1, 30),
    rest=st.integers(1, 20),
    rule=st.sampled_from(["reinforce", "exp_grad"]),
    normalize=st.sampled_from(["batch", "running"]),
)
def test_resume_equals_uninterrupted(stop, rest, rule, normalize):
    full = make(rule=rule, normalize=normalize)
    expected = direct_run(full, stop + rest)
    first = make(rule=rule, normalize=normalize)
    got = direct_run(first, stop)
    state = first.state_dict()
    second = make(rule=rule, normalize=normalize)
    second.load_state_dict(state)
    assert second.weights == first.weights
    got += direct_run(second, rest)
    assert got == expected
    assert second.weights == full.weights


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_under_a_dataloader(workers):
    """The batches prefetched at the checkpoint are re-yielded exactly as drawn."""
    full = make()
    expected = train(
        full,
        full.track(DataLoader(full.dataset, batch_sampler=full, num_workers=workers)),
        epochs=2,
    )
    first = make()
    got = train(
        first,
        first.track(DataLoader(first.dataset, batch_sampler=first, num_workers=workers)),
        epochs=1,
        stop=3,
    )
    state = first.state_dict()
    second = make()
    second.load_state_dict(state)
    loader = second.track(DataLoader(second.dataset, batch_sampler=second, num_workers=workers))
    got += train(second, loader, epochs=2)
    assert got == expected
    assert second.weights == full.weights


def resume_through(loader_for, total: int, before, rest: int, save_sampler: bool = True):
    """Train ``total`` epochs uninterrupted, and again with a checkpoint (the loader's state,
    and the sampler's if ``save_sampler``) after the ``train()`` runs ``before`` ((epochs,
    stop) each), resumed into fresh objects for ``rest`` epochs. UserWarnings are errors.
    Returns (uninterrupted sampler, resumed sampler, expected batches, batches seen)."""
    full = make()
    expected = train(full, loader_for(full), epochs=total)
    first = make()
    loader = loader_for(first)
    got = []
    for epochs, stop in before:
        got += train(first, loader, epochs=epochs, stop=stop)
    loader_state = loader.state_dict()
    sampler_state = first.state_dict() if save_sampler else None
    del loader
    second = make()
    loader2 = loader_for(second)
    loader2.load_state_dict(loader_state)
    if sampler_state is not None:
        second.load_state_dict(sampler_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        got += train(second, loader2, epochs=rest)
    return full, second, expected, got


@pytest.mark.parametrize(("workers", "save_sampler"), [(0, False), (2, True)])
def test_resume_under_stateful_dataloader(workers, save_sampler):
    def loader_for(s):
        return s.track(StatefulDataLoader(s.dataset, batch_sampler=s, num_workers=workers))

    full, second, expected, got = resume_through(loader_for, 2, [(1, 4)], 2, save_sampler)
    assert got == expected
    assert second.weights == full.weights


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_resume_under_stateful_dataloader_saved_between_epochs(workers, persistent):
    """A checkpoint taken after an epoch's loop (save every epoch): the resumed run starts the
    next epoch. With workers, the StatefulDataLoader first rebuilds the finished iterator and
    prefetches from it; that must not start (and use up) an epoch."""

    def loader_for(s):
        return s.track(
            StatefulDataLoader(
                s.dataset, batch_sampler=s, num_workers=workers, persistent_workers=persistent
            )
        )

    full, second, expected, got = resume_through(loader_for, 3, [(1, None)], 2)
    assert got == expected
    assert second.weights == full.weights
    assert second.metrics()["batches_drawn"] == full.metrics()["batches_drawn"]


def test_changes_between_load_and_the_first_batch_are_kept():
    """A delayed update of the last batch before the checkpoint, and set_epoch(), made after
    load_state_dict() and before the loop starts, survive the resume (and state_dict())."""
    full = make()
    it = iter(full.track(full))
    for _ in range(3):
        keys = next(it)
    last = full.last_batch
    state = full.state_dict()
    full.update(reward_of(*full.decode(keys)), batch=last)
    full.set_epoch(7)
    expected = [list(b) for b in it] + [list(b) for b in full]  # rest of epoch 0, then epoch 7

    second = make()
    second.load_state_dict(state)
    second.update(reward_of(*second.decode(keys)), batch=last)
    second.set_epoch(7)
    snapshot = second.state_dict()
    assert second.weights == full_weights_after(state, keys, last)
    got = [list(b) for b in second] + [list(b) for b in second]
    assert got == expected
    assert second.weights == full.weights
    assert second.metrics()["updates"] == 1
    with pytest.raises(ValueError, match=r"already received its rewards"):
        second.update(reward_of(*second.decode(keys)), batch=last)

    third = make()  # the state_dict() taken before the loop holds both changes
    third.load_state_dict(snapshot)
    assert [list(b) for b in third] + [list(b) for b in third] == expected
    assert third.weights == full.weights


def full_weights_after(state, keys, batch):
    s = make()
    s.load_state_dict(state)
    s.update(reward_of(*s.decode(keys)), batch=batch)
    return s.weights


def test_resume_when_every_epoch_has_the_same_number():
    """set_epoch(0) before every epoch (allowed): the batches drawn but not delivered at a
    checkpoint are told apart by id, not by epoch number and position."""

    def run(s, epochs, stop=None):
        out = []
        loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2))
        for e in range(epochs):
            s.set_epoch(0)
            for t, (sid, idx) in enumerate(loader):
                out.append((sid * 100 + idx).tolist())
                s.update(reward_of(sid, idx))
                if stop is not None and e == epochs - 1 and t == stop:
                    return out
        return out

    full = make()
    expected = run(full, 2)
    first = make()
    got = run(first, 2, stop=3)
    state = first.state_dict()
    second = make()
    second.load_state_dict(state)
    loader = second.track(DataLoader(second.dataset, batch_sampler=second, num_workers=2))
    for sid, idx in loader:
        got.append((sid * 100 + idx).tolist())
        second.update(reward_of(sid, idx))
    assert got == expected
    assert second.weights == full.weights


def test_batches_never_delivered_stay_unrewardable_after_a_resume():
    """Prefetched at a break and never delivered: update(batch=) refuses them until the next
    pass draws them again (same ids); prefetched at the checkpoint and not yet delivered
    again: refused after the resume as before it."""
    s = make()
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2, persistent_workers=True))
    for t, _ in enumerate(loader):
        if t == 1:
            break  # batches 2.. were prefetched and are never delivered
    with pytest.raises(ValueError, match=r"batch=3 is still prefetched"):
        s.update(torch.zeros(5), batch=3)
    it = iter(loader)
    next(it)
    assert s.last_batch == 2  # the next pass draws the undelivered batches' ids again
    with pytest.raises(ValueError, match=r"batch=3 is still prefetched"):
        s.update(torch.zeros(5), batch=3)
    pending = s.last_batch + 1  # drawn by the workers, not yet delivered
    state = s.state_dict()
    del it, loader
    r = make()
    r.load_state_dict(state)
    with pytest.raises(ValueError, match=rf"batch={pending} was drawn before the checkpoint but"):
        r.update(torch.zeros(5), batch=pending)


def test_the_reward_window_is_restored_with_its_order():
    """Rewarded batches keep their place in the window after a resume, so the same batches
    leave it as in an uninterrupted run."""

    def go(s, it, n, every):
        for t in range(n):
            keys = next(it)
            if every and t % every == 0:
                s.update(reward_of(*s.decode(keys)))

    full = make(num_batches=40, reward_window=4)
    it = iter(full.track(full))
    go(full, it, 6, every=2)
    old = full.last_batch - 2  # received, never rewarded, still in the window
    state = full.state_dict()
    resumed = make(num_batches=40, reward_window=4)
    resumed.load_state_dict(state)
    for s in (full, resumed):  # a rewarded batch in the window stays rewarded
        with pytest.raises(ValueError, match=r"batch 4 already received its rewards"):
            s.update(torch.zeros(5), batch=4)
    go(full, it, 2, every=0)
    go(resumed, iter(resumed), 2, every=0)
    for s in (full, resumed):
        with pytest.raises(ValueError, match=rf"batch={old} is older than the last"):
            s.update(torch.zeros(5), batch=old)
    # The reward ages and counts are not in the state: they start again at a load
    # (test_reward_age_and_count_start_again_at_a_load); every other metric resumes.
    assert untracked(resumed.metrics()) == untracked(full.metrics())


def untracked(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith(("reward_age/", "reward_count/"))}


def test_stateful_dataloader_snapshotting_every_few_steps_warns_that_it_lags():
    """snapshot_every_n_steps > 1: the loader's stored position lags the sampler state saved
    beside it, so the resume cannot be exact; the warning names the setting to change."""

    def loader_for(s):
        return s.track(
            StatefulDataLoader(s.dataset, batch_sampler=s, num_workers=2, snapshot_every_n_steps=3)
        )

    first = make()
    loader = loader_for(first)
    train(first, loader, epochs=1, stop=4)
    loader_state, sampler_state = loader.state_dict(), first.state_dict()
    del loader
    second = make()
    loader2 = loader_for(second)
    loader2.load_state_dict(loader_state)
    second.load_state_dict(sampler_state)
    with pytest.warns(UserWarning, match=r"snapshot_every_n_steps=1 to resume exactly"):
        train(second, loader2, epochs=1)


def test_stateful_dataloader_alone_with_workers_warns_about_the_policy():
    first = make()
    loader = first.track(StatefulDataLoader(first.dataset, batch_sampler=first, num_workers=2))
    train(first, loader, epochs=1, stop=4)
    state = loader.state_dict()
    del loader
    second = make()
    loader2 = second.track(StatefulDataLoader(second.dataset, batch_sampler=second, num_workers=2))
    loader2.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"policy updates made after that are not in it"):
        train(second, loader2, epochs=1)


def test_load_state_dict_checks_the_sampler():
    state = make().state_dict()
    with pytest.raises(
        ValueError, match=r"state has batch_size=5, but this sampler has batch_size=4"
    ):
        make(batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state has seed=0, but this sampler has seed=1"):
        make(seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"version=None"):
        make().load_state_dict({})


# every key but those with a default: rank and world_size (0, 1), transform (None: none),
# stream_first_batch (without stream sources: none drawn; tests/test_streams.py requires it with)
REQUIRED_KEYS = sorted(
    set(make().state_dict())
    - {"version", "rank", "world_size", "transform", "stream_first_batch", "lag"}
    - {"history_every", "history_limit", "reward_window"}
)  # the optional keys: states saved before them load with their defaults


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_a_state_without_a_key_is_refused_by_name(key: str):
    state = make().state_dict()
    del state[key]
    with pytest.raises(ValueError, match=rf"lacks the key\(s\) \['{key}'\]"):
        make().load_state_dict(state)


def test_a_policy_state_without_a_key_is_refused_by_name_and_changes_nothing():
    first = make()
    state = first.state_dict()
    del state["policy"]["running"]
    del state["policy"]["config"]["momentum"]
    second = make(lr=0.2)
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['running'\]"):
        second.load_state_dict(state)
    state["policy"]["running"] = [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"\['config'\]: it lacks the key\(s\) \['momentum'\]"):
        second.load_state_dict(state)
    assert second.policy.lr == 0.2


# ------------------------------------------------------------------ DatasetDict


def test_datasetdict_sources():
    import datasets

    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"sid": [i] * n, "x": list(range(n))}).with_format(
                "torch"
            )
            for i, (split, n) in enumerate([("train", 12), ("extra", 8), ("test", 6)])
        }
    )
    s = GARSampler(dd, batch_size=4, seed=0, names=["train", "extra"])
    assert s.names == ["train", "extra"]
    assert set(s.weights) == {"train", "extra"}
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=0))
    for batch in loader:
        assert set(batch) == {"sid", "x"}
        assert batch["sid"].shape == (4,)
        assert int(batch["sid"].max()) <= 1  # never the test split
        s.update((batch["sid"] == 0).float())
    assert s.weights["train"] > s.weights["extra"]
    everything = GARSampler(dd, batch_size=4)
    assert everything.names == ["train", "extra", "test"]
    with pytest.raises(ValueError, match=r"unknown source name\(s\) \['valid'\]"):
        GARSampler(dd, batch_size=4, names=["valid"])


# ------------------------------------------------------------------ sources that differ


class Listed:
    """A map-style dataset over a list of ready examples."""

    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]


def two_sources(a: list, b: list) -> DataLoader:
    s = GARSampler({"a": Listed(a), "b": Listed(b)}, batch_size=8, seed=0)
    return DataLoader(s.dataset, batch_sampler=s)


@pytest.mark.parametrize(
    ("a", "b", "where", "theirs", "ours"),
    [
        # a long label in one source, a float label in the other: promoted silently otherwise
        ((torch.zeros(3), 1), (torch.zeros(3), 1.0), r"example\[1\]", "float", "int"),
        (
            (torch.zeros(3), torch.tensor(1)),
            (torch.zeros(3), torch.tensor(1.0)),
            r"example\[1\]",
            r"0-d torch.float32 Tensor",
            r"0-d torch.int64 Tensor",
        ),
        (
            {"x": torch.zeros(3), "y": 1},
            {"x": torch.zeros(3), "label": 1},
            "example",
            r"keys \['x', 'label'\]",
            r"keys \['x', 'y'\]",
        ),
        (
            {"x": torch.zeros(2, 3), "y": 1},
            {"x": torch.zeros(6), "y": 1},
            r"example\['x'\]",
            r"1-d torch.float32",
            r"2-d torch.float32",
        ),
        ((torch.zeros(3), 1), (torch.zeros(3), 1, "extra"), "example", "3 items", "2 items"),
        (
            {"ids": [1, 2, 3], "y": 1},
            {"ids": [1.5, 2.5], "y": 1},
            r"example\['ids'\]\[\*\]",  # a list's length is a size, its items' kind is not
            "a Python/numpy float",
            "a Python/numpy int",
        ),
    ],
)
def test_sources_whose_examples_differ_are_named(a, b, where, theirs, ours):
    loader = two_sources([a] * 20, [b] * 20)
    with pytest.raises(TypeError, match=r"source 'b' returns examples that cannot share") as e:
        next(iter(loader))
    assert re.search(
        rf"at {where} it has [^,]*{theirs}[^,]*, where source 'a' has .*{ours}", str(e.value)
    )


def test_examples_of_other_sizes_and_scalar_kinds_share_a_batch():
    """Sizes are the collate_fn's business (padding); numpy and Python ints are both ints."""
    import numpy as np

    a = [(torch.zeros(i % 5 + 1), np.int64(1)) for i in range(20)]
    b = [(torch.ones(i % 3 + 2), 2) for i in range(20)]

    def pad(batch):
        x = torch.nn.utils.rnn.pad_sequence([e[0] for e in batch], batch_first=True)
        return x, torch.tensor([int(e[1]) for e in batch])

    s = GARSampler({"a": Listed(a), "b": Listed(b)}, batch_size=8, seed=0)
    batches = list(DataLoader(s.dataset, batch_sampler=s, collate_fn=pad))
    assert len(batches) == 5
    assert any(bool((x == 1).any()) and bool((y == 1).any()) for x, y in batches)  # both mixed

    tokens = GARSampler(
        {
            "a": Listed([{"ids": list(range(i % 4 + 1)), "y": 1} for i in range(20)]),
            "b": Listed([{"ids": list(range(i % 3 + 5)), "y": 0} for i in range(20)]),
        },
        batch_size=8,
        seed=0,
    )
    examples = [ex for keys in tokens for ex in tokens.dataset.__getitems__(keys)]
    assert {ex["y"] for ex in examples} == {0, 1}


def test_examples_that_differ_are_named_through_worker_processes():
    loader = two_sources([(torch.zeros(3), 1)] * 20, [(torch.zeros(3), 1.5)] * 20)
    loader = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, num_workers=1)
    with pytest.raises(TypeError, match=r"source 'b' returns examples that cannot share"):
        next(iter(loader))


def test_examples_that_differ_are_named_with_a_transform():
    from torchvision.transforms import v2

    from adaptive_data import GARTransform

    tf = GARTransform(["Identity", "Rotate"])
    pipe = v2.Compose([tf, v2.ToDtype(torch.float32, scale=True)])

    class Images(Listed):
        def __getitem__(self, i: int):
            x, y = self.examples[i]
            return pipe(x), y

    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    s = GARSampler(
        {"a": Images([(image, 1)] * 20), "b": Images([(image, 1.0)] * 20)},
        batch_size=8,
        seed=0,
        transform=tf,
    )
    with pytest.raises(
        TypeError, match=r"source 'b' .* at example\[1\] it has a Python/numpy float"
    ):
        next(iter(DataLoader(s.dataset, batch_sampler=s)))


# ------------------------------------------------------------------ bad input


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (({},), {"batch_size": 2}, ValueError, r"at least one dataset, but got none"),
        (([],), {"batch_size": 2}, ValueError, r"at least one dataset, but got none"),
        (({"a": tagged(0, 0)},), {"batch_size": 2}, ValueError, r"source 'a' is empty \(len 0\)"),
        (
            ({"s": Stream()},),
            {"batch_size": 2},
            ValueError,
            r"num_batches is required when a source is a stream \(source\(s\) \['s'\]\)",
        ),
        (
            ({"o": object()},),
            {"batch_size": 2},
            TypeError,
            r"source 'o' is not a map-style dataset",
        ),
        ((42,), {"batch_size": 2}, TypeError, r"a map-style dataset, a dict .* but got int"),
        ((Stream(),), {"batch_size": 2}, ValueError, r"a stream \(source\(s\) \['0'\]\)"),
        (
            (sources(),),
            {"batch_size": 0},
            ValueError,
            r"batch_size should be a positive integer value, but got batch_size=0",
        ),
        (
            (sources(),),
            {"batch_size": 2, "weights": [1, -1, 1]},
            ValueError,
            r"weights=\[1.0, -1.0, 1.0\]",
        ),
        (
            (sources(),),
            {"batch_size": 2, "weights": [1, math.nan, 1]},
            ValueError,
            r"weights=\[1.0, nan, 1.0\]",
        ),
        ((sources(),), {"batch_size": 2, "weights": [0, 0, 0]}, ValueError, r"not all be zero"),
        (
            (sources(),),
            {"batch_size": 2, "weights": {"z": 1}},
            ValueError,
            r"unknown source\(s\) \['z'\]",
        ),
        (
            (sources(),),
            {"batch_size": 2, "names": ["a", "q"]},
            ValueError,
            r"unknown source name\(s\) \['q'\]",
        ),
        ((sources(),), {"batch_size": 2, "num_batches": 0}, ValueError, r"num_batches=0"),
        ((sources(),), {"batch_size": 2, "floor": 0.5}, ValueError, r"floor=0.5"),
        ((sources(),), {"batch_size": 2, "reward_window": 1}, ValueError, r"reward_window=1"),
    ],
)
def test_bad_input_raises(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        GARSampler(*args, **kwargs)


def test_one_dataset_is_one_source_named_0():
    s = GARSampler(tagged(0, 7), batch_size=3, seed=0)
    assert s.names == ["0"]
    assert s.weights == {"0": 1.0}
    keys = sorted(k for b in iter(s) for k in b)
    assert keys == sorted(set(keys))
    assert len(keys) == 6


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match=r"epoch=-1"):
        make().set_epoch(-1)


def test_persistent_workers_update_before_the_next_epochs_first_batch():
    """A new epoch's iterator prefetches at once; the update still goes to the last batch."""
    s = make()
    oracle = Oracle(s)
    loader = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2, persistent_workers=True))
    last = None
    for _ in range(3):
        it = iter(loader)
        if last is not None:
            s.update(reward_of(*last))
            oracle.update(*last)
        for sid, idx in it:
            last = (sid, idx)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)


def test_resume_under_stateful_dataloader_with_persistent_workers_in_a_later_epoch():
    def loader_for(s):
        return s.track(
            StatefulDataLoader(
                s.dataset,
                batch_sampler=s,
                num_workers=2,
                persistent_workers=True,
                prefetch_factor=3,
            )
        )

    full, second, expected, got = resume_through(loader_for, 3, [(2, None), (1, 2)], 1)
    assert got == expected
    assert second.weights == full.weights


def test_a_wrapping_batch_sampler_is_refused_not_misattributed():
    s = make()

    class Hidden:  # hides what it iterates
        def __iter__(self):
            yield from s

        def __len__(self):
            return len(s)

    class Exposed(Hidden):  # says what it wraps, through the usual public attribute
        batch_sampler = s

    loader = s.track(DataLoader(s.dataset, batch_sampler=Hidden(), num_workers=2))
    with pytest.raises(ValueError, match=r"draws its batches from a Hidden, not from this"):
        iter(loader)
    loader = s.track(DataLoader(s.dataset, batch_sampler=Exposed(), num_workers=2))
    with pytest.raises(ValueError, match=r"a Exposed wraps this GARSampler"):
        iter(loader)
    # Not tracked: the sampler cannot tell which batch the loop holds, and says so.
    it = iter(DataLoader(s.dataset, batch_sampler=Exposed(), num_workers=2))
    next(it)
    with pytest.raises(RuntimeError, match=r"not iterated through sampler.track\(\)"):
        s.update(torch.zeros(5))
    del it


def test_metrics_and_history():
    s = make()
    it = iter(s.track(s))
    for _ in range(3):
        keys = next(it)
        s.update(reward_of(*s.decode(keys)))
    m = s.metrics()
    assert m["updates"] == 3
    assert m["batches_rewarded"] == 3
    assert m["batches_drawn"] == 3
    assert all(isinstance(v, int | float) for v in m.values())  # flat, for any logger
    assert {k for k in m if k.startswith("reward_mean/")} == {f"reward_mean/{n}" for n in SIZES}
    assert {k: v for k, v in m.items() if k.startswith("weight/")} == {
        f"weight/{n}": w for n, w in s.weights.items()
    }
    h = s.history
    assert [e["batch"] for e in h] == [None, 0, 1, 2]
    assert h[-1]["weights"] == s.weights
    assert h[0]["weights"] == pytest.approx({n: 1 / 3 for n in SIZES})


def reward_by_source(s: GARSampler, keys) -> tuple[torch.Tensor, dict[str, list[float]]]:
    sid, idx = s.decode(keys)
    r = reward_of(sid, idx)
    by: dict[str, list[float]] = {n: [] for n in SIZES}
    for i, v in zip(sid.tolist(), r.tolist(), strict=True):
        by[s.names[i]].append(v)
    return r, by


def test_reward_age_count_and_history_rewards_say_how_fresh_each_mean_is():
    """A source absent from the latest updates keeps its running mean, and its age says how
    many updates old that mean is; the history holds each update's mean per source."""
    s = make(weights={"a": 0.9, "b": 0.05, "c": 0.05}, floor=0.01, num_batches=40)
    it = iter(s.track(s))
    last: dict[str, int] = {}
    counts = dict.fromkeys(SIZES, 0)
    means: dict[str, float] = {}
    for update in range(1, 13):
        keys = next(it)
        r, by = reward_by_source(s, keys)
        if update == 7:  # a non-finite reward is neither counted nor ages a source less
            r[0] = math.nan
            by[s.names[int(s.decode(keys)[0][0])]].pop(0)
        s.update(r)
        for name, values in by.items():
            if values:
                last[name] = update
                counts[name] += len(values)
                mean = sum(values) / len(values)
                means[name] = mean if name not in means else 0.9 * means[name] + 0.1 * mean
        entry = s.history[-1]["rewards"]
        for name, values in by.items():
            if values:
                assert entry[name] == pytest.approx(sum(values) / len(values))
            else:
                assert math.isnan(entry[name])
    m = s.metrics()
    for name in SIZES:
        assert m[f"reward_count/{name}"] == counts[name]
        if name in last:
            assert m[f"reward_age/{name}"] == 12 - last[name]
            assert m[f"reward_mean/{name}"] == pytest.approx(means[name])
        else:
            assert math.isnan(m[f"reward_age/{name}"])
            assert math.isnan(m[f"reward_mean/{name}"])
    assert m["reward_age/a"] == 0  # drawn in nearly every batch
    assert any(m[f"reward_age/{n}"] > 0 or math.isnan(m[f"reward_age/{n}"]) for n in "bc")
    assert all(math.isnan(v) for v in s.history[0]["rewards"].values())  # the initial entry


def test_reward_age_count_and_each_updates_rewards_survive_a_resume():
    """They are in the state: a resumed sampler reports the ages, counts and per-update
    rewards of the uninterrupted one, and goes on counting from them."""
    full = make(num_batches=40)
    it = iter(full.track(full))
    for _ in range(4):
        full.update(reward_of(*full.decode(next(it))))
    resumed = make(num_batches=40)
    resumed.load_state_dict(full.state_dict())
    m, want = resumed.metrics(), full.metrics()
    for name in SIZES:
        for key in ("reward_count", "reward_age", "reward_mean"):
            a, b = m[f"{key}/{name}"], want[f"{key}/{name}"]
            assert a == b or (math.isnan(a) and math.isnan(b)), (key, name)

    def rows(h):
        return [(e["batch"], e["weights"], str(e["rewards"])) for e in h]  # NaN as text

    assert rows(resumed.history) == rows(full.history)
    keys = next(iter(resumed.track(resumed)))
    r, by = reward_by_source(resumed, keys)
    before = m
    resumed.update(r)
    m = resumed.metrics()
    for name, values in by.items():
        assert m[f"reward_count/{name}"] == before[f"reward_count/{name}"] + len(values)
        if values:
            assert m[f"reward_age/{name}"] == 0
        else:
            age = before[f"reward_age/{name}"]
            assert m[f"reward_age/{name}"] == age + 1 or math.isnan(age)


def test_end_to_end_with_the_probe_downweights_random_labels():
    """Digits (shipped with scikit-learn): a clean source and a randomly labelled one."""
    from sklearn import datasets
    from torch import nn

    import adaptive_data as ad
    from adaptive_data.sampling._reference import ReferenceBatches

    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    clean, noisy, ref = perm[:600], perm[600:1200], perm[1200:1500]
    sources = {
        "clean": TensorDataset(x[clean], y[clean]),
        "noisy": TensorDataset(x[noisy], torch.randint(0, 10, (600,), generator=g)),
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    probe = ad.GradientProbe(model, loss_fn)
    sampler = GARSampler(sources, batch_size=32, seed=0)
    reference = ReferenceBatches(TensorDataset(x[ref], y[ref]), batch_size=64, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    for _ in range(2):
        for xb, yb in loader:
            sampler.update(probe(xb, yb, reference=tuple(next(reference))))
            opt.zero_grad()
            loss_fn(model(xb), yb).mean().backward()
            opt.step()
    assert sampler.weights["noisy"] < 0.2  # from 0.5: the random labels lose their share


def test_delayed_reward_across_a_checkpoint():
    """The reward of the last batch before a checkpoint can be given after the restore."""

    def run(sampler, n, pending=None):
        out = []
        it = iter(sampler.track(sampler))
        for _ in range(n):
            keys = next(it)
            out.append(keys)
            if pending is not None:
                sampler.update(reward_of(*sampler.decode(pending[1])), batch=pending[0])
            pending = (sampler.last_batch, keys)
        return out, pending

    full = make(num_batches=20)
    expected, _ = run(full, 12)
    first = make(num_batches=20)
    got, pending = run(first, 5)
    state = first.state_dict()
    second = make(num_batches=20)
    second.load_state_dict(state)
    more, _ = run(second, 7, pending)
    assert got + more == expected
    assert second.weights == full.weights


def test_default_floor_is_one_percent_shared_by_the_sources() -> None:
    data = {n: TensorDataset(torch.arange(10)) for n in ("a", "b", "c", "d")}
    sampler = GARSampler(data, batch_size=2, seed=0)
    assert sampler.policy.floor == pytest.approx(0.01 / 4)
    assert GARSampler(data, batch_size=2, seed=0, floor=0.1).policy.floor == 0.1


def test_batches_carry_their_source_ids_and_fetch_like_plain_lists() -> None:
    """The sampler hands the DataLoader lists of keys that also know each key's source; the
    dataset then skips searching for it, with the same result, and they survive pickling
    (the trip to a worker process)."""
    data = {
        n: TensorDataset(torch.arange(k) + 100 * i) for i, (n, k) in enumerate([("a", 7), ("b", 5)])
    }
    sampler = GARSampler(data, batch_size=6, seed=0)
    batch = next(iter(sampler.track(sampler)))
    assert isinstance(batch, list)
    assert batch.sources == [sampler.dataset.locate(k)[0] for k in batch]
    again = pickle.loads(pickle.dumps(batch))
    assert again == batch
    assert again.sources == batch.sources
    assert sampler.dataset.__getitems__(batch) == sampler.dataset.__getitems__(list(batch))


# ---------------------------------------------------------------- the policy it learns


def test_a_policy_object_is_learned_in_place() -> None:
    """policy= takes a CategoricalPolicy over the sources: the sampler learns that object."""
    names = list(sources())
    policy = CategoricalPolicy(len(names), names=names, lr=0.9, floor=0.0)
    s = GARSampler(sources(), batch_size=4, seed=0, policy=policy)
    assert s.policy is policy
    loader = s.track(DataLoader(s.dataset, batch_sampler=s))
    for _ in zip(range(3), loader, strict=False):
        sid, _ = s.decode(s._records[s.last_batch].keys)
        s.update((sid == 0).double())
    assert policy.weights == s.weights
    assert policy.metrics()["updates"] == 3
    same = GARSampler(sources(), batch_size=4, seed=0, lr=0.9, floor=0.0)
    assert same.policy.state_dict()["config"] == policy.state_dict()["config"]


def test_a_policy_that_does_not_fit_the_sources_is_refused() -> None:
    names = list(sources())
    with pytest.raises(ValueError, match=r"one choice per source, named as the sources"):
        GARSampler(sources(), batch_size=4, policy=CategoricalPolicy(len(names)))
    with pytest.raises(ValueError, match=r"one choice per source.*has 2 choices"):
        GARSampler(sources(), batch_size=4, policy=CategoricalPolicy(2, names=names[:2]))
    with pytest.raises(ValueError, match=r"either policy= or the options.*got policy= and lr"):
        GARSampler(
            sources(), batch_size=4, lr=0.5, policy=CategoricalPolicy(len(names), names=names)
        )
    with pytest.raises(TypeError, match=r"policy should be a CategoricalPolicy, but got dict"):
        GARSampler(sources(), batch_size=4, policy={"lr": 0.5})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['learning_rate'\]"):
        GARSampler(sources(), batch_size=4, learning_rate=0.5)


def test_batch_sources_and_augmentations_name_each_row():
    s = make()
    it = iter(s.track(s))
    keys = next(it)
    sid, _ = s.decode(keys)
    assert s.batch_sources(s.last_batch) == sid.tolist()
    assert s.batch_augmentations(s.last_batch) is None  # no transform
    with pytest.raises(ValueError, match=r"batch=99 is not among the last reward_window"):
        s.batch_sources(99)


def test_batch_augmentations_are_the_ops_drawn_for_each_row():
    from adaptive_data import GARTransform

    tf = GARTransform(["Identity", "Rotate", "Invert"])
    s = GARSampler(
        {"a": Listed([(torch.zeros(1, 4, 4, dtype=torch.uint8), 0)] * 20)},
        batch_size=6,
        seed=0,
        transform=tf,
        reference_every=2,
    )
    it = iter(s.track(s))
    first = next(it)  # position 1: augmented
    ops = s.batch_augmentations(s.last_batch)
    assert ops == [k[1] for k in first]  # the op of each row's decision key
    assert all(0 <= op < 3 for op in ops)
    next(it)  # position 2: a reference batch, un-augmented
    assert s.is_reference(s.last_batch)
    assert s.batch_augmentations(s.last_batch) == [-1] * 6


def test_a_weighted_update_steps_a_learning_transform_as_many_times():
    """update(weight=k) steps the augmentation policy (ops and magnitudes) by lr * k, as it
    steps the mixture: the budget's sparse rewards move a learned policy as far as every
    batch's would."""
    from adaptive_data import GARTransform

    def run(weight: float, lr: float) -> tuple[list[float], list[float]]:
        tf = GARTransform(
            ["Identity", "Rotate"],
            learn_ops=True,
            learn_magnitudes=True,
            lr=lr,
            magnitude_lr=lr,
        )
        s = GARSampler(
            {"a": Listed([(torch.zeros(1, 4, 4, dtype=torch.uint8), 0)] * 32)},
            batch_size=16,
            seed=0,
            transform=tf,
            reference_every=None,
        )
        it = iter(s.track(s))
        drawn = next(it)
        # each row rewarded by its op and its magnitude bin
        s.update(torch.tensor([d.op + 0.1 * d.bin for d in drawn]), weight=weight)
        mags = [w for m in tf.policy.magnitude_weights.values() for w in m]
        return list(tf.policy.op_weights.values()), mags

    weighted, mags_w = run(3.0, 0.2)
    scaled, mags_s = run(1.0, 0.6)
    once, mags_1 = run(1.0, 0.2)
    assert weighted == pytest.approx(scaled, abs=1e-12)
    assert mags_w == pytest.approx(mags_s, abs=1e-12)
    # the weight did move both further than one update
    assert weighted != pytest.approx(once, abs=1e-6)
    assert mags_w != pytest.approx(mags_1, abs=1e-6)


def test_a_dataset_dict_with_held_out_splits_and_no_names_warns_once():
    """Without names= every split is a training source: a validation, test or target split
    among them is named in one warning; names= (or no such split) says nothing."""
    import datasets

    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"x": list(range(n)), "labels": [0] * n})

    dd = datasets.DatasetDict(
        {"train": split(8), "web": split(8), "validation": split(4), "test_clean": split(4)}
    )
    with pytest.warns(UserWarning, match=r"\['validation', 'test_clean'\], whose names say"):
        GARSampler(dd, batch_size=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GARSampler(dd, batch_size=2, seed=0, names=["train", "web"])
        GARSampler({"train": split(8), "web": split(8), "contest": split(8)}, batch_size=2)


def test_sources_that_cannot_be_stacked_are_named_with_the_default_collate():
    """torch's default collate names no source: with it, a batch whose sources give tensors of
    other shapes, or Python lists of numbers (a split without with_format('torch')), raises
    naming the sources, the field and the shapes. A padding collate_fn takes any length."""
    import datasets
    from torch.utils.data import DataLoader

    sources = {
        "long": [{"input_ids": torch.arange(8), "labels": 0} for _ in range(8)],
        "short": [{"input_ids": torch.arange(6), "labels": 1} for _ in range(8)],
    }
    s = GARSampler(sources, batch_size=8, seed=0)
    shapes = r"source '(long|short)' gives example\['input_ids'\] of shape \((8|6),\) where"
    with pytest.raises(TypeError, match=shapes + r" source '(short|long)' gives \((6|8),\)"):
        for _ in s.track(DataLoader(s.dataset, batch_sampler=s)):
            pass

    def pad(examples):
        ids = torch.nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], True)
        return {"input_ids": ids, "labels": torch.tensor([e["labels"] for e in examples])}

    s = GARSampler(sources, batch_size=8, seed=0)
    assert len(list(s.track(DataLoader(s.dataset, batch_sampler=s, collate_fn=pad)))) == 2
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 8, "labels": [0] * 8})
    s = GARSampler({"a": rows, "b": rows}, batch_size=4, seed=0)
    with pytest.raises(TypeError, match=r"'input_ids'\] as a Python list.*with_format\('torch'"):
        next(iter(s.track(DataLoader(s.dataset, batch_sampler=s))))


def test_a_weighted_update_is_that_many_steps_for_the_live_and_the_drawing_policy():
    """update(weight=k) steps the policy by lr * k, and the drawing copy applies the same
    step when the lag brings it in; the weight survives a checkpoint of the queue."""
    import math

    def run(weight: float, lr: float):
        s = GARSampler(
            {"a": TensorDataset(torch.arange(64.0)), "b": TensorDataset(torch.arange(64.0))},
            batch_size=8,
            seed=0,
            lag=2,
            lr=lr,
            max_step=100.0,
        )
        it = iter(s.track(s))
        keys = next(it)
        sid = torch.tensor([s.decode(keys)[0][i] for i in range(8)])
        s.update(sid.double(), weight=weight)  # source 1 rewarded above source 0
        state = s.state_dict()
        drawn = []
        for _ in range(3):
            next(it)
            drawn.append(list(s.drawing_weights.values()))
        return s.weights, drawn, state

    weighted, drawn_w, state = run(3.0, 0.2)
    scaled, drawn_s, _ = run(1.0, 0.6)
    assert weighted == pytest.approx(scaled, abs=1e-12)
    for a, b in zip(drawn_w, drawn_s, strict=True):
        assert a == pytest.approx(b, abs=1e-12)
    assert drawn_w[-1] == pytest.approx(list(weighted.values()), abs=1e-12)
    assert state["lag"]["queued_weights"].tolist() == [3.0]
    for bad in (0, -1.0, math.nan, math.inf, True, "2"):
        s = GARSampler({"a": TensorDataset(torch.arange(8.0))}, batch_size=4, seed=0)
        next(iter(s.track(s)))
        with pytest.raises((ValueError, TypeError), match="weight"):
            s.update(torch.ones(4), weight=bad)
