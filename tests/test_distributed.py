"""GARSampler and GAR under torch.distributed: simulated ranks, then real gloo process groups."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad
from adaptive_data.sampling._shards import ShardOrder

from .multiprocess import run


def tagged(sid: int, n: int) -> TensorDataset:
    return TensorDataset(torch.full((n,), sid, dtype=torch.long), torch.arange(n))


def sources(sizes=(40, 30, 20)) -> dict[str, TensorDataset]:
    return {f"s{i}": tagged(i, n) for i, n in enumerate(sizes)}


# ------------------------------------------------------------------ simulated ranks


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_draw_disjoint_shards(world):
    samplers = [
        ad.GARSampler(sources(), batch_size=4, seed=0, rank=r, world_size=world)
        for r in range(world)
    ]
    total = 90
    assert all(len(s) == total // (4 * world) for s in samplers)
    # Uniform weights and len(sampler) batches: no rank exhausts its shard of a source here
    # except by chance; collect exactly one round per source per rank by drawing directly.
    per_rank = []
    for s in samplers:  # each rank's ShardOrder over the same sources
        order = ShardOrder(s.sizes, s.dataset.offsets[:-1], s.seed, s.rank, s.world_size)
        keys = []
        for s_id in range(3):
            keys += order.take(s_id, order.shard_sizes[s_id])  # one round of this rank's shard
        per_rank.append(keys)
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(per_rank[a]) & set(per_rank[b])
    assert sorted(k for keys in per_rank for k in keys) == list(range(total))
    # Different ranks draw different source choices (their own generators).
    batches = [next(iter(s)) for s in samplers]
    assert len({tuple(b) for b in batches}) == world


def test_summed_statistics_make_the_step_of_the_union_batch():
    """What the all-reduce relies on: the step from the ranks' summed statistics is the step a
    single policy makes on all the ranks' examples at once."""
    ranks = [ad.GARSampler(sources(), batch_size=6, seed=0, rank=r, world_size=2) for r in range(2)]
    single = ad.CategoricalPolicy(3, floor=ranks[0].policy.floor)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        choices = [torch.randint(0, 3, (6,), generator=g) for _ in ranks]
        rewards = [torch.randn(6, generator=g, dtype=torch.float64) for _ in ranks]
        stats = [s.policy.statistics(c, r) for s, c, r in zip(ranks, choices, rewards, strict=True)]
        summed = stats[0] + stats[1]
        for s in ranks:
            s.policy.apply(summed)
        single.update(torch.cat(choices), torch.cat(rewards))
    assert ranks[0].weights == ranks[1].weights
    assert list(ranks[0].weights.values()) == pytest.approx(single.probs_list(), abs=1e-12)
    assert ranks[0].weights != pytest.approx({"s0": 1 / 3, "s1": 1 / 3, "s2": 1 / 3}, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"pass both rank and world_size or neither"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank should lie in \[0, world_size\)"),
        ({"rank": 0, "world_size": 100}, ValueError, r"fewer examples than the 100 ranks"),
        ({"sync_timeout_s": 0}, ValueError, r"sync_timeout_s=0"),
    ],
)
def test_bad_rank_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ad.GARSampler(sources(), batch_size=4, **kwargs)


def test_state_of_another_rank_is_refused():
    a = ad.GARSampler(sources(), batch_size=4, seed=0, rank=0, world_size=2)
    b = ad.GARSampler(sources(), batch_size=4, seed=0, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"state has rank=0, but this sampler has rank=1"):
        b.load_state_dict(a.state_dict())


# ------------------------------------------------------------------ real process groups


def reward_of(sid: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    # rank-dependent: every rank pushes a different source
    return (sid == rank % 3).double() + 0.01 * idx.double()


def _train(s: ad.GARSampler, rank: int, batches: int, epochs: int = 1):
    keys, weights = [], []
    loader = s.track(DataLoader(s.dataset, batch_sampler=s))
    for _ in range(epochs):
        for t, (sid, idx) in enumerate(loader):
            if t >= batches:
                break
            keys.append((sid * 1000 + idx).tolist())
            s.update(reward_of(sid, idx, rank))
            weights.append(list(s.weights.values()))
    return keys, weights


def scenario_weights(rank: int, world: int) -> dict:
    tf = ad.GARTransform(["Identity", "Rotate"], num_magnitude_bins=4)
    s = ad.GARSampler(sources((400, 300, 200)), batch_size=8, seed=0, lr=0.5)
    keys, weights = _train(s, rank, batches=30)
    # a transform's policies are all-reduced too (rewards from the decisions)
    t = ad.GARSampler(sources((60, 60, 60)), batch_size=6, seed=1, transform=tf)
    for _ in t.track(t):
        rec = t._records[t.last_batch]
        ops = torch.tensor(rec.aug.ops, dtype=torch.float64)
        t.update(ops * (rank + 1) + torch.tensor(rec.aug.bins, dtype=torch.float64))
    return {
        "keys": keys,
        "weights": weights,
        "op_weights": tf.policy.op_weights,
        "magnitudes": tf.policy.magnitude_weights,
    }


def scenario_resume(rank: int, world: int) -> dict:
    def make() -> ad.GARSampler:
        return ad.GARSampler(sources((80, 60, 40)), batch_size=4, seed=3, lr=0.5)

    full = make()
    expected, _ = _train(full, rank, batches=10**6, epochs=2)
    first = make()
    it = iter(first.track(first))
    got = []
    for _ in range(5):
        keys = next(it)
        sid, idx = first.decode(keys)
        got.append((sid * 1000 + idx).tolist())
        first.update(reward_of(sid, idx, rank))
    state = first.state_dict()
    second = make()
    second.load_state_dict(state)
    more, _ = _train(second, rank, batches=10**6, epochs=2)
    return {"equal": got + more == expected, "weights_equal": second.weights == full.weights}


def scenario_skipped_update(rank: int, world: int) -> dict:
    s = ad.GARSampler(sources(), batch_size=4, seed=0, sync_timeout_s=5)
    it = iter(s.track(s))
    next(it)
    if rank == 0:
        next(it)  # rank 0 skips batch 0's update: its update rewards batch 1
    try:
        s.update(torch.ones(4))
    except RuntimeError as e:
        return {"error_message": str(e)}
    return {"error_message": None}


def scenario_extra_update(rank: int, world: int) -> dict:
    s = ad.GARSampler(sources(), batch_size=4, seed=0, sync_timeout_s=3)
    it = iter(s.track(s))
    next(it)
    s.update(torch.ones(4))
    if rank == 0:
        next(it)
        try:
            s.update(torch.ones(4))  # no other rank joins this one
        except RuntimeError as e:
            return {"error_message": str(e)}
    return {"error_message": None}


def scenario_mismatched_sources(rank: int, world: int) -> dict:
    try:
        ad.GARSampler(sources((40, 30, 20 + rank)), batch_size=4, seed=0)
    except ValueError as e:
        return {"error_message": str(e)}
    return {"error_message": None}


def scenario_ddp_gar(rank: int, world: int, **options) -> dict:
    """GAR over a DDP model, each rank its own held-out reference batches; ``options`` go to
    GAR (the reference reuse and partial rows: collectives at the same steps on every rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = {
        f"s{i}": TensorDataset(
            torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
        )
        for i in range(3)
    }
    sampler = ad.GARSampler(data, batch_size=8, seed=0)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    probe = ad.GradientProbe(ddp, loss_fn)
    held_out = TensorDataset(
        torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    reference = ad.ReferenceBatches(held_out, 8, seed=rank)  # each rank its own reference
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    with ad.GAR(
        ddp, sampler, optimizer=opt, reference=reference, loss_fn=loss_fn, **options
    ) as gar:
        for _ in range(3):  # 36 steps: past the budget's exact phase
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                gar.step()
                opt.step()
        gar_metrics = gar.metrics()
    # An extra probe must not touch .grad or sync (after the loop: a probe's forward of the
    # model GAR watches would be taken for the batch's own, so it is not run inside it).
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    probe(x, y, reference=(x, y))
    grads_untouched = all(
        torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True)
    )
    return {
        "gar": gar_metrics,
        "weights": sampler.weights,
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
        "grads_untouched": grads_untouched,
        "rewarded": sampler.metrics()["batches_rewarded"],
    }


def scenario_ddp_gar_cheap(rank: int, world: int) -> dict:
    return scenario_ddp_gar(rank, world, reference_refresh=3, rows=4)


def scenario_held_out_gar(rank: int, world: int) -> dict:
    from adaptive_data._distributed import current_group
    from adaptive_data.probe._direction import mean_loss_gradient

    parts = [torch.full((2, 3), float(rank)), torch.arange(4.0) * (rank + 1)]
    mean = current_group(None, None).all_reduce_mean(parts, "a test")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(rank)  # each rank its own reference batch
    ref = (torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g))
    data = TensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    sampler = ad.GARSampler(data, batch_size=8, seed=0)
    gar = ad.GAR(ddp, sampler, reference=itertools.repeat(ref), loss_fn=loss_fn)
    params = dict(model.named_parameters())
    local = mean_loss_gradient(model, loss_fn, (ref[0],), {}, ref[1], 8, params)
    d = gar._reference_direction()
    gar.close()
    return {
        "mean": [m.tolist() for m in mean],
        "direction": torch.cat([t.flatten() for t in d.values()]).tolist(),
        "local": torch.cat([t.flatten() for t in local.values()]).tolist(),
    }


def scenario_accelerate(rank: int, world: int) -> dict:
    """accelerate's prepare() under several processes wraps the batch sampler in a
    BatchSamplerShard; the tracked loader switches that second sharding off, so each rank gets
    every batch its own GARSampler drew, and rewards land on the batch the loop holds."""

    from accelerate import Accelerator

    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )  # what a launcher sets; the process group itself is already up (gloo)
    accelerator = Accelerator(cpu=True)
    s = ad.GARSampler(sources((80, 60, 40)), batch_size=4, seed=0, lr=0.5)
    prepared = accelerator.prepare(DataLoader(s.dataset, batch_sampler=s))
    wrapper = type(prepared.batch_sampler).__name__
    tracked = s.track(prepared)
    len_before_iter = len(tracked)  # what a Trainer sizes its epochs from, before iterating
    held, keys = [], []
    for sid, idx in tracked:
        src, pos = s.decode(s._records[s.last_batch].keys)
        held.append(torch.equal(src, sid) and torch.equal(pos, idx))
        keys += (sid * 1000 + idx).tolist()
        s.update(reward_of(sid, idx, rank))
    return {
        "processes": accelerator.num_processes,
        "wrapper": wrapper,
        "batches": len(held),
        "len": len(s),
        "len_before_iter": len_before_iter,
        "held": all(held),
        "keys": keys,
        "weights": list(s.weights.values()),
    }


SCENARIOS = {
    "accelerate": scenario_accelerate,
    "weights": scenario_weights,
    "resume": scenario_resume,
    "skipped_update": scenario_skipped_update,
    "extra_update": scenario_extra_update,
    "mismatched_sources": scenario_mismatched_sources,
    "ddp_gar": scenario_ddp_gar,
    "ddp_gar_cheap": scenario_ddp_gar_cheap,
    "held_out_gar": scenario_held_out_gar,
}


def launch(tmp_path: Path, world: int, scenario: str) -> list[dict]:
    return run(tmp_path, world, SCENARIOS[scenario])


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_hold_identical_weights_and_draw_disjoint_keys(tmp_path, world):
    results = launch(tmp_path, world, "weights")
    for res in results[1:]:
        assert res["weights"] == results[0]["weights"]  # bit-identical after every update
        assert res["op_weights"] == results[0]["op_weights"]
        assert res["magnitudes"] == results[0]["magnitudes"]
    assert results[0]["weights"][-1] != pytest.approx([1 / 3] * 3, abs=0.05)
    # The first 8 batches hold 64 examples per rank, fewer than any rank's shard of any
    # source (>= 66), so no source has started a new round: the ranks' draws are disjoint.
    drawn = [{k for b in res["keys"][:8] for k in b} for res in results]
    assert all(len(d) == 64 for d in drawn)
    for a in range(world):
        for b in range(a + 1, world):
            assert not drawn[a] & drawn[b]


def test_resume_restores_every_ranks_future(tmp_path):
    results = launch(tmp_path, 2, "resume")
    assert all(r["equal"] and r["weights_equal"] for r in results)


def test_a_skipped_update_on_one_rank_is_an_error_not_a_hang(tmp_path):
    results = launch(tmp_path, 2, "skipped_update")
    for r in results:
        assert "ranks disagree on which batch GARSampler.update() rewards" in r["error_message"]


def test_an_extra_update_on_one_rank_times_out_with_a_message(tmp_path):
    results = launch(tmp_path, 2, "extra_update")
    assert "waited more than 3 s for the other 1 rank(s)" in results[0]["error_message"]
    assert results[1]["error_message"] is None


def test_ranks_with_different_sources_are_refused(tmp_path):
    results = launch(tmp_path, 2, "mismatched_sources")
    for r in results:
        assert "ranks disagree on the sources and sampler settings" in r["error_message"]


def test_gar_and_probe_on_a_ddp_model(tmp_path):
    results = launch(tmp_path, 2, "ddp_gar")
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["params"] == results[1]["params"]  # DDP kept the replicas in sync
    assert all(r["grads_untouched"] for r in results)
    assert results[0]["rewarded"] > 0
    # the default budget chose alike on both ranks (its contrast is averaged over them), and
    # left its exact phase
    mine = [{k: v for k, v in r["gar"].items() if k != "reward_mean"} for r in results]
    assert json.dumps(mine[0]) == json.dumps(mine[1])  # reward_mean: each rank's own batch
    assert results[0]["gar"]["budget/exact_phase"] == 0.0
    assert results[0]["gar"]["batches_dropped"] == 0
    assert 16 <= results[0]["gar"]["batches_rewarded"] < results[0]["gar"]["steps"]


def test_gar_with_a_reused_reference_and_partial_rows_on_a_ddp_model(tmp_path):
    results = launch(tmp_path, 2, "ddp_gar_cheap")
    assert results[0]["weights"] == results[1]["weights"]  # one policy on every rank
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["rewarded"] == results[1]["rewarded"] > 0


def test_held_out_gar_averages_the_ranks_reference_gradients(tmp_path):
    world = 2
    results = launch(tmp_path, world, "held_out_gar")
    for res in results:
        assert res["mean"] == [[[0.5] * 3] * 2, [v * 1.5 for v in range(4)]]
    assert results[0]["direction"] == results[1]["direction"]  # one global direction
    want = [(a + b) / 2 for a, b in zip(results[0]["local"], results[1]["local"], strict=True)]
    assert results[0]["direction"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert results[0]["local"] != results[1]["local"]


def test_accelerate_under_two_processes_keeps_every_rank_s_batches(tmp_path):
    import accelerate  # noqa: F401 (the test needs it installed)

    results = launch(tmp_path, 2, "accelerate")
    for res in results:
        assert res["processes"] == 2
        assert res["wrapper"] == "BatchSamplerShard"  # accelerate sharded the batch sampler
        assert res["held"]  # every reward went to the batch the loop held
        assert res["batches"] == res["len"] > 0  # no rank lost W - 1 of every W batches
        assert res["len_before_iter"] == res["len"]  # and len() says so before the first pass
    assert results[0]["weights"] == results[1]["weights"]
    assert not set(results[0]["keys"][:40]) & set(results[1]["keys"][:40])  # disjoint shards
