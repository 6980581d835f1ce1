"""ReferenceBatches: endless, without replacement per pass, reproducible, resumable."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import IterableDataset, TensorDataset

from adaptive_data.sampling._reference import ReferenceBatches


def pairs(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 20),
    batch=st.integers(1, 25),
    seed=st.integers(0, 2**31),
    calls=st.integers(1, 8),
)
def test_each_pass_is_a_permutation(n, batch, seed, calls):
    ref = ReferenceBatches(pairs(n), batch, seed=seed)
    seen: list[int] = []
    for _ in range(calls):
        x, y = next(ref)
        assert x.shape == (batch, 1)
        assert y.shape == (batch,)
        assert torch.equal(x[:, 0].long(), y)
        seen += y.tolist()
    for start in range(0, len(seen) - n + 1, n):
        assert sorted(seen[start : start + n]) == list(range(n))
    assert ref.passes == pytest.approx(len(seen) / n)


def test_reproducible_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = [next(ReferenceBatches(pairs(10), 4, seed=1))[1].tolist() for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert a[0] == a[1]
    b = next(ReferenceBatches(pairs(10), 4, seed=2))[1].tolist()
    assert a[0] != b


def test_resume_gives_the_same_stream():
    ref = ReferenceBatches(pairs(7), 3, seed=0)
    full = [next(ref)[1].tolist() for _ in range(6)]
    first = ReferenceBatches(pairs(7), 3, seed=0)
    got = [next(first)[1].tolist() for _ in range(4)]
    second = ReferenceBatches(pairs(7), 3, seed=0)
    second.load_state_dict(first.state_dict())
    got += [next(second)[1].tolist() for _ in range(2)]
    assert got == full
    with pytest.raises(ValueError, match=r"saved for size=7, seed=0, but this stream has size=8"):
        ReferenceBatches(pairs(8), 3).load_state_dict(first.state_dict())


def test_uses_getitems_collate_and_device():
    import datasets

    ds = datasets.Dataset.from_dict({"x": [[float(i)] for i in range(5)], "y": list(range(5))})
    ds = ds.with_format("torch")

    def collate(examples):
        return torch.stack([e["x"] for e in examples]), torch.stack([e["y"] for e in examples])

    x, y = next(ReferenceBatches(ds, 3, collate_fn=collate, device="cpu"))
    assert x.shape == (3, 1)
    assert torch.equal(x[:, 0].long(), y)
    batch = next(ReferenceBatches(ds, 2))  # default_collate of dicts
    assert set(batch) == {"x", "y"}


class Stream(IterableDataset):
    def __iter__(self):
        yield 1


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((pairs(0), 2), {}, ValueError, r"dataset is empty \(len 0\)"),
        ((Stream(), 2), {}, TypeError, r"map-style .* but got Stream"),
        (
            (pairs(3), 0),
            {},
            ValueError,
            r"batch_size should be a positive integer value, but got batch_size=0",
        ),
        ((pairs(3), 2), {"seed": 1.5}, TypeError, r"seed should be an int, but got seed=1.5"),
        (
            (pairs(3), 2),
            {"collate_fn": 3},
            TypeError,
            r"collate_fn should be callable, but got int",
        ),
    ],
)
def test_bad_input_raises(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ReferenceBatches(*args, **kwargs)
