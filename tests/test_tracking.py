"""Batch identity through sampler.track(): every loader stack users run, with rewards computed
from the batch's content, so a reward given to any other batch than the one the loop holds
changes the weights (the oracle replays the same rewards from the content)."""

from __future__ import annotations

import itertools

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from .test_sampler import Oracle, make, reward_of


def check_loop(s: ad.GARSampler, loader, epochs: int = 2, stop: int | None = None) -> int:
    """The user's loop over ``loader``: each batch's content must be the batch the sampler
    says the loop holds, and its content-based reward goes to ``update(r)``. Returns the
    number of batches seen; asserts the weights equal the oracle's."""
    oracle = Oracle(s)
    seen = 0
    for _ in range(epochs):
        for t, (sid, idx) in enumerate(loader):
            held = s.decode(s._records[s.last_batch].keys)  # what the sampler says we hold
            assert torch.equal(held[0], sid)
            assert torch.equal(held[1], idx)
            s.update(reward_of(sid, idx))
            oracle.update(sid, idx)
            seen += 1
            if stop is not None and t == stop:
                break
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)
    assert s.metrics()["updates"] == seen > 0
    return seen


@pytest.mark.parametrize(("workers", "stop"), [(0, None), (2, None), (2, 3)])
def test_accelerate_prepared_loader_reads_ahead_yet_rewards_land_right(workers, stop):
    """accelerate's DataLoaderShard reads one batch ahead of the loop (what the HF Trainer
    iterates); tracking the prepared loader counts what the loop receives."""
    s = make()
    plain = DataLoader(s.dataset, batch_sampler=s, num_workers=workers)
    loader = s.track(Accelerator(cpu=True).prepare(plain))
    check_loop(s, loader, epochs=2, stop=stop)


def test_accelerate_sharding_across_processes_is_switched_off():
    """Under several accelerate processes the batch sampler is wrapped in a BatchSamplerShard;
    the GARSampler already draws per rank, so the tracked loader switches the second sharding
    off (through its public attributes) instead of losing W - 1 of every W batches."""
    s = make()
    plain = DataLoader(s.dataset, batch_sampler=s)
    prepared = prepare_data_loader(plain, num_processes=2, process_index=1, put_on_device=False)
    assert type(prepared.batch_sampler).__name__ == "BatchSamplerShard"
    seen = check_loop(s, s.track(prepared), epochs=1)
    assert seen == len(s)
    assert prepared.batch_sampler.num_processes == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_accelerate_skip_first_batches_is_exact(workers):
    """accelerate's skip_first_batches (the HF Trainer's resume without a sampler state)
    drops batches the sampler drew: the tracker counts them, and they stay unrewardable."""
    s = make()
    plain = s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=workers))
    skipping = skip_first_batches(plain.iterable, 3)
    loader = s.track(skipping)
    check_loop(s, loader, epochs=1)
    with pytest.raises(ValueError, match=r"batch=1 was skipped by a wrapper"):
        s.update(torch.zeros(5), batch=1)


def read_ahead(iterable):
    """A wrapper that reads one batch ahead (as accelerate and some fetchers do)."""
    it = iter(iterable)
    try:
        current = next(it)
    except StopIteration:
        return
    for nxt in it:
        yield current
        current = nxt
    yield current


class ReadAhead:
    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        return read_ahead(self.loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reader_ahead_outside_the_tracker_is_exact(workers):
    s = make()
    loader = s.track(ReadAhead(DataLoader(s.dataset, batch_sampler=s, num_workers=workers)))
    check_loop(s, loader, epochs=2, stop=4)


def test_a_wrapper_below_the_tracker_that_repeats_batches_is_refused_by_count():
    """A tracked iterable that delivers more batches than the sampler drew is refused (one
    that drops batches without saying so cannot be seen: docs/howto-mixture.md, Limits)."""
    s = make()

    class Duplicating:
        def __init__(self, loader) -> None:
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                yield batch
                yield batch

    loader = s.track(Duplicating(DataLoader(s.dataset, batch_sampler=s)))
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match=r"delivered its batch 2 of this pass, but the sampler"):
        next(it)


def test_a_tracker_over_another_sampler_is_refused():
    s, other = make(), make()
    loader = s.track(DataLoader(other.dataset, batch_sampler=other))
    with pytest.raises(ValueError, match=r"draws its batches from a GARSampler, not from this"):
        iter(loader)
    with pytest.raises(TypeError, match=r"already tracked"):
        s.track(loader)
    with pytest.raises(TypeError, match=r"needs the iterable the training loop consumes"):
        s.track(3)


def test_tracked_loader_delegates_to_the_loader():
    s = make()
    plain = DataLoader(s.dataset, batch_sampler=s, num_workers=0)
    loader = s.track(plain)
    assert len(loader) == len(plain) == len(s)
    assert loader.dataset is s.dataset
    assert loader.batch_sampler is s


# ------------------------------------------------------------------ GAR pairing


def tiny_setup(held_out: bool = True, **sampler_kw):
    g = torch.Generator().manual_seed(0)
    sources = {
        name: TensorDataset(
            torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
        )
        for name in ("a", "b")
    }
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    sampler = ad.GARSampler(sources, batch_size=4, seed=0, **sampler_kw)
    ref = ad.ReferenceBatches(sources["a"], 8, seed=1)
    gar = ad.GAR(model, sampler, reference=ref, loss_fn=loss_fn, budget=None)
    return model, sampler, gar, loss_fn


def test_gar_pairs_prefetched_micro_batches_with_their_forwards():
    """A Trainer fetches all the micro-batches of a step before the first forward; each
    forward still belongs to its own batch (GAR rewards exactly those batches)."""
    model, sampler, gar, loss_fn = tiny_setup()
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=2))
    rewarded = []
    it = iter(loader)
    for _ in range(4):
        micro = [next(it) for _ in range(2)]
        ids = [sampler.delivery(sampler.deliveries - 2 + i) for i in range(2)]
        for x, y in micro:
            (loss_fn(model(x), y).mean() / 2).backward()
        gar.step()
        rewarded += ids
        model.zero_grad()
    assert [h["batch"] for h in sampler.history[1:]] == rewarded


def test_gar_refuses_a_batch_received_without_a_forward():
    model, sampler, gar, loss_fn = tiny_setup()
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    it = iter(loader)
    next(it)  # skipped: no forward
    x, y = next(it)
    loss_fn(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match=r"1 batch\(es\) received from the tracked loader had"):
        gar.step()


def test_gar_refuses_ambiguous_forwards():
    model, sampler, gar, loss_fn = tiny_setup()
    it = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    (x, y), _ = next(it), next(it)
    for _ in range(3):
        loss_fn(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match=r"3 training forwards ran on the 2 batches"):
        gar.step()


def test_gar_over_an_untracked_loader_raises_and_says_what_to_add():
    model, sampler, gar, loss_fn = tiny_setup()
    x, y = next(iter(DataLoader(sampler.dataset, batch_sampler=sampler)))
    loss_fn(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match=r"loader = sampler.track\(loader\)"):
        gar.step()


def test_a_second_forward_of_the_same_batch_replaces_the_first():
    model, sampler, gar, loss_fn = tiny_setup()
    it = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    x, y = next(it)
    loss_fn(model(x), y).mean()  # a forward whose loss is never used
    loss_fn(model(x), y).mean().backward()
    gar.step()
    assert gar.metrics()["batches_rewarded"] == 1
    assert [h["batch"] for h in sampler.history[1:]] == [0]


# ------------------------------------------------------------------ Lightning


def test_lightning_loop_rewards_the_batch_it_trains_on(tmp_path):
    """Lightning iterates the tracked loader one batch at a time (a sized loader is not
    prefetched); rewards computed in training_step from the batch land on it."""
    import lightning.pytorch as pl

    s = make(batch_size=4)
    oracle = Oracle(s)
    held: list[bool] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            sid, idx = batch
            keys = s._records[s.last_batch].keys
            src, pos = s.decode(keys)
            held.append(torch.equal(src, sid) and torch.equal(pos, idx))
            s.update(reward_of(sid, idx))
            oracle.update(sid, idx)
            return (self.w**2).sum() + 0 * sid.float().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Module(), train_dataloaders=s.track(DataLoader(s.dataset, batch_sampler=s)))
    assert len(held) == 2 * len(s)
    assert all(held)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ every stack, slow matrix


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "prefetch", "persistent", "stop"),
    [
        (w, p, persistent, stop)
        for w, p, persistent, stop in itertools.product((0, 1, 2), (2, 4), (False, True), (None, 2))
        if w or (p == 2 and not persistent)
    ],
)
def test_attribution_matrix(workers, prefetch, persistent, stop):
    from torchdata.stateful_dataloader import StatefulDataLoader

    for cls in (DataLoader, StatefulDataLoader):
        s = make()
        kw = {"num_workers": workers}
        if workers:
            kw.update(prefetch_factor=prefetch, persistent_workers=persistent)
        check_loop(s, s.track(cls(s.dataset, batch_sampler=s, **kw)), epochs=3, stop=stop)
        s = make()
        prepared = Accelerator(cpu=True).prepare(DataLoader(s.dataset, batch_sampler=s, **kw))
        check_loop(s, s.track(prepared), epochs=3, stop=stop)


def test_attributes_written_on_the_tracked_loader_reach_the_dataloader():
    """Lightning's seed_everything(workers=True) sets worker_init_fn on the loader it is
    given: it must reach the DataLoader the workers are started from."""
    import functools

    from lightning.fabric.utilities.data import _auto_add_worker_init_fn
    from lightning.fabric.utilities.seed import pl_worker_init_function

    s = ad.GARSampler({"a": TensorDataset(torch.arange(8.0))}, batch_size=2, seed=0)
    loader = DataLoader(s.dataset, batch_sampler=s)
    tracked = s.track(loader)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PL_SEED_WORKERS", "1")
        _auto_add_worker_init_fn(tracked, rank=0)
    assert isinstance(loader.worker_init_fn, functools.partial)
    assert loader.worker_init_fn.func is pl_worker_init_function
    assert tracked.worker_init_fn is loader.worker_init_fn
    assert tracked.sampler is s  # its own fields stay its own
    assert tracked.iterable is loader


def test_a_tracked_loop_that_never_rewards_is_told_once():
    """A loop over the tracked loader with no gar.step() (a callback left out of the
    trainer's callbacks) would sample uniformly without a word."""
    s = ad.GARSampler(
        {"a": TensorDataset(torch.arange(64.0)), "b": TensorDataset(torch.arange(64.0))},
        batch_size=2,
        seed=0,
        reward_window=8,
    )
    loader = s.track(DataLoader(s.dataset, batch_sampler=s))
    with pytest.warns(UserWarning, match="none of them was rewarded: nothing calls update") as w:
        for _ in loader:
            pass
    assert len(w) == 1
    # Rewarding some batches (a budget's choice) is not silence.
    s2 = ad.GARSampler(
        {"a": TensorDataset(torch.arange(64.0)), "b": TensorDataset(torch.arange(64.0))},
        batch_size=2,
        seed=0,
        reward_window=8,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t, _ in enumerate(s2.track(DataLoader(s2.dataset, batch_sampler=s2))):
            if t % 20 == 0:
                s2.update(torch.ones(2))
        for _ in s2:  # an untracked pass is a plain sampler: no warning
            pass
