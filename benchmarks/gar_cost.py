"""What does the one-line GAR cost a training loop? Time per step with and without gar.step().

For the MLP and the small ResNet with BatchNorm of ``probe_cost.py`` (batch 128, SGD with
momentum), the same loop runs over a ``GARSampler`` loader with and without ``GAR`` (hooks
that keep each layer's inputs and output gradients, and ``gar.step()`` between
``backward()`` and ``optimizer.step()``): next-batch reference, cosine reward, rewarding
every step (``every=1``) and every 4th step (``every=4``). Variants are interleaved (in an
order that rotates each repeat), each repeat times a run of ``--steps`` steps after a
warm-up, and the ratio to the plain loop is the median of paired (same repeat) ratios.
Target: at most 1.10x the plain loop's time per step. Figures go to
``benchmarks/results/gar_cost.json``.

``--mode defaults`` times every default (``GAR(budget="auto")``: 0.02 next-batch, 0.1
held-out) beside the exact GAR (``budget=None``) and the next-batch mode at ``budget=0.03``,
``0.05`` and ``0.1`` (its default before), and its parts (``exact_rows32_next_batch``: every
batch's 32 rows rewarded; ``keeps_nothing_next_batch``: a budget so small that nothing is kept
after the exact phase, GAR's work at every step), after a warm-up of 48 steps that covers the
budget's exact first phase, with timed runs long enough to hold several rewarded batches
(``--steps 40``);
figures to ``benchmarks/results/gar_cost_defaults.json``. The other modes' variants set
``budget=None``: what they measured before the budget existed.

``--mode heldout`` times the held-out mode instead (what a mixture uses): ``GAR`` with
``reference=ReferenceBatches(...)`` of 128 examples from the same data, every step
(``heldout``), the reference gradient reused for 8 steps (``heldout_r8``), with that and 32
rows of each batch of 128 rewarded (``heldout_r8_rows32``; ``heldout_r32_rows32`` with the
reference every 32nd step), and every 4th step with the reuse (``heldout_every4_r8``);
figures to ``benchmarks/results/gar_cost_heldout.json``.

The ``fd`` variants use ``GAR(estimator="fd", reward="dot")``: forward-only rewards, two
no-grad forwards of the rewarded rows (all 128, or 32 with ``rows32``) instead of hooks on
every layer. ``--variants`` picks a subset of a mode's variants (``plain`` always runs).
``--memory`` runs each variant alone in a subprocess instead and reports its peak resident
memory (``ru_maxrss``) beside the plain loop's; ``--profile`` runs each under cProfile and
reports where a step's time goes (the loop, GAR's step, its rewards, the reference gradient,
the capture hooks).

    python benchmarks/gar_cost.py            # full run (about 5 minutes on 2 cores)
    python benchmarks/gar_cost.py --mode heldout
    python benchmarks/gar_cost.py --mode defaults --steps 40 --repeats 7
    python benchmarks/gar_cost.py --quick    # smoke run (seconds), writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import adaptive_data as ad

from _common import header, paired, ratio_text, stats, write
from probe_cost import cases

RESULTS = Path(__file__).resolve().parent / "results"
# Time per step at most this many times the plain loop's: the first wave's target for the
# next-batch mode, and the cost issue's for the held-out mode.
TARGETS = {"next_batch": 1.10, "heldout": 1.15, "defaults": 1.15}
BATCH = 128
# variant -> GAR's arguments (None: the plain loop); "reference": True stands for the
# held-out reference batches.
VARIANTS: dict[str, dict[str, dict[str, Any] | None]] = {
    "next_batch": {
        "plain": None,
        "gar_every1": {"budget": None, "every": 1},
        "gar_every4": {"budget": None, "every": 4},
        "gar_every8": {"budget": None, "every": 8},
        "fd_every1": {"budget": None, "every": 1, "estimator": "fd", "reward": "dot"},
        "fd_rows32": {"budget": None, "every": 1, "estimator": "fd", "reward": "dot", "rows": 32},
    },
    "heldout": {
        "plain": None,
        "heldout": {"budget": None, "reference": True},
        "heldout_r8": {"budget": None, "reference": True, "reference_refresh": 8},
        "heldout_r8_rows32": {
            "budget": None,
            "reference": True,
            "reference_refresh": 8,
            "rows": 32,
        },
        "heldout_every4_r8": {
            "budget": None,
            "reference": True,
            "every": 4,
            "reference_refresh": 8,
        },
        "heldout_r32_rows32": {
            "budget": None,
            "reference": True,
            "reference_refresh": 32,
            "rows": 32,
        },
        "heldout_fd_r8": {
            "budget": None,
            "reference": True,
            "reference_refresh": 8,
            "estimator": "fd",
            "reward": "dot",
        },
        "heldout_fd_r8_rows32": {
            "budget": None,
            "reference": True,
            "reference_refresh": 8,
            "rows": 32,
            "estimator": "fd",
            "reward": "dot",
        },
    },
    # Every default (GAR(budget="auto"): 0.02 next batch, 0.1 held out) against the exact GAR
    # (budget=None), timed after the exact first phase (--warmup 48 steps: 16 rewarded
    # batches, then the budget).
    "defaults": {
        "plain": None,
        "default_next_batch": {},
        "default_heldout": {"reference": True},
        "exact_next_batch": {"budget": None},
        "exact_heldout": {"budget": None, "reference": True},
        "budget0.03_next_batch": {"budget": 0.03},
        "budget0.05_next_batch": {"budget": 0.05},
        "budget0.1_next_batch": {"budget": 0.1},  # budget="auto" with the next batch before
        # Its parts: every batch's 32 rows rewarded (what one kept batch costs), and a budget so
        # small that nothing is kept after the exact phase (what GAR does at every step).
        "exact_rows32_next_batch": {"budget": None, "rows": 32},
        "keeps_nothing_next_batch": {"budget": 1e-9},
    },
}


@contextlib.contextmanager
def computing_rewards() -> Iterator[None]:
    """Build a next-batch GAR over one source without a learning transform that computes its
    rewards as one with a learning transform does (GAR otherwise says it has nothing to learn
    and computes none): what the rewards cost is what is timed."""
    from adaptive_data.gar import _gar

    rule = _gar._nothing_to_learn
    _gar._nothing_to_learn = lambda sampler: ""
    try:
        yield
    finally:
        _gar._nothing_to_learn = rule


def make_loop(
    factory: Callable[[], nn.Module], batches: TensorDataset, options: dict[str, Any] | None
) -> Callable[[int], float]:
    """A closure that runs ``n`` training steps and returns the seconds per step."""
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(options or {})
    held_out = kw.pop("reference", False)
    # Held out: a mixture of the data's two halves (what a mixture's loop runs). Next batch:
    # the one source, as under a learned augmentation (the MLP's and ResNet's inputs are no
    # images, so no GARTransform: GAR's rule that a GAR with nothing to learn computes no
    # rewards is turned off here, so the rewards are computed and timed).
    half = len(batches) // 2
    sources: Any = (
        {"a": Subset(batches, range(half)), "b": Subset(batches, range(half, len(batches)))}
        if held_out
        else batches
    )
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=0, num_batches=10**9)
    loader = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    gar = None
    if options is not None:
        if held_out:
            kw["reference"] = ad.ReferenceBatches(batches, BATCH, seed=1)
            kw["loss_fn"] = nn.CrossEntropyLoss(reduction="none")
            gar = ad.GAR(model, sampler, optimizer=opt, **kw)
        else:
            with computing_rewards():
                gar = ad.GAR(model, sampler, optimizer=opt, **kw)

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
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps before the timing (2; 48 with defaults)"
    )
    parser.add_argument("--models", default="mlp,resnet_bn")
    parser.add_argument(
        "--mode",
        choices=tuple(VARIANTS),
        default="next_batch",
        help="the next-batch reference (default) or held-out reference batches",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--variants", default=None, help="comma-separated subset of the mode's variants"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak resident memory of each variant, each alone in a subprocess",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="where each variant's time goes (cProfile, per step) instead of the timing",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 48 if args.mode == "defaults" else 2
    if args.quick:
        args.steps, args.repeats, args.warmup = 2, 1, 2
    variants = VARIANTS[args.mode]
    if args.child is not None:  # one variant alone: its peak memory
        factory, make_batch = cases(BATCH)[args.models]
        g = torch.Generator().manual_seed(0)
        xs, ys = zip(*(make_batch(g) for _ in range(4)), strict=True)
        loop = make_loop(factory, TensorDataset(torch.cat(xs), torch.cat(ys)), variants[args.child])
        loop(2 + args.steps)
        print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    if args.variants is not None:
        chosen = args.variants.split(",")
        unknown = sorted(set(chosen) - set(variants))
        if unknown:
            sys.exit(f"unknown --variants {unknown}: choose from {', '.join(variants)}")
        variants = {v: o for v, o in variants.items() if v == "plain" or v in chosen}
    if args.memory:
        memory(args, variants)
        return
    if args.profile:
        profile(args, variants)
        return
    out_path = args.out or RESULTS / (
        {"next_batch": "gar_cost.json", "heldout": "gar_cost_heldout.json"}.get(
            args.mode, f"gar_cost_{args.mode}.json"
        )
    )
    all_cases = cases(BATCH)
    results: dict[str, Any] = {
        **header(),
        "batch": BATCH,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "target_vs_plain": TARGETS[args.mode],
        "mode": args.mode,
        "variants": variants,
        "models": {},
    }
    for name in args.models.split(","):
        factory, make_batch = all_cases[name]
        g = torch.Generator().manual_seed(0)
        xs, ys = zip(*(make_batch(g) for _ in range(4)), strict=True)
        batches = TensorDataset(torch.cat(xs), torch.cat(ys))
        loops = {v: make_loop(factory, batches, options) for v, options in variants.items()}
        for loop in loops.values():  # warm-up (and GAR's first kept batch, or its exact phase)
            loop(args.warmup)
        times: dict[str, list[float]] = {v: [] for v in loops}
        print(f"{name} ...", flush=True)
        names = list(loops)
        for r in range(args.repeats):
            # The order rotates from repeat to repeat: no variant always runs right after the
            # plain loop, or first after another model has filled the caches.
            for v in names[r % len(names) :] + names[: r % len(names)]:
                times[v].append(loops[v](args.steps))
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
        write(out_path, results)


# What the profile reports, per step: (label, the function's file and name in cProfile's keys).
PROFILED = (
    ("GAR.step (all of GAR's work at the step)", "_gar.py", "step"),
    ("rewards of the kept rows", "_keepers.py", "rewards"),
    ("reference gradient (amortised)", "_gar.py", "_reference_gradient"),
    ("capture hooks of the covered layers", "_capture.py", "_after"),
)


def profile(args: argparse.Namespace, variants: dict[str, Any]) -> None:
    """Each variant under cProfile for ``--steps`` steps after a warm-up: milliseconds per
    step of the whole loop and of GAR's parts (cumulative times; cProfile's own overhead
    inflates them, the plain loop's included); figures to ``gar_cost_profile_<mode>.json``."""
    results: dict[str, Any] = {**header(), "batch": BATCH, "steps": args.steps, "models": {}}
    for name in args.models.split(","):
        factory, make_batch = cases(BATCH)[name]
        g = torch.Generator().manual_seed(0)
        xs, ys = zip(*(make_batch(g) for _ in range(4)), strict=True)
        batches = TensorDataset(torch.cat(xs), torch.cat(ys))
        out: dict[str, Any] = {}
        for v, options in variants.items():
            loop = make_loop(factory, batches, options)
            loop(4)  # warm-up (and GAR's first kept batch)
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.runcall(loop, args.steps)
            total = time.perf_counter() - t
            cumulative = {
                (Path(f).name, fn): row[3]
                for (f, _, fn), row in pstats.Stats(prof).stats.items()  # type: ignore[attr-defined]
            }
            parts = {label: cumulative.get((f, fn), 0.0) for label, f, fn in PROFILED}
            out[v] = {"loop": total / args.steps} | {k: p / args.steps for k, p in parts.items()}
            print(
                f"{name} {v}: " + ", ".join(f"{k} {1000 * ms:.2f} ms" for k, ms in out[v].items()),
                flush=True,
            )
        results["models"][name] = out
    if not args.quick:
        write(args.out or RESULTS / f"gar_cost_profile_{args.mode}.json", results)


def memory(args: argparse.Namespace, variants: dict[str, Any]) -> None:
    """Each variant alone in a subprocess (warm-up and ``--steps`` steps): its peak resident
    memory and the ratio to the plain loop's; figures to ``gar_cost_memory.json``."""
    results: dict[str, Any] = {**header(), "batch": BATCH, "steps": args.steps, "models": {}}
    for name in args.models.split(","):
        peaks = {}
        for v in variants:
            cmd = [sys.executable, __file__, "--mode", args.mode, "--models", name]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--child", v]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[v] = json.loads(out.strip().splitlines()[-1])["maxrss_kib"]
            print(f"{name} {v}: {peaks[v] / 1024:.0f} MiB", flush=True)
        results["models"][name] = {
            v: {"maxrss_mib": kib / 1024, "vs_plain": kib / peaks["plain"]}
            for v, kib in peaks.items()
        }
    if not args.quick:
        write(args.out or RESULTS / f"gar_cost_memory_{args.mode}.json", results)


if __name__ == "__main__":
    main()
