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


def shard(model: nn.Sequential, keep: set[nn.Parameter] | None = None, mesh=None) -> nn.Sequential:
    """``fully_shard`` per Linear and at the root; the parameters in ``keep`` stay whole on
    every rank (FSDP2's ``ignored_params``); ``mesh``: a 2-D (replicate, shard) mesh: HSDP."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear) and not keep:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, ignored_params=keep, mesh=mesh)
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
    mesh = None
    if variant == "hsdp":  # two replicas of a model sharded over two ranks each
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard(model, None if whole is None else {whole}, mesh)
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
            assert all(
                torch.equal(a, p.grad)
                for a, p in zip(single_grads, single.parameters(), strict=True)
            )
            opt1.step()
            rewards.append(got.tolist())
            errors.append(float((got - want).norm() / want.norm()))
            fd_errors.append(float((got - truth).norm() / truth.norm()))
            single_fd_errors.append(float((want - truth).norm() / truth.norm()))
    # GradientProbe on the sharded model (every rank calls it: FSDP's passes are collective),
    # its reference the ranks' batches averaged by FSDP's backward; .grad left as it was.
    opt.zero_grad()
    loss_fn(model(x), y).mean().backward()
    held = [p.grad.to_local().clone() for p in model.parameters() if hasattr(p.grad, "to_local")]
    sharded_probe = ad.GradientProbe(model, loss_fn, "fd", rel_eps=relative_step(dtype))
    ref_x, ref_y = next(ref_copy)
    mine = sharded_probe(x, y, reference=(ref_x, ref_y), optimizer=opt)
    big_ref = [gathered(t, world) for t in (ref_x, ref_y)]
    oracle = exact(gathered(x, world), gathered(y, world), reference=big_ref, optimizer=opt1)
    oracle = oracle.view(world, -1)[rank]
    probe_error = float((mine - oracle).norm() / oracle.norm())
    kept = [p.grad.to_local() for p in model.parameters() if hasattr(p.grad, "to_local")]
    grads_untouched = all(torch.equal(a, b) for a, b in zip(held, kept, strict=True))
    full = [getattr(p.detach(), "full_tensor", p.detach)() for p in model.parameters()]
    # The global sums the finite difference's step is sized from (HSDP: each shard once).
    from adaptive_data.probe._sharding import Shards, local

    params = dict(model.named_parameters())
    sums = Shards(model, params).sums(
        {name: local(p.detach()).square().sum().view(1) for name, p in params.items()}
    )
    norm_err = abs(float(sums) / float(sum(t.square().sum() for t in full)) - 1)
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
        "probe_error": probe_error,
        "norm_err": norm_err,
        "grads_untouched": grads_untouched,
    }


@pytest.mark.parametrize(
    ("world", "variant"),
    [(2, "plain"), (2, "mixed"), (2, "accum"), (4, "plain"), (4, "hsdp")],
)
def test_fsdp2_rewards_equal_one_process_on_the_global_batch(tmp_path, world, variant):
    """float64: the sharded rewards are the unsharded model's, to the finite difference's
    rounding (eps ~ 1e-8 amplifies the forwards' last bits)."""
    results = run(tmp_path, world, scenario_rewards, "float64", 5, variant)
    for res in results:
        assert max(res["errors"]) < 1e-6, res["errors"]  # against one process's fd
        assert max(res["fd_errors"]) < 1e-6, res["fd_errors"]  # against the exact rewards
        assert res["weight_err"] < 1e-12
        assert res["probe_error"] < 1e-6
        assert res["norm_err"] < 1e-12
        assert res["grads_untouched"]
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


def train_defaults(
    rank: int, steps: int, folder: str | None = None, save_at: int | None = None
) -> dict:
    """GAR with its defaults but the estimator (fd: the budget, a reused reference gradient,
    a quarter of the rows) on the FSDP2 MLP with dropout, an evaluation forward between the
    backward and the step; ``save_at``: a distributed checkpoint there, then a new run
    (model, optimizer, sampler, GAR, loader) that loads it and goes on. The batches' keys, each
    step's rewards, the weights and the local shards of the parameters at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)
        ).double()
        model = shard(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sampler = ad.GARSampler(sources(torch.float64), batch_size=8, seed=0)
        reference = ad.ReferenceBatches(sources(torch.float64)["s1"], 8, seed=rank)
        gar = ad.GAR(
            model,
            sampler,
            optimizer=opt,
            reference=reference,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            estimator="fd",
            reward="dot",
        )
        loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
        return model, opt, sampler, gar, loader

    model, opt, sampler, gar, loader = build()
    keys, rewards, moved = [], [], []
    step, batches = 0, iter(loader)
    while step < steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        keys.append(sampler._records[sampler.last_batch].keys)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():  # an evaluation forward: FSDP keeps the root's weights gathered
            model.eval()
            model(x)
            model.train()
        before = [p.to_local().clone() for p in model.parameters()]
        r = gar.step()
        moved.append(
            not all(
                torch.equal(a, p.to_local())
                for a, p in zip(before, model.parameters(), strict=True)
            )
        )
        rewards.append(None if r is None else r.tolist())
        opt.step()
        step += 1
        if step == save_at:
            # The sharded model and optimizer: a distributed checkpoint; the sampler's and
            # GAR's states are each rank's own: one file per rank beside it.
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
            mine = {
                "sampler": sampler.state_dict(),
                "gar": gar.state_dict(),
                "rng": torch.get_rng_state(),  # the loop's dropout draws
            }
            torch.save(mine, f"{folder}/adaptive_data-rank{rank}.pt")
            gar.close()
            model, opt, sampler, gar, loader = build()
            model_sd, optim_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=folder)
            set_state_dict(
                model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            mine = torch.load(f"{folder}/adaptive_data-rank{rank}.pt", weights_only=True)
            sampler.load_state_dict(mine["sampler"])
            gar.load_state_dict(mine["gar"])
            batches = iter(loader)  # (starting a DataLoader pass draws from the global RNG)
            torch.set_rng_state(mine["rng"])
    gar.close()
    return {
        "keys": keys,
        "rewards": rewards,
        "moved": any(moved),
        "weights": sampler.weights,
        "metrics": {k: v for k, v in gar.metrics().items() if k != "reward_mean"},
        "shards": [p.to_local().flatten().tolist() for p in model.parameters()],
    }


def scenario_defaults(rank: int, world: int, folder: str) -> dict:
    return {
        "whole": train_defaults(rank, 40),
        "resumed": train_defaults(rank, 40, folder, save_at=23),
    }


def test_fsdp2_with_the_budget_learns_alike_on_every_rank_and_resumes_from_dcp(tmp_path):
    results = run(tmp_path, 2, scenario_defaults, str(tmp_path / "dcp"))
    for res in results:
        whole, resumed = res["whole"], res["resumed"]
        assert not whole["moved"]  # gar.step() puts every shard back bit for bit
        assert whole["metrics"]["batches_dropped"] == 0
        assert whole["metrics"]["budget/exact_phase"] == 0.0  # left the exact phase
        assert 16 <= whole["metrics"]["batches_rewarded"] < 40
        assert resumed["keys"] == whole["keys"]  # the same batches after the resume
        assert resumed["rewards"] == whole["rewards"]
        assert resumed["weights"] == whole["weights"]
        assert resumed["shards"] == whole["shards"]
    assert results[0]["whole"]["weights"] == results[1]["whole"]["weights"]
    assert results[0]["whole"]["metrics"] == results[1]["whole"]["metrics"]
    assert results[0]["whole"]["keys"] != results[1]["whole"]["keys"]  # each rank its own


def scenario_lightning(rank: int, world: int) -> dict:
    """Lightning's ModelParallelStrategy (FSDP2 applied in ``configure_model``) with
    GARCallback(estimator="fd", reward="dot"): a clean source against random labels."""
    import os

    import lightning as L
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy

    from adaptive_data.integrations.lightning import GARCallback

    # What torchrun sets; the gloo group is already up, so Lightning uses it.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        TORCHELASTIC_RUN_ID="test",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    )
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, generator=g)
    xc, xn, xv = (torch.randn(n, 8, generator=g) for n in (192, 192, 64))
    sources = {
        "clean": TensorDataset(xc, (xc @ w).argmax(1)),
        "noisy": TensorDataset(xn, torch.randint(0, 4, (192,), generator=g)),
    }
    held_out = TensorDataset(xv, (xv @ w).argmax(1))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
            self.seen: list[list[int]] = []

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    sampler = ad.GARSampler(sources, batch_size=16, seed=0)
    callback = GARCallback(
        sampler,
        reference=ad.ReferenceBatches(held_out, 16, seed=rank),
        loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
        estimator="fd",
        reward="dot",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        max_steps=40,
        callbacks=[callback],
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module()
    trainer.fit(module, callback.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    return {
        "sharded": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "weights": sampler.weights,
        "rewarded": sampler.metrics()["batches_rewarded"],
    }


def test_lightning_model_parallel_strategy_learns_the_clean_source(tmp_path):
    results = run(tmp_path, 2, scenario_lightning)
    for res in results:
        assert res["sharded"]
        assert res["rewarded"] >= 16
        assert res["weights"]["clean"] > 0.8
    assert results[0]["weights"] == results[1]["weights"]
