"""GAR, the one-line integration: rewards against oracles, batches rewarded, hooks, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

import adaptive_data as ad
from adaptive_data.probe._precondition import precondition

# GAR over one source as a harness for its rewards (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_source_rewards")

LOSS = nn.CrossEntropyLoss(reduction="none")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(inplace=True), nn.Linear(16, 5)
    )


def cnn(bn: bool = False) -> nn.Module:
    norm = nn.BatchNorm2d(6) if bn else nn.GroupNorm(2, 6)
    return nn.Sequential(
        nn.Unflatten(1, (3, 2, 2)),
        nn.Conv2d(3, 6, 2, padding=1),
        norm,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 9, 5),
    )


def data(n: int = 60, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g))


def snapshot(factory, model: nn.Module) -> nn.Module:
    """A hook-free copy of ``model`` at its current parameters."""
    copy = factory()
    copy.load_state_dict(model.state_dict())
    copy.train(model.training)
    return copy


class Shift(nn.Module):
    """A bare parameter: no ghost rule covers it, so its share is a JVP replay of its forward
    inside step(), which GAR must not keep as part of the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b


def shifted() -> nn.Module:
    return nn.Sequential(Shift(), nn.Linear(12, 5))


def optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# (model, reward): the bare parameter of ``shifted`` takes the generic per-example rule
MODELS_REWARDS = [
    pytest.param(factory, reward, id=f"{factory.__name__}-{reward}")
    for factory in (mlp, cnn, shifted)
    for reward in ("dot", "cosine")
]


@pytest.mark.parametrize(("factory", "reward"), MODELS_REWARDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_next_batch_rewards_equal_the_per_sample_oracle(factory, reward, reduction, opt_kind):
    """Batch t's rewards at step t+1 are <g_i(theta_t), P grad(batch t+1 at theta_t+1)>."""
    torch.manual_seed(0)
    model = factory()
    opt = optimizer(opt_kind, model)
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    gar = ad.GAR(model, sampler, optimizer=opt, reward=reward, budget=None)
    previous = None
    checked = 0
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        losses = LOSS(model(x), y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        params = dict(model.named_parameters())
        d = precondition({n: p.grad.clone() for n, p in params.items()}, params, opt)
        r = gar.step()
        if previous is None:
            assert r is None
        else:
            old, px, py = previous
            oracle = ad.GradientProbe(old, LOSS, estimator="per_sample", reward=reward)(
                px, py, direction=d
            )
            if reward == "dot" and reduction == "mean":
                oracle = oracle / len(px)  # the kept gradients are those of the mean loss
            torch.testing.assert_close(r, oracle, rtol=2e-4, atol=1e-6)
            checked += 1
        previous = (snapshot(factory, model), x, y)
        opt.step()
    assert checked == len(sampler) - 1
    assert gar.metrics()["batches_rewarded"] == checked
    assert sampler.metrics()["batches_rewarded"] == checked


def test_batchnorm_in_train_mode_sums_to_the_batch_directional_derivative():
    """With BatchNorm's batch statistics the examples are coupled; the sum is still exact."""
    torch.manual_seed(0)
    model = cnn(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    gar = ad.GAR(model, sampler, reward="dot", budget=None)
    previous_grad = None
    checked = 0
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        opt.zero_grad()
        LOSS(model(x), y).sum().backward()
        grad = {n: p.grad.clone() for n, p in model.named_parameters()}
        r = gar.step()
        if previous_grad is not None:
            expected = sum(float((previous_grad[n] * grad[n]).sum()) for n in grad)
            assert float(r.sum()) == pytest.approx(expected, rel=1e-4)
            checked += 1
        previous_grad = grad
        opt.step()
    assert checked > 3


@pytest.mark.parametrize("reward", ["dot", "cosine"])
def test_held_out_reference_equals_the_probe(reward):
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = data(16, seed=5).tensors
    sampler = ad.GARSampler(data(), batch_size=6, seed=0)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reward=reward,
        reference=itertools.repeat(ref),
        loss_fn=LOSS,
        budget=None,
    )
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
        oracle = ad.GradientProbe(snapshot(mlp, model), LOSS, reward=reward)(x, y, reference=ref)
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        r = gar.step()
        if reward == "dot":
            oracle = oracle / len(x)
        torch.testing.assert_close(r, oracle, rtol=2e-4, atol=1e-6)
        # the reference pass leaves .grad as the loop's backward left it
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
        opt.step()
    assert sampler.metrics()["batches_rewarded"] == len(sampler)


def run(model, sampler, gar, epochs=1, accumulate=1, **loader_kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, **loader_kw))
    for _ in range(epochs):
        for t, (x, y) in enumerate(loader):
            LOSS(model(x), y).mean().backward()
            if (t + 1) % accumulate == 0:
                gar.step()
                opt.step()
                opt.zero_grad()


def test_every_k_rewards_every_kth_batch():
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)  # 12 batches
    gar = ad.GAR(model, sampler, every=3, budget=None)
    run(model, sampler, gar)
    rewarded = [h["batch"] for h in sampler.history[1:]]
    assert rewarded == [0, 3, 6, 9]


def test_the_default_budget_is_smaller_with_the_next_batch_as_the_reference():
    """budget="auto" stands for 0.02 with the next batch (an augmentation policy) and 0.1 with
    a held-out reference; after the exact phase the next-batch default keeps fewer batches
    than budget=0.1, and a number given is kept as it is."""
    from adaptive_data.gar._budget import NEXT_BATCH_BUDGET, WARMUP

    rewarded = {}
    for budget in ("auto", 0.1):
        torch.manual_seed(0)
        model = mlp()
        sampler = ad.GARSampler(data(), batch_size=5, seed=0)  # 12 batches an epoch
        gar = ad.GAR(model, sampler, budget=budget)
        assert gar.budget == gar.metrics()["budget"] == (0.1 if budget == 0.1 else 0.02)
        run(model, sampler, gar, epochs=10)
        m = gar.metrics()
        assert m["budget/exact_phase"] == 0.0
        rewarded[budget] = m["batches_rewarded"] - WARMUP
        gar.close()
    assert NEXT_BATCH_BUDGET == 0.02
    assert "budget=0.02" in repr(ad.GAR(mlp(), ad.GARSampler(data(), batch_size=5)))
    assert 0 < rewarded["auto"] < rewarded[0.1] / 2


def test_a_next_batch_state_saved_when_auto_stood_for_0_1_names_the_budget_to_pass():
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    old = ad.GAR(model, sampler, budget=0.1)  # what budget="auto" was with the next batch
    run(model, sampler, old)
    state = old.state_dict()
    old.close()
    gar = ad.GAR(model, sampler)
    with pytest.raises(
        ValueError,
        match=r"state has budget=0.1, but this GAR has budget=0.02 \(budget=\"auto\" stood "
        r"for 0.1 with the next batch before it stood for 0.02: pass budget=0.1 to resume",
    ):
        gar.load_state_dict(state)
    gar.close()
    ad.GAR(model, sampler, budget=0.1).load_state_dict(state)


@pytest.mark.parametrize("budget", [None, "auto"])
def test_a_parameter_frozen_after_construction_is_refused_at_the_next_kept_batch(budget):
    """step() checks the trainable parameters whenever a batch is kept (the rewards use
    them); in the budget's sparse phase a step with nothing kept skips that walk of the
    modules, and the next kept batch's step raises."""
    torch.manual_seed(0)
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    gar = ad.GAR(model, sampler, budget=budget)
    run(model, sampler, gar, epochs=2 if budget is None else 6)
    kept_before = gar.metrics()["batches_rewarded"]
    model[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"trainable parameters changed since this GAR"):
        run(model, sampler, gar, epochs=10)  # a batch of 5 is kept about once in 50 steps
    if budget is not None:  # the sparse phase: not every step keeps a batch
        assert gar.metrics()["budget/exact_phase"] == 0.0
    assert gar.metrics()["batches_rewarded"] == kept_before


def test_gradient_accumulation_rewards_every_micro_batch_against_the_accumulated_gradient():
    model = mlp()
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)  # 12 batches, 6 steps of 2
    gar = ad.GAR(model, sampler, reward="dot", budget=None)
    run(model, sampler, gar, accumulate=2)
    rewarded = [h["batch"] for h in sampler.history[1:]]
    assert rewarded == list(range(10))  # the last step's two micro-batches wait for a next


def test_the_last_batch_of_an_epoch_is_rewarded_in_the_next_or_dropped_by_close():
    model = mlp()
    sampler = ad.GARSampler(data(30), batch_size=10, seed=0)  # 3 batches per epoch
    gar = ad.GAR(model, sampler, budget=None)
    run(model, sampler, gar, epochs=2)
    assert [h["batch"] for h in sampler.history[1:]] == [0, 1, 2, 3, 4]
    gar.close()
    assert gar.metrics()["batches_dropped"] == 1


class Images:
    """40 tiny uint8 images through ``tf``, flattened for the MLP."""

    def __init__(self, tf: ad.GARTransform) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (40, 3, 2, 2), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, 5, (40,), generator=g)
        self.tf = v2.Compose([tf, v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return self.tf(self.x[i]).flatten(), int(self.y[i])


def test_reference_batches_of_a_transform_are_not_rewarded():
    tf = ad.GARTransform(["Identity", "Invert"])
    model = mlp()
    sampler = ad.GARSampler(Images(tf), batch_size=5, seed=0, transform=tf, reference_every=2)
    gar = ad.GAR(model, sampler, budget=None)
    run(model, sampler, gar)
    rewarded = [h["batch"] for h in sampler.history[1:]]
    assert rewarded == [0, 2, 4, 6]  # positions 1, 3, 5, 7; positions 2, 4, ... are references
    m = sampler.metrics()
    assert m["augment/updates"] == 4
    assert m["augment/reference_batches_skipped"] == 0


def test_every_k_counts_augmented_batches_across_odd_length_epochs():
    """every=2 with reference_every=2 and epochs of 7 batches (positions 1, 3, 5, 7
    augmented): every other augmented batch is rewarded in every epoch. Counting steps would
    keep only reference batches (even positions) in the second epoch and reward nothing."""
    tf = ad.GARTransform(["Identity", "Invert"])
    model = mlp()
    sampler = ad.GARSampler(
        Images(tf), batch_size=5, seed=0, transform=tf, reference_every=2, num_batches=7
    )
    gar = ad.GAR(model, sampler, every=2, budget=None)
    run(model, sampler, gar, epochs=3)  # batch ids 0-6, 7-13, 14-20
    rewarded = [h["batch"] for h in sampler.history[1:]]
    # augmented ids: 0 2 4 6 | 7 9 11 13 | 14 16 18 20; every other one is kept (6 is rewarded
    # against the next epoch's first reference batch, id 8)
    assert rewarded == [0, 4, 7, 11, 14, 18]


def test_augmented_batches_wait_for_the_next_reference_batch():
    """reference_every=3: positions 1 and 2 are both rewarded against position 3's gradient,
    never against each other; the epoch's last two wait for a reference that never comes."""
    tf = ad.GARTransform(["Identity", "Invert"])
    torch.manual_seed(0)
    model = mlp()
    sampler = ad.GARSampler(Images(tf), batch_size=5, seed=0, transform=tf, reference_every=3)
    gar = ad.GAR(model, sampler, budget=None)  # no optimizer: D is the plain gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):  # 8 batches
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        d = {n: p.grad.clone() for n, p in model.named_parameters()}
        r = gar.step()
        if sampler.is_reference(sampler.last_batch):
            # the last batch rewarded is the one just before this reference batch
            old, px, py = seen[-1]
            oracle = ad.GradientProbe(old, LOSS, estimator="per_sample", reward="cosine")(
                px, py, direction=d
            )
            torch.testing.assert_close(r, oracle, rtol=2e-4, atol=1e-6)
        else:
            assert r is None
        seen.append((snapshot(mlp, model), x, y))
        opt.step()
    assert [h["batch"] for h in sampler.history[1:]] == [0, 1, 3, 4]
    gar.close()
    assert gar.metrics()["batches_dropped"] == 2  # batches 6 and 7 (positions 7 and 8)


def test_batches_that_wait_longer_than_reference_every_are_dropped():
    """An epoch of 2 batches with reference_every=3 never draws a reference batch."""
    tf = ad.GARTransform(["Identity", "Invert"])
    model = mlp()
    sampler = ad.GARSampler(
        Images(tf), batch_size=5, seed=0, transform=tf, reference_every=3, num_batches=2
    )
    gar = ad.GAR(model, sampler, budget=None)
    run(model, sampler, gar, epochs=4)  # 8 steps, no reference batch
    assert gar.metrics()["batches_rewarded"] == 0
    # bounded: those of the last reference_every steps and the batch just kept, no older
    assert [g.step for g in gar._schedule.pending] == [4, 5, 6, 7]
    assert gar.metrics()["batches_dropped"] == 8 - len(gar._schedule.pending)


@pytest.fixture
def reference_choice(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/reference_choice.py: the mixture case of docs/concepts.md (clean and
    random-label sources, a clean held-out split) and its one-line GAR run."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reference_choice

    return reference_choice


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_line_gar_learns_the_mixture_from_a_held_out_reference(seed, reference_choice):
    """Every default, a trusted held-out reference: the clean source wins (from 0.5) in 3
    epochs (37 batches each), with every batch rewarded while the evidence is thin and a
    share of them within the budget afterwards."""
    run = reference_choice.run("held_out", seed, epochs=3)
    assert run["clean_weight"] > 0.9
    assert 2 <= run["updates"] < 3 * 37


@pytest.mark.slow
def test_one_line_gar_learns_the_mixture_on_twenty_seeds(reference_choice):
    weights = [reference_choice.run("held_out", s, epochs=3)["clean_weight"] for s in range(20)]
    assert min(weights) > 0.9, weights


def test_one_line_gar_refuses_a_mixture_without_a_trusted_reference(reference_choice):
    sources, _ = reference_choice.teacher_task(0)
    model = nn.Sequential(nn.Linear(16, 4))
    sampler = ad.GARSampler(sources, batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"mixture of 2 sources needs reference= batches"):
        ad.GAR(model, sampler, budget=None)


def hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_close_removes_every_hook_and_the_context_manager_closes():
    model = mlp()
    before = hooks(model)
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    with ad.GAR(model, sampler, budget=None) as gar:
        assert hooks(model) > before
        run(model, sampler, gar)
    assert hooks(model) == before
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\)"):
        gar.step()
    gar.close()  # idempotent


def test_ddp_wrapped_model_gives_the_same_rewards(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        runs = []
        for wrap in (False, True):
            torch.manual_seed(0)
            model = mlp()
            trained = nn.parallel.DistributedDataParallel(model) if wrap else model
            sampler = ad.GARSampler(data(), batch_size=6, seed=0)
            updates = []  # (batch id, rewards) of every update GAR makes
            original = sampler.update

            def record(rewards, batch=None, original=original, updates=updates):
                updates.append((batch, rewards.detach().clone()))
                original(rewards, batch=batch)

            sampler.update = record  # type: ignore[method-assign]
            gar = ad.GAR(trained, sampler, budget=None)
            run(trained, sampler, gar)
            runs.append((updates, sampler.history))
        (plain, plain_history), (wrapped, wrapped_history) = runs
        assert len(plain) == len(sampler) - 1  # every batch but the last was rewarded
        assert any(bool(r.abs().gt(1e-3).any()) for _, r in plain)  # and not with zeros
        assert [b for b, _ in wrapped] == [b for b, _ in plain]
        for (_, a), (_, b) in zip(plain, wrapped, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert wrapped_history == plain_history
        assert plain_history[-1] != plain_history[0]  # the mixture moved
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ bad input


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(12, 5))

    def forward(self, x):
        return x @ self.w


def test_bad_input_raises():
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    model = mlp()
    with pytest.raises(ValueError, match=r"GAR found no layer it covers in Bare"):
        ad.GAR(Bare(), sampler, budget=None)
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer owns none of the model's trainable"):
        ad.GAR(model, sampler, optimizer=other, budget=None)
    with pytest.raises(ValueError, match=r"every=0"):
        ad.GAR(model, sampler, every=0, budget=None)
    with pytest.raises(ValueError, match=r"reward='l2'"):
        ad.GAR(model, sampler, reward="l2", budget=None)
    with pytest.raises(ValueError, match=r"reference= needs loss_fn"):
        ad.GAR(model, sampler, reference=iter([]), budget=None)
    with pytest.raises(TypeError, match=r"sampler should be a GARSampler, but got list"):
        ad.GAR(model, [], budget=None)


def test_step_before_any_backward_raises():
    model = mlp()
    gar = ad.GAR(model, ad.GARSampler(data(), batch_size=5, seed=0), budget=None)
    with pytest.raises(RuntimeError, match=r"before any backward\(\)"):
        gar.step()


def test_workers_and_epochs_reward_the_right_batches():
    """With prefetching workers the batch t rewarded at step t+1 is still the one trained on:
    a per_sample oracle on the batch the loop received at step t agrees."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ad.GARSampler(data(30), batch_size=6, seed=0)  # 5 batches per epoch
    gar = ad.GAR(model, sampler, reward="cosine", budget=None)
    loader = sampler.track(
        DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    )
    previous = None
    checked = 0
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            LOSS(model(x), y).mean().backward()
            d = {n: p.grad.clone() for n, p in model.named_parameters()}
            r = gar.step()
            if previous is not None:
                old, px, py = previous
                oracle = ad.GradientProbe(old, LOSS, estimator="per_sample", reward="cosine")(
                    px, py, direction=d
                )
                torch.testing.assert_close(r, oracle, rtol=2e-4, atol=1e-6)
                checked += 1
            previous = (snapshot(mlp, model), x, y)
            opt.step()
    assert checked == 9  # every batch but the very last, across the epoch boundary too


def test_the_next_batch_defaults_learn_through_four_prefetching_workers():
    """What an augmentation script runs: a learning transform, GAR with every default
    (budget 0.02), num_workers=4 and prefetch_factor=2 (the default lag fits that loader),
    over 24 epochs: the exact phase, then sparse weighted updates, each one reaching the
    policy; the same run without workers draws the same batches and learns the same policy
    once the lag is explicit."""

    def run_with(workers: int, lag: int | None) -> tuple[list[int], dict[str, float], int]:
        torch.manual_seed(0)
        tf = ad.GARTransform(["Identity", "Invert"], learn_ops=True)
        sampler = ad.GARSampler(Images(tf), batch_size=8, seed=0, transform=tf, lag=lag)
        model = mlp()
        kw = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
        with ad.GAR(model, sampler) as gar:
            run(model, sampler, gar, epochs=24, **kw)
            m = gar.metrics()
        assert m["budget/exact_phase"] == 0.0
        assert m["batches_rewarded"] > 16
        assert tf.policy.metrics()["updates"] == m["batches_rewarded"]
        rewarded = [h["batch"] for h in sampler.history[1:]]
        return rewarded, tf.policy.op_weights, int(m["batches_rewarded"])

    run_with(4, None)  # the default lag
    rewarded, weights, n = run_with(4, 12)
    again, weights0, n0 = run_with(0, 12)
    assert (rewarded, n) == (again, n0)
    assert weights == pytest.approx(weights0, abs=1e-6)


# ------------------------------------------------------------------ resume


def resumable_run(
    kind: str, stop: int | None, total: int, state: dict | None = None
) -> tuple[dict, list[int], list[torch.Tensor]]:
    """Train ``total`` steps of a GAR run; at step ``stop`` return a checkpoint of everything
    (model, optimizer, sampler, GAR). With ``state``, resume from it first. ``kind``:
    ``"held_out"`` (a mixture, every=2), ``"held_out_refresh"`` (a mixture, every step, the
    reference gradient reused for 3 steps) or ``"augment"`` (a transform's reference batches,
    next-batch mode, every=2). Returns (checkpoint or {}, rewarded batch ids, parameters)."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "held_out":
        sources = {"a": data(40, seed=1), "b": data(35, seed=2)}
        sampler = ad.GARSampler(sources, batch_size=6, seed=0, num_batches=5)
        ref = ad.ReferenceBatches(data(30, seed=3), 8, seed=0)
        gar = ad.GAR(
            model, sampler, optimizer=opt, every=2, reference=ref, loss_fn=LOSS, budget=None
        )
    elif kind == "held_out_refresh":
        sources = {"a": data(40, seed=1), "b": data(35, seed=2)}
        sampler = ad.GARSampler(sources, batch_size=6, seed=0, num_batches=5)
        ref = ad.ReferenceBatches(data(30, seed=3), 8, seed=0)
        gar = ad.GAR(
            model,
            sampler,
            optimizer=opt,
            reference=ref,
            loss_fn=LOSS,
            reference_refresh=3,
            budget=None,
        )
    else:
        tf = ad.GARTransform(["Identity", "Invert", "Solarize"])
        sampler = ad.GARSampler(Images(tf), batch_size=5, seed=0, transform=tf, num_batches=5)
        gar = ad.GAR(model, sampler, optimizer=opt, every=2, budget=None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sampler.load_state_dict(state["sampler"])
        gar.load_state_dict(state["gar"])
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=0))
    step = 0 if state is None else state["step"]
    while step < total:
        for x, y in loader:
            opt.zero_grad()
            LOSS(model(x), y).mean().backward()
            gar.step()
            opt.step()
            step += 1
            if step == stop:
                checkpoint = {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sampler": sampler.state_dict(),
                    "gar": gar.state_dict(),
                    "step": step,
                }
                return torch.utils._pytree.tree_map(_clone, checkpoint), [], []
            if step == total:
                break
    rewarded = [h["batch"] for h in sampler.history[1:]]
    return gar.metrics(), rewarded, [p.detach().clone() for p in model.parameters()]


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize(
    ("kind", "stop"),
    [
        ("held_out", 7),
        ("held_out", 10),
        ("held_out_refresh", 4),  # mid-reuse: the saved reference gradient is used twice more
        ("held_out_refresh", 9),  # the last step of a reuse: the next step computes a new one
        ("augment", 4),
        ("augment", 9),
    ],
)
def test_a_resumed_gar_rewards_exactly_the_batches_of_an_uninterrupted_one(kind, stop):
    """every=2 across epochs of 5 batches, checkpoints mid-epoch and at an epoch's end: the
    resumed run rewards the same batches and ends with the same weights and parameters. (In
    the augmentation run, steps 4 and 9 train reference batches, ids 3 and 8, which reward
    the kept batch before them: nothing is waiting at those checkpoints.)"""
    total = 17
    _metrics, expected, params = resumable_run(kind, None, total)
    checkpoint, _, _ = resumable_run(kind, stop, total)
    _, got, resumed_params = resumable_run(kind, None, total, state=checkpoint)
    assert got == expected
    assert len(expected) >= 4
    for a, b in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_batch_kept_at_a_checkpoint_is_counted_as_lost():
    """Next-batch mode with reference batches (even positions of epochs of 5, every=2): step 8
    trains id 7 (position 3 of the second epoch), kept and waiting for the reference batch id
    8. The checkpoint holds no activations: id 7 is never rewarded and is counted in
    batches_dropped; every later batch is rewarded as in the uninterrupted run."""
    total = 17
    _, expected, _ = resumable_run("augment", None, total)
    checkpoint, _, _ = resumable_run("augment", 8, total)
    metrics, got, _ = resumable_run("augment", None, total, state=checkpoint)
    assert checkpoint["gar"]["dropped"] == 1
    assert [b for b in expected if b not in got] == [7]
    assert [b for b in expected if b != 7] == got
    assert metrics["batches_dropped"] == 1


class Counting:
    """An iterator of the same reference batch that counts how often it was asked."""

    def __init__(self, batch) -> None:
        self.batch, self.calls = batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        return self.batch


@pytest.mark.parametrize("refresh", [2, 3])
def test_a_reused_reference_gives_a_fresh_ones_rewards_while_the_model_has_not_moved(refresh):
    """The model never steps, the reference batch is always the same: reusing the reference
    gradient must give exactly the rewards of computing it afresh, from one reference pass in
    every ``refresh`` steps."""
    torch.manual_seed(2)
    model = mlp()
    ref = data(16, seed=5).tensors
    runs = {}
    for k in (1, refresh):
        sampler = ad.GARSampler(
            {"a": data(30, seed=1), "b": data(30, seed=2)}, batch_size=6, seed=0
        )
        it = Counting(ref)
        gar = ad.GAR(model, sampler, reference=it, loss_fn=LOSS, reference_refresh=k, budget=None)
        rewards = []
        for x, y in sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)):
            model.zero_grad()
            LOSS(model(x), y).mean().backward()
            rewards.append(gar.step())
        gar.close()
        runs[k] = (rewards, it.calls)
    steps = len(runs[1][0])
    assert steps == 10
    assert runs[1][1] == steps
    assert runs[refresh][1] == -(-steps // refresh)  # ceil: one pass per refresh steps
    for a, b in zip(runs[1][0], runs[refresh][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_reused_reference_is_the_gradient_of_the_step_that_drew_it():
    """With the model moving, step t of a reuse rewards against the reference gradient taken
    at the first step of the reuse, preconditioned by the optimizer's state at step t: the
    probe with that direction is the oracle."""
    torch.manual_seed(3)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler({"a": data(30, seed=1), "b": data(30, seed=2)}, batch_size=6, seed=0)
    refs = ad.ReferenceBatches(data(40, seed=5), 8, seed=0)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reference=refs,
        loss_fn=LOSS,
        reference_refresh=4,
        reward="dot",
        budget=None,
    )
    oracle_refs = iter(ad.ReferenceBatches(data(40, seed=5), 8, seed=0))
    checked = 0
    for t, (x, y) in enumerate(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))):
        if t % 4 == 0:  # the step that draws a new reference batch: its gradient, now
            xr, yr = next(oracle_refs)
            ref_grad = torch.autograd.grad(LOSS(model(xr), yr).mean(), list(model.parameters()))
            grad = {
                n: g.clone() for (n, _), g in zip(model.named_parameters(), ref_grad, strict=True)
            }
        direction = precondition(dict(grad), dict(model.named_parameters()), opt)
        probe = ad.GradientProbe(snapshot(mlp, model), LOSS, reward="dot")
        oracle = probe(x, y, direction=direction) / len(x)
        opt.zero_grad()
        LOSS(model(x), y).mean().backward()
        torch.testing.assert_close(gar.step(), oracle, rtol=2e-4, atol=1e-7)
        checked += 1
        opt.step()
    assert checked == 10


def test_reference_refresh_is_checked():
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    ref = itertools.repeat(data(8, seed=5).tensors)
    with pytest.raises(ValueError, match=r"reference_refresh should be .*got reference_refresh=0"):
        ad.GAR(mlp(), sampler, reference=ref, loss_fn=LOSS, reference_refresh=0, budget=None)
    with pytest.raises(ValueError, match=r"needs reference=.*reference_refresh=2"):
        ad.GAR(mlp(), sampler, reference_refresh=2, budget=None)
    a = ad.GAR(mlp(), sampler, reference=ref, loss_fn=LOSS, reference_refresh=2, budget=None)
    state = a.state_dict()
    a.close()
    b = ad.GAR(mlp(), sampler, reference=ref, loss_fn=LOSS, reference_refresh=3, budget=None)
    with pytest.raises(ValueError, match=r"reference_refresh=2, but this GAR has .*=3"):
        b.load_state_dict(state)
    b.close()
    c = ad.GAR(mlp(), sampler, reference=ref, loss_fn=LOSS, reference_refresh=2, budget=None)
    state["reference_gradient"] = {"0.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"should name exactly this model's trainable"):
        c.load_state_dict(state)
    names = [n for n, _ in c.model.named_parameters()]
    state["reference_gradient"] = {n: torch.zeros(3) for n in names}
    with pytest.raises(ValueError, match=rf"reference_gradient\['{names[0]}'\] should have"):
        c.load_state_dict(state)


def test_gar_load_state_dict_checks_the_state():
    sampler = ad.GARSampler(data(), batch_size=5, seed=0)
    gar = ad.GAR(mlp(), sampler, every=2, budget=None)
    state = gar.state_dict()
    other = ad.GAR(mlp(), ad.GARSampler(data(), batch_size=5, seed=0), every=3, budget=None)
    with pytest.raises(ValueError, match=r"state has every=2, but this GAR has every=3"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"GAR.state_dict\(\) of version 1, but got version=None"):
        gar.load_state_dict({})
    broken = dict(state)
    del broken["steps"]
    with pytest.raises(ValueError, match=r"missing the key\(s\) \['steps'\]"):
        gar.load_state_dict(broken)


class MaskedLM(nn.Module):
    """A causal LM called as ``model(x, mask)``: the mask ``[T, T]`` holds no batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 20)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x), mask=mask, is_causal=True))


def token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def test_a_side_input_without_the_batch_is_passed_whole():
    """GAR runs the model on a few examples to find each layer's batch dim; an attention mask
    [T, T] passed beside the tokens (T != batch size) is passed whole, and the rewards equal a
    per-example loop oracle (held-out reference, plain gradient)."""
    torch.manual_seed(0)
    t, n = 6, 8
    g = torch.Generator().manual_seed(0)

    def tokens(m: int) -> TensorDataset:
        return TensorDataset(
            torch.randint(0, 20, (m, t), generator=g), torch.randint(0, 20, (m, t), generator=g)
        )

    seqs, x_ref, y_ref = tokens(40), *tokens(8).tensors
    model, mask = MaskedLM(), nn.Transformer.generate_square_subsequent_mask(t)
    sampler = ad.GARSampler({"a": seqs, "b": tokens(40)}, batch_size=n, seed=0)
    reference = itertools.repeat(((x_ref, mask), y_ref))
    gar = ad.GAR(model, sampler, reward="dot", reference=reference, loss_fn=token_loss, budget=None)
    x, y = next(iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))))
    token_loss(model(x, mask), y).mean().backward()
    r = gar.step()
    gar.close()
    params = [p for p in model.parameters() if p.requires_grad]
    d = torch.autograd.grad(token_loss(model(x_ref, mask), y_ref).mean(), params)
    want = []
    for i in range(n):
        gi = torch.autograd.grad(token_loss(model(x[i : i + 1], mask), y[i : i + 1]).sum(), params)
        want.append(sum(float((a * b).sum()) for a, b in zip(gi, d, strict=True)))
    # The kept gradients are those of the loop's .mean(): each g_i carries 1 / n.
    torch.testing.assert_close(r * n, torch.tensor(want), rtol=1e-4, atol=1e-6)
