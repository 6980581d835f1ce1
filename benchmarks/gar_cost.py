"""What does the one-line GAR cost a training loop? Time per step with and without gar.step().

For the MLP and the small ResNet with BatchNorm of ``probe_cost.py`` (batch 128, SGD with
momentum), the same loop runs over a ``GARSampler`` loader with and without ``GAR`` (hooks
that keep each layer's inputs and output gradients, and ``gar.step()`` between
``backward()`` and ``optimizer.step()``): next-batch reference, cosine reward, rewarding
every step (``every=1``) and every 4th step (``every=4``). Variants are interleaved, each
repeat times a run of ``--steps`` steps after a warm-up, and the ratio to the plain loop is
the median of paired (same repeat) ratios. Target: at most 1.10x the plain loop's time per
step. Figures go to ``benchmarks/results/gar_cost.json``.

    python benchmarks/gar_cost.py            # full run (about 5 minutes on 2 cores)
    python benchmarks/gar_cost.py --quick    # smoke run (seconds), writes nothing
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, paired, ratio_text, stats, write
from probe_cost import cases

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.10
BATCH = 128
VARIANTS = {"plain": None, "gar_every1": 1, "gar_every4": 4, "gar_every8": 8}


def make_loop(
    factory: Callable[[], nn.Module], batches: TensorDataset, every: int | None
) -> Callable[[int], float]:
    """A closure that runs ``n`` training steps and returns the seconds per step."""
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    sampler = ad.GARSampler(batches, batch_size=BATCH, seed=0, num_batches=10**9)
    loader = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    gar = ad.GAR(model, sampler, optimizer=opt, every=every) if every else None

    def steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            x, y = next(loader)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if gar is not None:
                gar.step()
            opt.step()
        return (time.perf_counter() - t) / n

    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--steps", type=int, default=12, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--models", default="mlp,resnet_bn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gar_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.repeats = 2, 1
    all_cases = cases(BATCH)
    results: dict[str, Any] = {
        **header(),
        "batch": BATCH,
        "steps": args.steps,
        "repeats": args.repeats,
        "target_vs_plain": TARGET,
        "models": {},
    }
    for name in args.models.split(","):
        factory, make_batch = all_cases[name]
        g = torch.Generator().manual_seed(0)
        xs, ys = zip(*(make_batch(g) for _ in range(4)), strict=True)
        batches = TensorDataset(torch.cat(xs), torch.cat(ys))
        loops = {v: make_loop(factory, batches, every) for v, every in VARIANTS.items()}
        for loop in loops.values():  # warm-up (and GAR's first kept batch)
            loop(2)
        times: dict[str, list[float]] = {v: [] for v in loops}
        print(f"{name} ...", flush=True)
        for _ in range(args.repeats):
            for v, loop in loops.items():
                times[v].append(loop(args.steps))
        out: dict[str, Any] = {v: {"s_per_step": stats(t)} for v, t in times.items()}
        for v in list(loops)[1:]:
            out[v]["vs_plain_paired"] = paired(times[v], times["plain"])
        results["models"][name] = out
    print("\n| model | variant | ms per step (median) | x plain (paired median, min-max) |")
    print("|---|---|---|---|")
    for name, out in results["models"].items():
        for v, s in out.items():
            print(f"| {name} | {v} | {1000 * s['s_per_step']['median']:.1f} | {ratio_text(s)} |")
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
