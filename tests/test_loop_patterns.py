"""The loop patterns users write around the one line: each learns as the plain loop does, or
raises or warns as docs/howto-gar.md ("When GAR learns nothing") says.

The task is docs/concepts.md's mixture (benchmarks/reference_choice.py): a clean source and a
random-label one, a clean held-out reference; every GAR default. The plain loop learns the
clean source; a pattern that must not change what GAR learns is compared with it weight for
weight.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import adaptive_data as ad

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(scope="module")
def task():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import reference_choice
    finally:
        sys.path.pop(0)
    return reference_choice.teacher_task(0)


def loop(task, pattern: str = "plain", epochs: int = 2, reward: str = "cosine", **kw: Any):
    """Train with ``pattern`` around ``gar.step()``; returns the sampler, GAR and the caught
    warnings (GAR's own)."""
    sources, target = task
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ad.GARSampler(sources, batch_size=32, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(target, batch_size=64, seed=0)
    other = target.tensors[0][:32]  # data of no source: an evaluation forward's
    scale = 2.0**70  # a GradScaler's scale after a long run without overflow
    gar = ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=LOSS, reward=reward, **kw)
    if pattern == "no_backward_zeros":  # .grad of zeros from an earlier phase of training
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    with warnings.catch_warnings(record=True) as caught, gar:
        warnings.simplefilter("always")
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=pattern != "no_backward_zeros")
                loss = LOSS(model(x), y).mean()
                if pattern == "nan_loss":
                    loss = loss * math.nan
                if pattern == "scaled":
                    loss = loss * scale
                if not pattern.startswith("no_backward"):
                    loss.backward()
                if pattern == "accuracy_forward":
                    (model(x).argmax(1) == y).float().mean()
                if pattern == "eval_forward_no_grad":
                    with torch.no_grad():
                        model(other)
                if pattern == "eval_forward_with_grad":
                    LOSS(model(other), y).mean()  # a validation loss, not backpropagated
                if pattern == "step_after_optimizer":
                    opt.step()
                gar.step()
                if pattern == "scaled":  # what GradScaler.step does: unscale, then step
                    for p in model.parameters():
                        p.grad /= scale
                if pattern != "step_after_optimizer":
                    opt.step()
    return sampler, gar, [w for w in caught if "batches GAR kept" in str(w.message)]


@pytest.fixture(scope="module")
def plain(task):
    sampler, gar, caught = loop(task)
    assert sampler.weights["clean"] > 0.9, sampler.weights
    assert gar.metrics()["batches_dropped"] == 0
    assert not caught
    return [h["weights"] for h in sampler.history]


@pytest.mark.parametrize(
    "pattern", ["accuracy_forward", "eval_forward_no_grad", "eval_forward_with_grad"]
)
def test_a_forward_the_loop_does_not_backpropagate_changes_nothing(task, plain, pattern):
    """A training-accuracy forward after the backward, an evaluation forward under no_grad or
    not: GAR rewards the forward whose loss was backpropagated, update for update as the
    plain loop (which the accuracy forward used to stop without a word)."""
    sampler, gar, caught = loop(task, pattern)
    assert [h["weights"] for h in sampler.history] == plain
    assert gar.metrics()["batches_dropped"] == 0
    assert not caught


def test_a_huge_loss_scale_gives_the_unscaled_cosine_rewards(task, plain):
    """A GradScaler's scale of 2^70 overflows the squared norms of finite gradients in
    float32: the rewards are computed from the gradients scaled back by a power of two, so
    the cosines (scale-free) and what the mixture learns are those of the unscaled loop."""
    sampler, _gar, caught = loop(task, "scaled")
    learned = [h["weights"] for h in sampler.history]
    assert len(learned) == len(plain)
    for a, b in zip(learned, plain, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert sampler.metrics()["nonfinite_rewards"] == 0
    assert not caught


def test_a_loop_without_backward_raises_at_step(task):
    with pytest.raises(RuntimeError, match=r"step\(\) was called before any backward\(\)"):
        loop(task, "no_backward")


def test_a_loop_without_backward_but_zeroed_grads_warns_once(task):
    """``zero_grad(set_to_none=False)`` leaves a .grad of zeros: no step raises, so the
    kept batches that no backward reached are counted and, past half of the last 20, one
    warning names the reason and its counter."""
    sampler, gar, caught = loop(task, "no_backward_zeros", epochs=1)
    m = gar.metrics()
    assert m["batches_rewarded"] == 0
    assert m["batches_dropped/no_backward"] == m["batches_dropped"] > 20
    assert len(caught) == 1
    assert "metrics()['batches_dropped/no_backward']" in str(caught[0].message)
    assert sampler.weights == {"clean": 0.5, "noisy": 0.5}


def test_a_nan_loss_warns_once_naming_the_skipped_steps(task):
    _sampler, gar, caught = loop(task, "nan_loss", epochs=1)
    m = gar.metrics()
    assert m["steps_skipped_nonfinite"] == m["steps"]
    assert m["batches_dropped/nonfinite_grad"] == m["batches_dropped"] > 20
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "20 of the last 20 batches GAR kept brought no reward" in message
    assert "the step's .grad held NaN or inf" in message


def test_nonfinite_rewards_are_counted_as_dropped_not_rewarded(task, monkeypatch):
    """Rewards that are all NaN or inf (the sampler drops them) count as dropped batches, by
    their reason, and warn like a non-finite gradient."""
    from adaptive_data.probe._keepers import GhostKeeper

    original = GhostKeeper.rewards

    def nan_rewards(self, kept, d, cosine):
        r = original(self, kept, d, cosine)
        return None if r is None else torch.full_like(r, math.nan)

    monkeypatch.setattr(GhostKeeper, "rewards", nan_rewards)
    sampler, gar, caught = loop(task, epochs=2)
    m = gar.metrics()
    assert m["batches_rewarded"] == 0
    assert m["batches_dropped/nonfinite_rewards"] == m["batches_dropped"] >= 20
    # every row given to the sampler was dropped there (every batch holds 16 rows or more)
    assert sampler.metrics()["rewards_applied"] == 0
    assert sampler.metrics()["nonfinite_rewards"] >= 16 * m["batches_dropped"]
    assert len(caught) == 1
    assert "every reward was NaN or inf" in str(caught[0].message)


def test_gar_step_after_the_optimizers_step_raises(task):
    with pytest.raises(RuntimeError, match=r"called after optimizer.step\(\)"):
        loop(task, "step_after_optimizer", epochs=1)


class Clipped(nn.Module):
    """A linear layer whose weight is clipped in place at each forward (as a Lipschitz
    constraint is kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight.clamp_(-0.2, 0.2)
        return self.linear(x)


def test_a_forward_that_edits_its_parameters_is_not_taken_for_an_optimizer_step():
    """The parameters' versions are read after the training forward: an in-place edit inside
    the forward is not an optimizer step between the forward and gar.step()."""
    torch.manual_seed(0)
    sources = {
        "a": torch.utils.data.TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,))),
        "b": torch.utils.data.TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,))),
    }
    model = Clipped()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = ad.GARSampler(sources, batch_size=5, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(sources["a"], batch_size=5, seed=0)
    with ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=LOSS) as gar:
        for x, y in loader:
            opt.zero_grad()
            LOSS(model(x), y).mean().backward()
            gar.step()
            opt.step()
    assert gar.metrics()["batches_rewarded"] == 8


def tiny_loop() -> tuple[nn.Module, Any, ad.GAR]:
    """A linear model, a mixture of two sources, a held-out GAR and the tracked loader's
    iterator."""
    sources = {
        "a": torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,))),
        "b": torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randint(0, 2, (10,))),
    }
    model = nn.Sequential(nn.Linear(4, 2))
    sampler = ad.GARSampler(sources, batch_size=5, seed=0)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    ref = ad.ReferenceBatches(sources["a"], batch_size=5, seed=0)
    return model, iter(loader), ad.GAR(model, sampler, reference=ref, loss_fn=LOSS)


def test_eval_mode_left_on_is_named():
    model, batches, gar = tiny_loop()
    model.eval()
    x, y = next(batches)
    LOSS(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match=r"in eval mode.*call model.train\(\)"):
        gar.step()


def test_a_forward_under_no_grad_only_is_named():
    model, batches, gar = tiny_loop()
    x, _ = next(batches)
    with torch.no_grad():
        model(x)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(RuntimeError, match=r"with gradients off \(torch.no_grad\(\)"):
        gar.step()


def test_gar_with_nothing_to_learn_says_so_and_computes_no_rewards():
    """One source and no augmentation policy that learns (the frozen GARTransform default,
    or none): one warning at construction, and no batch is kept or rewarded."""
    from tests.test_gar import Images, mlp

    model = mlp()
    frozen = ad.GARTransform(["Identity", "Rotate"])
    plain = Images(ad.GARTransform(["Identity"]))
    for source, transform, why in (
        (plain, None, "no GARTransform"),
        (Images(frozen), frozen, "policy is frozen"),
    ):
        sampler = ad.GARSampler(source, batch_size=4, seed=0, transform=transform)
        with pytest.warns(UserWarning, match=f"GAR has nothing to learn: .*{why}"):
            gar = ad.GAR(model, sampler)
        for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
            LOSS(model(x), y).mean().backward()
            assert gar.step() is None
        m = gar.metrics()
        assert m["steps"] == len(sampler)
        assert m["batches_rewarded"] == 0
        assert m["batches_dropped"] == 0
        assert gar._schedule.pending == []
    learning = ad.GARTransform(["Identity", "Rotate"], learn_ops=True)
    sampler = ad.GARSampler(Images(learning), batch_size=4, seed=0, transform=learning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad.GAR(model, sampler)  # learns the op policy: no warning
