"""GARSampler over stream sources: Hugging Face and torch IterableDatasets, alone and mixed with
map-style sources. Every example says where it came from (source id, index in the stream), so
rewards computed from a batch's content expose misattribution, and the examples each worker
reads can be checked against the shards it owns."""

from __future__ import annotations

import itertools
import traceback
import warnings

import datasets
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

import adaptive_data as ad
from adaptive_data.sampling._sampler import MixtureDataset

from .test_sampler import Oracle, reward_of


def rows(sid: int, n: int) -> dict[str, list[int]]:
    return {"sid": [sid] * n, "idx": list(range(n))}


def hf_stream(sid: int, n: int, shards: int):
    """A Hugging Face stream of ``n`` examples in ``shards`` contiguous shards."""
    ds = datasets.Dataset.from_dict(rows(sid, n))
    return ds.to_iterable_dataset(num_shards=shards).with_format("torch")


def hf_map(sid: int, n: int):
    return datasets.Dataset.from_dict(rows(sid, n)).with_format("torch")


class TorchStream(IterableDataset):
    """A torch stream that follows the DataLoader contract: worker w of W reads w, w + W, ..."""

    def __init__(self, sid: int, n: int) -> None:
        self.sid, self.n = sid, n

    def __iter__(self):
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(first, self.n, step):
            yield {"sid": torch.tensor(self.sid), "idx": torch.tensor(i)}


def hf_order(n: int, shards: int, worker: int, workers: int) -> list[int]:
    """The examples worker ``worker`` of ``workers`` reads from ``hf_stream(_, n, shards)``, in
    order: Hugging Face gives it the shards worker, worker + workers, ... (contiguous blocks)."""
    bounds = [len(b) for b in torch.arange(n).tensor_split(shards)]
    starts = list(itertools.accumulate([0, *bounds]))
    return [
        i for k in range(worker, shards, max(workers, 1)) for i in range(starts[k], starts[k + 1])
    ]


def collate(examples):
    """Collate in the worker and say which worker read the batch (-1: the main process)."""
    info = get_worker_info()
    return default_collate(examples), -1 if info is None else info.id


def loop(s: ad.GARSampler, loader, epochs: int = 1, stop: int | None = None, oracle=None):
    """The user's loop: content-based rewards of the batch just received. Checks that the
    sampler's record of the batch has the sources its content has. Returns (worker, source ids,
    indices) per batch."""
    seen = []
    for _ in range(epochs):
        for t, (batch, worker) in enumerate(loader):
            sid, idx = batch["sid"], batch["idx"]
            held, index = s.decode(s._records[s.last_batch].keys)
            assert torch.equal(held, sid)
            streams = torch.tensor(s._iterations._is_stream)[held]
            assert (index[streams] == -1).all()
            s.update(reward_of(sid, idx))
            if oracle is not None:
                oracle.update(sid, idx)
            seen.append((worker, sid.tolist(), idx.tolist()))
            if stop is not None and t == stop:
                break
    return seen


def read_by(seen, worker: int, sid: int) -> list[int]:
    return [i for w, ss, ii in seen if w == worker for s, i in zip(ss, ii, strict=True) if s == sid]


def raises(error, match: str, fn, *args, **kw) -> None:
    """``pytest.raises`` around ``fn(*args, **kw)``, then free the loader's iterator that the
    traceback's frames hold, so that its workers are shut down now, while their queues are alive
    (a later garbage collection waits 5 s per worker for them)."""
    with pytest.raises(error, match=match) as info:
        fn(*args, **kw)
    traceback.clear_frames(info.tb)
    del info, fn, args, kw  # this frame is in the traceback too: it holds none of them now


def loader_for(s: ad.GARSampler, workers: int, cls=DataLoader, **kw):
    if workers:
        kw.update(num_workers=workers, persistent_workers=True)
    return s.track(cls(s.dataset, batch_sampler=s, collate_fn=collate, **kw))


# ------------------------------------------------------------------ reading and attribution


@pytest.mark.parametrize("workers", [0, 2])
def test_streams_and_a_map_source_through_workers(workers):
    """A Hugging Face stream, a torch stream and a map-style source: rewards land on the batch
    they were computed from (the weights equal the oracle's), each worker reads exactly its own
    shard of each stream in order, restarting it when it ends, and map-style examples keep
    their without-replacement order."""
    sources = {
        "hf": hf_stream(0, 22, shards=4),
        "map": hf_map(1, 13),
        "torch": TorchStream(2, 9),
    }
    s = ad.GARSampler(sources, batch_size=5, seed=0, num_batches=6, lr=0.7)
    oracle = Oracle(s)
    seen = loop(s, loader_for(s, workers), epochs=3, oracle=oracle)
    assert torch.allclose(s.policy.probs, oracle.policy.probs, rtol=0, atol=1e-12)
    assert s.metrics()["updates"] == 18
    for w in [-1] if workers == 0 else range(workers):
        hf = read_by(seen, w, 0)
        mine = hf_order(22, 4, max(w, 0), workers)
        assert hf == list(itertools.islice(itertools.cycle(mine), len(hf)))
        tr = read_by(seen, w, 2)
        mine = list(range(max(w, 0), 9, max(workers, 1)))
        assert tr == list(itertools.islice(itertools.cycle(mine), len(tr)))
    assert max(len(read_by(seen, w, 0)) for w in range(-1, workers)) > 11  # a restart happened
    m = [i for _, ss, ii in seen for sid, i in zip(ss, ii, strict=True) if sid == 1]
    for start in range(0, len(m) - 13 + 1, 13):  # each pass over the map source a permutation
        assert sorted(m[start : start + 13]) == list(range(13))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("shards", "world", "batch"), [(8, 2, 3), (4, 3, 2)])
def test_ranks_read_disjoint_shards_of_a_stream(workers, shards, world, batch):
    """Simulated ranks (split_dataset_by_node semantics) and their workers read disjoint parts
    of a stream, each part once, whose union is the stream: when the shards divide among the
    ranks (each rank reads its shards) and when they do not (each rank keeps every
    world-th example). Each (rank, worker) reads exactly its part's size here."""
    parts: dict[tuple[int, int], list[int]] = {}
    for rank in range(world):
        s = ad.GARSampler(
            {"a": hf_stream(0, 24, shards)}, batch_size=batch, seed=0, num_batches=4,
            rank=rank, world_size=world,
        )  # fmt: skip
        for w, _, idx in loop(s, loader_for(s, workers)):
            parts.setdefault((rank, w), []).extend(idx)
    assert len(parts) == world * max(workers, 1)
    assert all(len(set(p)) == len(p) for p in parts.values())  # no repeat
    assert sorted(i for p in parts.values() for i in p) == list(range(24))  # disjoint, all


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_end_restarts_or_raises(workers):
    shard = 6 if workers == 0 else 3

    def make(on_end):
        return ad.GARSampler(
            {"a": hf_stream(0, 6, shards=2)}, batch_size=4, seed=0, num_batches=4,
            on_stream_end=on_end,
        )  # fmt: skip

    s = make("restart")
    seen = loop(s, loader_for(s, workers))
    for w in [-1] if workers == 0 else range(workers):
        got = read_by(seen, w, 0)
        mine = hf_order(6, 2, max(w, 0), workers)
        assert got == list(itertools.islice(itertools.cycle(mine), len(got)))
        assert len(got) > len(mine)
    s = make("raise")
    where = "the main process" if workers == 0 else "DataLoader worker 0 of 2"
    match = rf"stream 'a' ended after {shard} examples in {where} \(pass 0\) and on_stream_end"
    raises(RuntimeError, match, loop, s, loader_for(s, workers))


# ------------------------------------------------------------------ resume


def mixed_sources():
    return {"hf": hf_stream(0, 14, shards=2), "map": hf_map(1, 11), "torch": TorchStream(2, 7)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_stream_under_stateful_dataloader(workers):
    """A checkpoint (the loader's state and the sampler's) in the middle of the second epoch,
    after streams were restarted: the resumed run reads the same examples in the same order,
    and ends with the same weights, as an uninterrupted one with the same worker count."""

    def make():
        return ad.GARSampler(mixed_sources(), batch_size=4, seed=0, num_batches=6, lr=0.7)

    full = make()
    expected = loop(full, loader_for(full, workers, StatefulDataLoader), epochs=3)
    first = make()
    loader = loader_for(first, workers, StatefulDataLoader)
    got = loop(first, loader, epochs=1)
    got += loop(first, loader, epochs=1, stop=3)
    state = {"loader": loader.state_dict(), "sampler": first.state_dict()}
    # The checkpoint falls inside a pass of each stream in some process, after a restart.
    ws = [-1] if workers == 0 else range(workers)
    hf = [(len(read_by(got, w, 0)), len(hf_order(14, 2, max(w, 0), workers))) for w in ws]
    tr = [(len(read_by(got, w, 2)), len(range(max(w, 0), 7, max(workers, 1)))) for w in ws]
    assert any(n % part for n, part in hf)
    assert any(n % part for n, part in tr)
    assert any(n > part for n, part in hf)
    del loader
    second = make()
    loader = loader_for(second, workers, StatefulDataLoader)
    loader.load_state_dict(state["loader"])
    second.load_state_dict(state["sampler"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got += loop(second, loader, epochs=2)
    assert got == expected
    assert second.weights == full.weights


@pytest.mark.parametrize(("workers", "save_sampler"), [(0, False), (2, True)])
def test_resume_between_epochs_under_stateful_dataloader(workers, save_sampler):
    """A checkpoint after an epoch's loop: the restored, finished iterator reads nothing from
    the streams, and the next epochs read what the uninterrupted run read. With no workers the
    loader's state alone resumes (the streams' places are in it)."""

    def make():
        return ad.GARSampler(mixed_sources(), batch_size=4, seed=0, num_batches=5, lr=0.3)

    full = make()
    expected = loop(full, loader_for(full, workers, StatefulDataLoader), epochs=3)
    first = make()
    loader = loader_for(first, workers, StatefulDataLoader)
    got = loop(first, loader, epochs=1)
    state = {"loader": loader.state_dict(), "sampler": first.state_dict() if save_sampler else None}
    del loader
    second = make()
    loader = loader_for(second, workers, StatefulDataLoader)
    loader.load_state_dict(state["loader"])
    if save_sampler:
        second.load_state_dict(state["sampler"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got += loop(second, loader, epochs=2)
    assert got == expected
    assert second.weights == full.weights


def test_resume_without_the_workers_places_in_the_streams_is_refused():
    """A plain DataLoader cannot restore where the streams stood: reading them afresh would
    repeat examples, so the first read raises."""
    s = ad.GARSampler(mixed_sources(), batch_size=4, seed=0, num_batches=6)
    loop(s, loader_for(s, 0), stop=2)
    state = s.state_dict()
    again = ad.GARSampler(mixed_sources(), batch_size=4, seed=0, num_batches=6)
    again.load_state_dict(state)
    raises(
        RuntimeError,
        r"stream '\w+' was read elsewhere before the main process began",
        loop,
        again,
        loader_for(again, 0),
    )


def test_new_workers_after_a_stream_was_read_are_refused():
    """Workers that start after a stream was read (a loader with non-persistent workers, not
    tracked, in its second epoch), or the main process after workers read it (another loader
    over the same sampler), have no place in it: they raise instead of repeating it."""
    s = ad.GARSampler({"a": hf_stream(0, 40, shards=2)}, batch_size=4, seed=0, num_batches=2)
    loader = DataLoader(s.dataset, batch_sampler=s, num_workers=2)
    assert len([b for b in loader]) == 2
    raises(RuntimeError, r"stream 'a' was read elsewhere before DataLoader worker \d", list, loader)
    # ... and so does the main process, after workers read the stream (another loader)
    s = ad.GARSampler({"a": hf_stream(0, 40, shards=2)}, batch_size=4, seed=0, num_batches=2)
    persistent = DataLoader(s.dataset, batch_sampler=s, num_workers=2, persistent_workers=True)
    assert len(list(persistent)) == 2
    del persistent
    match = r"stream 'a' was read elsewhere before the main process began reading it"
    raises(RuntimeError, match, list, DataLoader(s.dataset, batch_sampler=s))


# ------------------------------------------------------------------ bad input


def test_bad_stream_input_raises():
    stream = {"m": hf_map(0, 8), "a": hf_stream(1, 8, shards=2)}
    with pytest.raises(ValueError, match=r"num_batches is required when a source is a stream"):
        ad.GARSampler(stream, batch_size=2)
    with pytest.raises(ValueError, match=r"num_batches is required .*\(source\(s\) \['0'\]\)"):
        ad.GARSampler(TorchStream(0, 4), batch_size=2)
    with pytest.raises(ValueError, match=r"transform= is not supported with stream sources"):
        ad.GARSampler(stream, batch_size=2, num_batches=2, transform=ad.GARTransform())
    with pytest.raises(ValueError, match=r"weights='proportional' needs the size of every"):
        ad.GARSampler(stream, batch_size=2, num_batches=2, weights="proportional")
    with pytest.raises(ValueError, match=r"on_stream_end should be one of \['restart', 'raise'\]"):
        ad.GARSampler(stream, batch_size=2, num_batches=2, on_stream_end="stop")
    with pytest.raises(TypeError, match=r"source 'a' is a stream: .* GARSampler"):
        MixtureDataset(list(stream.values()), list(stream))
    s = ad.GARSampler(stream, batch_size=2, num_batches=2)
    with pytest.raises(ValueError, match=r"num_workers=2 and persistent_workers=False"):
        s.track(DataLoader(s.dataset, batch_sampler=s, num_workers=2))
    state = s.state_dict()
    del state["stream_first_batch"]
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['stream_first_batch'\]"):
        ad.GARSampler(stream, batch_size=2, num_batches=2).load_state_dict(state)
    other = ad.GARSampler({"m": hf_map(0, 8), "b": hf_stream(1, 8, 2)}, batch_size=2, num_batches=2)
    with pytest.raises(ValueError, match=r"state holds the streams \['b'\], but .* are \['a'\]"):
        s.dataset.load_state_dict(other.dataset.state_dict())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_that_yields_nothing_is_named(workers):
    s = ad.GARSampler(
        {"m": hf_map(0, 8), "empty": TorchStream(1, 0)}, batch_size=8, seed=0, num_batches=2
    )
    where = "the main process" if workers == 0 else r"DataLoader worker 0 of 2"
    raises(
        ValueError,
        rf"stream 'empty' yielded no example in {where}",
        loop,
        s,
        loader_for(s, workers),
    )


def test_a_stream_with_fewer_shards_than_workers_is_refused():
    s = ad.GARSampler({"a": hf_stream(0, 8, shards=1)}, batch_size=2, seed=0, num_batches=2)
    match = r"stream 'a' has 1 shard\(s\), fewer than the DataLoader's 2 workers"
    raises(ValueError, match, loop, s, loader_for(s, 2))


def test_an_iterable_dataset_dict_is_a_mixture_of_streams():
    dd = datasets.IterableDatasetDict(
        {"x": hf_stream(1, 10, shards=2), "y": hf_stream(0, 10, shards=2)}
    )
    s = ad.GARSampler(dd, batch_size=4, seed=0, num_batches=2, names=["y", "x"])
    assert s.names == ["y", "x"]
    assert s.sizes == [None, None]
    seen = loop(s, loader_for(s, 0))
    assert sum(len(ss) for _, ss, _ in seen) == 8


def test_one_line_gar_learns_over_a_stream_and_a_map_style_source():
    """The one-line GAR with a held-out reference over a stream mixed with a map-style source
    (through workers): every received batch is paired with its forward and rewarded, and the
    source whose labels match the reference's wins."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g)

    def split(n: int, noisy: bool) -> dict[str, list]:
        x = torch.randn(n, 6, generator=g)
        y = torch.randint(0, 3, (n,), generator=g) if noisy else (x @ w).argmax(1)
        return {"x": x.tolist(), "y": y.tolist()}

    clean = datasets.Dataset.from_dict(split(400, False)).to_iterable_dataset(num_shards=4)
    noisy = datasets.Dataset.from_dict(split(400, True)).with_format("torch")
    held_out = datasets.Dataset.from_dict(split(64, False)).with_format("torch")
    sampler = ad.GARSampler(
        {"clean": clean.with_format("torch"), "noisy": noisy}, batch_size=16, seed=0, num_batches=30
    )

    def pair(examples):
        return torch.stack([e["x"] for e in examples]), torch.stack([e["y"] for e in examples])

    loader = sampler.track(
        DataLoader(
            sampler.dataset,
            batch_sampler=sampler,
            collate_fn=pair,
            num_workers=2,
            persistent_workers=True,
        )
    )
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    ref = ad.ReferenceBatches(held_out, 32, seed=0, collate_fn=pair)
    with ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=loss_fn) as gar:
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).mean().backward()
                gar.step()
                opt.step()
        # every batch while the evidence is thin, then a share within the budget, each kept
        # batch's update weighted by the steps since the last one
        m = gar.metrics()
        assert m["budget/exact_phase"] == 0.0
        assert 16 < m["batches_rewarded"] < 40
    assert sampler.weights["clean"] > 0.8
