"""What GAR holds between steps: nothing of a batch once its rewards are computed or it is
dropped.

The gradient hooks GAR puts on a kept forward's outputs hold what they fill, and the autograd
graph holds the hooks; the loop's ``loss`` keeps that graph alive until its next forward. A
batch's inputs and output gradients must still be let go at ``step()``, or they stay in memory
through the next step's forward and reference pass (the peak memory of the defaults on a GPT-2
of 0.84M parameters was 1.25x a plain step's before, 1.18x after:
``benchmarks/lm_cost.py --memory``, docs/benchmark-log.md).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.probe import _fd
from adaptive_data.probe._keepers import KeptCall

from .test_gar import Images

LOSS = nn.CrossEntropyLoss(reduction="none")


def sources() -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return {
        "a": TensorDataset(x[:32], torch.randint(0, 3, (32,), generator=g)),
        "b": TensorDataset(x[32:], torch.randint(0, 3, (32,), generator=g)),
    }


def held() -> list[tuple[str, int]]:
    """Every kept call or fd record still alive that holds tensors: (kind, tensors held)."""
    gc.collect()
    out = []
    for obj in gc.get_objects():
        if type(obj) is KeptCall:
            n = len(obj.grads) + len(obj.call.versions) + (obj.call.args is not None)
            if n:
                out.append(("ghost", n))
        elif type(obj) is _fd.Kept:
            n = len(obj.grads) + len(obj.args) + len(obj.versions)
            if n:
                out.append(("fd", n))
    return out


def loop(**gar_kwargs):
    """A two-source mixture, a clean held-out reference and the exact GAR (every batch kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ad.GARSampler(sources(), batch_size=8, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(sources()["a"], batch_size=8, seed=0)
    gar = ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=LOSS, **gar_kwargs)
    return model, opt, loader, gar


@pytest.mark.parametrize("estimator", ["ghost", "fd"])
@pytest.mark.parametrize("again", [False, True], ids=["plain", "accuracy_forward"])
def test_nothing_of_a_rewarded_batch_is_held_after_its_step(estimator, again):
    reward = "dot" if estimator == "fd" else "cosine"
    model, opt, loader, gar = loop(estimator=estimator, reward=reward, budget=None)
    with gar:
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            loss = LOSS(model(x), y).mean()  # alive, with its graph, until the next forward
            loss.backward()
            if again:  # a second forward of the batch, not backpropagated
                (model(x).argmax(1) == y).float().mean()
            before = held()
            gar.step()
            opt.step()
            assert before, "the kept batch held nothing before its step: the check is void"
            assert held() == []
            if step == 3:
                break
    assert gar.metrics()["batches_rewarded"] == 4


def test_close_lets_go_of_a_batch_still_waiting():
    model, _, loader, gar = loop(budget=None)
    x, y = next(iter(loader))
    loss = LOSS(model(x), y).mean()
    loss.backward()  # no step: the batch waits
    assert held()
    gar.close()
    assert held() == []
    assert gar.metrics()["batches_dropped/closed"] == 1


def test_the_defaults_let_go_of_every_batch_in_a_loop():
    """The budget's defaults (its exact phase, then sparse batches, reused references and
    weighted updates): over 5 epochs of 8 steps nothing is held after any step."""
    model, opt, loader, gar = loop()
    with gar:
        for _ in range(5):
            for x, y in loader:
                opt.zero_grad()
                loss = LOSS(model(x), y).mean()
                loss.backward()
                gar.step()
                opt.step()
                assert held() == []
    m = gar.metrics()
    assert m["budget/exact_phase"] == 0.0  # the second phase was reached
    assert 16 < m["batches_rewarded"] < 40  # the exact phase's 16, then some


def test_the_next_batch_defaults_hold_only_the_batches_waiting_for_a_reference():
    """With the next batch as the reference a kept augmented batch waits for the next
    un-augmented batch's gradient: after each step only the batches still waiting are held
    (two across an epoch of odd length), and nothing once close() drops them. Over 12 epochs
    of 5 steps (the exact phase, then the budget's sparse batches) with a learning transform
    and its un-augmented reference batches."""
    torch.manual_seed(0)
    tf = ad.GARTransform(["Identity", "Invert"], learn_ops=True)
    sampler = ad.GARSampler(Images(tf), batch_size=8, seed=0, transform=tf)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    gar = ad.GAR(model, sampler, optimizer=opt)
    waited = 0
    for _ in range(12):
        for x, y in loader:
            opt.zero_grad()
            LOSS(model(x), y).mean().backward()
            gar.step()
            opt.step()
            pending = gar._schedule.pending
            assert len(pending) <= 2
            kept_calls = sum(1 for k in pending for c in k.calls if c.grads or c.call.args)
            waited += bool(kept_calls)
            step = gar.metrics()["steps"]
            if step % 3 == 0 or kept_calls:  # (a scan of every object takes a while)
                assert len(held()) == kept_calls
    m = gar.metrics()
    assert m["budget"] == 0.02
    assert m["budget/exact_phase"] == 0.0
    assert waited > 0
    assert m["batches_rewarded"] > 16
    gar.close()
    assert held() == []
