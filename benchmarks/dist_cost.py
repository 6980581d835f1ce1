"""What does a synchronised policy update cost? GARSampler.update() with 2 processes on CPU.

Two processes (gloo, a FileStore in a temporary folder, no port) each hold a GARSampler over
three sources (batch 64), with and without a GARTransform (TrivialAugmentWide's 14 ops x 31
bins: one all-reduce of about 1,000 floats). Each repeat times a run of ``--updates``
``update()`` calls of the synchronised sampler and of the same sampler built with the
process group left out (built before the group exists: no collective), interleaved.
Reported: microseconds per update (median over repeats, rank 0), and the difference, the
cost of the all-reduce, beside a bare ``dist.all_reduce`` of the same size timed the same way.
Figures go to ``benchmarks/results/dist_cost.json``.

    python benchmarks/dist_cost.py            # about a minute
    python benchmarks/dist_cost.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import adaptive_data as ad

from _common import header, write

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--updates", type=int, default=300, help="update() calls per run")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=RESULTS / "dist_cost.json")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.repeats = 20, 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(
            _worker,
            args=(2, os.path.join(tmp, "store"), out, args.updates, args.repeats),
            nprocs=2,
            start_method="spawn",
        )
        raw = json.loads(Path(out).read_text())
    results: dict[str, Any] = {
        **header(),
        "processes": 2,
        "batch": BATCH,
        "updates_per_run": args.updates,
        "repeats": args.repeats,
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


if __name__ == "__main__":
    main()
