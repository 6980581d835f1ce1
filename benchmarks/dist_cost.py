"""What does distributed training with the library cost? Two processes on CPU (gloo).

Two processes (gloo, a FileStore in a temporary folder, no port), one torch thread each. Two
sections (``--what sampler|fsdp|all``, default all), each on its own pair of processes:

**sampler**: a synchronised policy update, ``GARSampler.update()``. Each process holds a
GARSampler over three sources (batch 64), with and without a GARTransform (TrivialAugmentWide's
14 ops x 31 bins: one all-reduce of about 1,000 floats). Each repeat times a run of
``--updates`` ``update()`` calls of the synchronised sampler and of the same sampler built
with the process group left out (built before the group exists: no collective), interleaved.
Reported: microseconds per update (median over repeats, rank 0), and the difference, the cost
of the all-reduce, beside a bare ``dist.all_reduce`` of the same size timed the same way.
Figures go to ``benchmarks/results/dist_cost.json``.

**fsdp**: GAR on a model sharded by FSDP2. A byte-level causal language model (token and
position embeddings, ``--layers`` pre-norm transformer blocks of width ``--dim`` with causal
SDPA attention and a 4x MLP, a final norm and a Linear head over 256 bytes; random byte
sequences of ``--seq`` tokens, ``--batch`` per rank) is sharded with ``fully_shard`` per block
and at the root; AdamW. Three copies of it (the same seed), each with its own sampler over two
sources, are timed in turn in every repeat (interleaved), ``--steps`` training steps each: (a)
``plain``: forward, backward, AdamW step; (b) ``budget``: the same with ``gar.step()`` before
the optimizer's, GAR at its defaults except ``estimator="fd", reward="dot"`` (the cost budget,
``budget=0.1``), timed after its exact first phase (its warm-up is the phase's 16 rewarded
batches and 4 more steps); (c) ``exact``: the same with ``budget=None`` (every batch, every
row, a fresh reference gradient every step). The reference is a held-out
``ReferenceBatches`` of the batch size. Reported: milliseconds per step (median over repeats,
rank 0), the paired ratios b/a and c/a (each repeat's time divided by the same repeat's plain
one) and the overhead per step in ms (the paired difference). Figures go to
``benchmarks/results/dist_cost_fsdp.json``.

    python benchmarks/dist_cost.py                  # both sections (about 3 minutes)
    python benchmarks/dist_cost.py --what fsdp      # the FSDP2 section alone
    python benchmarks/dist_cost.py --quick          # smoke run (tiny model), writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, paired, ratio_text, stats, write

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64
VOCAB = 256
ARMS = ("plain", "budget", "exact")
BUDGET_WARMUP = 16 + 4  # the budget's exact phase (16 rewarded batches), then 4 steps


def make(transform: bool) -> ad.GARSampler:
    """A sampler of this process's group: synchronised if a group exists when it is built."""
    data = {f"s{i}": TensorDataset(torch.zeros(5000, 1)) for i in range(3)}
    tf = ad.GARTransform(learn_ops=True, learn_magnitudes=True) if transform else None
    return ad.GARSampler(data, batch_size=BATCH, seed=0, transform=tf, num_batches=10**9)


def _worker(rank: int, world: int, store: str, out: str, updates: int, repeats: int) -> None:
    torch.set_num_threads(1)
    # The unsynchronised samplers are built before the group exists: world size 1.
    alone = {t: make(t) for t in (False, True)}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    synced = {t: make(t) for t in (False, True)}
    g = torch.Generator().manual_seed(rank)
    rewards = [torch.randn(BATCH, generator=g) for _ in range(64)]

    def run(s: ad.GARSampler) -> float:
        it = iter(s.track(s))
        t = time.perf_counter()
        for i in range(updates):
            next(it)
            s.update(rewards[i % 64])
        return (time.perf_counter() - t) / updates * 1e6

    def bare() -> float:
        """A plain dist.all_reduce of the mixture-only update's 13 floats, for comparison."""
        t = torch.zeros(13, dtype=torch.float64)
        start = time.perf_counter()
        for _ in range(updates):
            dist.all_reduce(t)
        return (time.perf_counter() - start) / updates * 1e6

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for t in (False, True):
            name = "with_transform" if t else "mixture_only"
            times.setdefault(f"{name}/alone", []).append(run(alone[t]))
            dist.barrier()
            times.setdefault(f"{name}/synced", []).append(run(synced[t]))
        dist.barrier()
        times.setdefault("bare_all_reduce", []).append(bare())
    same = [None] * world
    dist.all_gather_object(same, [synced[t].weights for t in (False, True)])
    if rank == 0:
        Path(out).write_text(json.dumps({"times_us": times, "identical": same[0] == same[1]}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.14's gloo can abort in interpreter teardown; results are written


class Block(nn.Module):
    """Pre-norm: LayerNorm, causal SDPA attention (one Linear for q, k, v), LayerNorm, 4x MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (
            z.view(n, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(self.norm1(x)).split(c, dim=2)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, c))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Token and position embeddings, the blocks, a final LayerNorm, a Linear head."""

    def __init__(self, dim: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, max(2, dim // 64)) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy, ``[N, T, V], [N, T] -> [N]``."""
    return nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def token_set(n: int, seq: int, seed: int) -> TensorDataset:
    """``n`` random byte sequences: inputs and the next tokens."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return TensorDataset(t[:, :-1].contiguous(), t[:, 1:].contiguous())


def _fsdp_worker(rank: int, world: int, store: str, out: str, cfg: dict[str, int]) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    # The root returns the head's logits, a view; the loss reads them out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    batch, seq = cfg["batch"], cfg["seq"]

    def build(arm: str) -> tuple[Callable[[int], float], Any, ad.GARSampler, nn.Module]:
        torch.manual_seed(0)
        model = ByteLM(cfg["dim"], cfg["layers"], seq)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sources = {"a": token_set(8 * batch, seq, 1), "b": token_set(8 * batch, seq, 2)}
        # Built after the group exists: each rank draws its own batches, updates all-reduced.
        sampler = ad.GARSampler(sources, batch_size=batch, seed=0, num_batches=10**9)
        loader = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
        gar = None
        if arm != "plain":
            gar = ad.GAR(
                model,
                sampler,
                optimizer=opt,
                reference=ad.ReferenceBatches(token_set(8 * batch, seq, 3), batch, seed=rank),
                loss_fn=lm_loss,
                estimator="fd",
                reward="dot",
                **({"budget": None} if arm == "exact" else {}),
            )

        def steps(n: int) -> float:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(n):
                x, y = next(loader)
                opt.zero_grad(set_to_none=True)
                lm_loss(model(x), y).mean().backward()
                if gar is not None:
                    gar.step()
                opt.step()
            return (time.perf_counter() - start) / n * 1e3

        return steps, gar, sampler, model

    runs = {arm: build(arm) for arm in ARMS}
    for arm, (steps, *_) in runs.items():
        steps(BUDGET_WARMUP if arm == "budget" else cfg["warmup"])
    gar = runs["budget"][1]
    before = gar.metrics()
    if before["budget/exact_phase"]:
        raise RuntimeError(f"the budget is still in its exact phase after {BUDGET_WARMUP} steps")
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(cfg["repeats"]):
        for arm, (steps, *_) in runs.items():
            times[arm].append(steps(cfg["steps"]))
    after = gar.metrics()
    weights = [None] * world
    dist.all_gather_object(weights, [runs[a][2].weights for a in ("budget", "exact")])
    if rank == 0:
        result = {
            "ms_per_step": times,
            # A sharded parameter is a DTensor: numel() is the whole parameter's.
            "parameters": sum(p.numel() for p in runs["plain"][3].parameters()),
            "identical": all(w == weights[0] for w in weights),
            "budget_timed": {
                "steps": after["steps"] - before["steps"],
                "batches_rewarded": after["batches_rewarded"] - before["batches_rewarded"],
                "rows": after["budget/rows"],
                "reference_refresh": after["budget/reference_refresh"],
                "estimated_cost_per_step_since_start": after["budget/cost_per_step"],
            },
        }
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.14's gloo can abort in interpreter teardown; results are written


def sampler_section(args: argparse.Namespace) -> None:
    updates, repeats = (20, 1) if args.quick else (args.updates, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(
            _worker,
            args=(2, os.path.join(tmp, "store"), out, updates, repeats),
            nprocs=2,
            start_method="spawn",
        )
        raw = json.loads(Path(out).read_text())
    results: dict[str, Any] = {
        **header(),
        "processes": 2,
        "batch": BATCH,
        "updates_per_run": updates,
        "repeats": repeats,
        "weights_identical_on_both_ranks": raw["identical"],
        "us_per_update": {},
    }
    print("\n| sampler | update alone (us) | synchronised (us) | all-reduce cost (us) |")
    print("|---|---|---|---|")
    for name in ("mixture_only", "with_transform"):
        alone = statistics.median(raw["times_us"][f"{name}/alone"])
        synced = statistics.median(raw["times_us"][f"{name}/synced"])
        results["us_per_update"][name] = {
            "alone_median": alone,
            "synced_median": synced,
            "difference": synced - alone,
            "alone_runs": raw["times_us"][f"{name}/alone"],
            "synced_runs": raw["times_us"][f"{name}/synced"],
        }
        print(f"| {name} | {alone:.0f} | {synced:.0f} | {synced - alone:.0f} |")
    bare = statistics.median(raw["times_us"]["bare_all_reduce"])
    results["bare_all_reduce_us_median"] = bare
    print(f"| a bare dist.all_reduce of 13 floats | | {bare:.0f} | |")
    print(f"weights identical on both ranks: {raw['identical']}")
    if not args.quick:
        write(args.out, results)


def fsdp_section(args: argparse.Namespace) -> None:
    cfg = {
        "dim": args.dim,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.fsdp_repeats,
        "warmup": 3,
    }
    if args.quick:
        cfg.update(dim=32, layers=2, seq=16, batch=8, steps=4, repeats=1, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(
            _fsdp_worker,
            args=(2, os.path.join(tmp, "store"), out, cfg),
            nprocs=2,
            start_method="spawn",
        )
        raw = json.loads(Path(out).read_text())
    times = raw["ms_per_step"]
    plain = times["plain"]
    results: dict[str, Any] = {
        **header(),
        "processes": 2,
        "backend": "gloo",
        "model": (
            f"byte-level causal LM, {cfg['layers']} blocks of width {cfg['dim']}, "
            f"{raw['parameters']:,} parameters, fully_shard per block and at the root"
        ),
        "config": cfg,
        "budget_warmup_steps": BUDGET_WARMUP,
        "budget_timed": raw["budget_timed"],
        "weights_identical_on_both_ranks": raw["identical"],
        "arms": {},
    }
    print(
        "\n| FSDP2 step (rank 0) | ms per step, median | x plain (paired median, min-max) "
        "| overhead ms per step (paired median) |"
    )
    print("|---|---|---|---|")
    for arm in ARMS:
        runs = times[arm]
        entry: dict[str, Any] = {"ms_per_step": stats(runs), "runs_ms": runs}
        if arm != "plain":
            entry["vs_plain_paired"] = paired(runs, plain)
            entry["overhead_ms_paired"] = stats([a - b for a, b in zip(runs, plain, strict=True)])
        results["arms"][arm] = entry
        over = entry.get("overhead_ms_paired")
        over_cell = "" if over is None else f"{over['median']:.1f}"
        median = entry["ms_per_step"]["median"]
        print(f"| {arm} | {median:.1f} | {ratio_text(entry)} | {over_cell} |")
    timed = raw["budget_timed"]
    print(
        f"budget, timed after its exact phase: {timed['batches_rewarded']:.0f} of "
        f"{timed['steps']:.0f} steps rewarded, {timed['rows']:.0f} rows each, reference "
        f"gradient every {timed['reference_refresh']:.0f} steps"
    )
    print(f"FSDP2: weights identical on both ranks: {raw['identical']}")
    if not args.quick:
        write(args.out_fsdp, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--what", choices=("sampler", "fsdp", "all"), default="all")
    parser.add_argument("--updates", type=int, default=300, help="sampler: update() calls per run")
    parser.add_argument("--repeats", type=int, default=11, help="sampler: repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "dist_cost.json")
    parser.add_argument("--dim", type=int, default=64, help="fsdp: the model's width")
    parser.add_argument("--layers", type=int, default=2, help="fsdp: transformer blocks")
    parser.add_argument("--seq", type=int, default=64, help="fsdp: tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="fsdp: sequences per rank")
    parser.add_argument("--steps", type=int, default=20, help="fsdp: steps per arm and repeat")
    parser.add_argument("--fsdp-repeats", type=int, default=11, help="fsdp: repeats")
    parser.add_argument("--out-fsdp", type=Path, default=RESULTS / "dist_cost_fsdp.json")
    args = parser.parse_args()
    if args.what in ("sampler", "all"):
        sampler_section(args)
    if args.what in ("fsdp", "all"):
        fsdp_section(args)


if __name__ == "__main__":
    main()
