"""GAR and GradientProbe on models sharded by FSDP2 (``fully_shard``), on real gloo processes:
the rewards of each rank's batch equal those of one process that trains the unsharded model on
the same global batches."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.probe._fd import relative_step

from .multiprocess import run


def mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)


def shard(model: nn.Sequential, keep: set[nn.Parameter] | None = None) -> nn.Sequential:
    """``fully_shard`` per Linear and at the root; the parameters in ``keep`` stay whole on
    every rank (FSDP2's ``ignored_params``)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear) and not keep:
            fully_shard(layer)
    fully_shard(model, ignored_params=keep)
    return model


def gathered(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sources(dtype: torch.dtype) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    return {
        f"s{i}": TensorDataset(
            torch.randn(96, 12, generator=g, dtype=dtype) + i,
            torch.randint(0, 3, (96,), generator=g),
        )
        for i in range(3)
    }


def scenario_rewards(
    rank: int, world: int, dtype_name: str, steps: int, variant: str = "plain"
) -> dict:
    """Each rank: GAR (fd, exact) over its FSDP2 shards; beside it, the unsharded model trained
    on the global batch (every rank's, gathered) and probed with the same estimator and with
    the exact one. ``variant``: ``"mixed"`` leaves the last bias unsharded (whole on every
    rank, its gradient averaged by the loop), ``"accum"`` accumulates two micro-batches per
    step."""
    dtype = getattr(torch, dtype_name)
    model = mlp(dtype)
    whole = model[4].bias if variant == "mixed" else None
    model = shard(model, None if whole is None else {whole})
    single = mlp(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt1 = torch.optim.AdamW(single.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    sampler = ad.GARSampler(sources(dtype), batch_size=8, seed=0)
    held_out = sources(dtype)["s0"]
    reference = ad.ReferenceBatches(held_out, 8, seed=rank)  # each rank its own
    ref_copy = ad.ReferenceBatches(held_out, 8, seed=rank)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    probe = ad.GradientProbe(single, loss_fn, "fd", rel_eps=relative_step(dtype))
    exact = ad.GradientProbe(single, loss_fn, "ghost")
    errors: list[float] = []
    fd_errors: list[float] = []
    single_fd_errors: list[float] = []
    rewards = []
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reference=reference,
        loss_fn=loss_fn,
        estimator="fd",
        reward="dot",
        budget=None,
    )
    micro = 2 if variant == "accum" else 1
    batches = iter(loader)
    with gar:
        for _ in range(steps):
            opt.zero_grad()
            opt1.zero_grad()
            for _ in range(micro):
                x, y = next(batches)
                loss_fn(model(x), y).mean().div(micro).backward()
                big_x, big_y = gathered(x, world), gathered(y, world)
                loss_fn(single(big_x), big_y).mean().div(micro).backward()
            if whole is not None:  # the loop averages what FSDP does not shard
                dist.all_reduce(whole.grad)
                whole.grad /= world
            xr, yr = (gathered(t, world) for t in next(ref_copy))
            # GAR's dot is with each example's share of the loop's loss (a mean over the
            # rank's batch, over the micro-batches): the probes' per-example gradients, scaled.
            scale = len(x) * micro
            single_grads = [p.grad.clone() for p in single.parameters()]
            want = probe(big_x, big_y, reference=(xr, yr), optimizer=opt1)
            truth = exact(big_x, big_y, reference=(xr, yr), optimizer=opt1)
            want, truth = (t.view(world, -1)[rank] / scale for t in (want, truth))
            got = gar.step()  # the last micro-batch's rewards
            opt.step()
            assert all(torch.equal(a, p.grad) for a, p in zip(single_grads, single.parameters()))
            opt1.step()
            rewards.append(got.tolist())
            errors.append(float((got - want).norm() / want.norm()))
            fd_errors.append(float((got - truth).norm() / truth.norm()))
            single_fd_errors.append(float((want - truth).norm() / truth.norm()))
    full = [getattr(p.detach(), "full_tensor", p.detach)() for p in model.parameters()]
    weight_err = max(
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(full, [p.detach() for p in single.parameters()], strict=True)
    )
    return {
        "errors": errors,
        "fd_errors": fd_errors,
        "single_fd_errors": single_fd_errors,
        "weight_err": weight_err,
        "weights": sampler.weights,
        "params": [p.flatten().tolist() for p in full],
        "metrics": gar.metrics(),
    }


@pytest.mark.parametrize(
    ("world", "variant"), [(2, "plain"), (2, "mixed"), (2, "accum"), (4, "plain")]
)
def test_fsdp2_rewards_equal_one_process_on_the_global_batch(tmp_path, world, variant):
    """float64: the sharded rewards are the unsharded model's, to the finite difference's
    rounding (eps ~ 1e-8 amplifies the forwards' last bits)."""
    results = run(tmp_path, world, scenario_rewards, "float64", 5, variant)
    for res in results:
        assert max(res["errors"]) < 1e-6, res["errors"]  # against one process's fd
        assert max(res["fd_errors"]) < 1e-6, res["fd_errors"]  # against the exact rewards
        assert res["weight_err"] < 1e-12
    assert all(r["weights"] == results[0]["weights"] for r in results)
    assert all(r["params"] == results[0]["params"] for r in results)
    assert results[0]["metrics"]["batches_rewarded"] == 5 * (2 if variant == "accum" else 1)


def test_fsdp2_float32_rewards_are_as_close_to_exact_as_one_process_fd(tmp_path):
    """float32: the finite difference's own error (eps ~ 3e-4) dominates. The sharded
    rewards are within it of the exact ones, as close as one process's fd on the global batch."""
    results = run(tmp_path, 2, scenario_rewards, "float32", 5)
    for res in results:
        assert statistics.median(res["fd_errors"]) < 3e-4, res["fd_errors"]
        assert max(res["fd_errors"]) < 3e-3, res["fd_errors"]
        assert max(res["fd_errors"]) <= max(res["single_fd_errors"]) * 1.5
        assert res["weight_err"] < 1e-5
    assert all(r["weights"] == results[0]["weights"] for r in results)
