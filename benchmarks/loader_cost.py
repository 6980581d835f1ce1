"""What does GARSampler cost a data pipeline? Keys/s and DataLoader examples/s against torch's own.

* ``keys/s``: drawing keys in the main process. GARSampler (batches of 64, ``list`` of ints,
  as the DataLoader receives them) against ``WeightedRandomSampler`` (one int at a time, as
  it yields them) and ``BatchSampler(WeightedRandomSampler, 64)``. Also GARSampler with an
  ``update()`` of random rewards after every batch (the policy step included).
* ``examples/s``: a full epoch through ``DataLoader`` (batch 64, persistent workers, steady
  state after one warm-up epoch), three in-memory sources of 1x28x28 float images, for
  ``num_workers`` 0 and 2: over ``GARSampler`` (with and without an ``update()`` per batch)
  and, as the plain baseline, over ``ConcatDataset`` of the same sources with
  ``shuffle=True`` (a ``RandomSampler``). The target is at least 0.95x the plain loader.
  A diagnostic variant, ``GARSampler, draws replayed``, hands out batches drawn by a
  GARSampler beforehand instead of drawing them (everything else as GARSampler): the
  difference to ``GARSampler`` is what drawing from the policy costs inside the loop.

Variants are interleaved, repeated, and the median and spread reported. Figures go to
``benchmarks/results/loader_cost.json``.

    python benchmarks/loader_cost.py            # full run (about 2-4 minutes on 2 cores)
    python benchmarks/loader_cost.py --quick    # smoke run (seconds), writes nothing
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    TensorDataset,
    WeightedRandomSampler,
)

from adaptive_data.sampling._records import Record as _Record
from adaptive_data.sampling._sampler import GARSampler

from _common import header, paired, print_rate_table, stats, write

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95
BATCH = 64


def make_sources(per_source: int) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    return {
        f"s{i}": TensorDataset(
            torch.rand(per_source, 1, 28, 28, generator=g),
            torch.randint(0, 10, (per_source,), generator=g),
        )
        for i in range(3)
    }


class ReplayedGARSampler(GARSampler):
    """A GARSampler that hands out ``batches`` (keys and their source ids, drawn beforehand)
    in turn instead of drawing from its policy; the rest of its work is unchanged. A diagnostic
    (it overrides a private method), not something to train with."""

    def __init__(self, *args: Any, batches: list[tuple[list[int], list[int]]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._batches = batches
        self._served = 0

    def _draw(self) -> _Record:
        keys, sources = self._batches[self._served % len(self._batches)]
        self._served += 1
        return _Record(self._next_id, self._epoch or 0, self._pos + 1, keys, sources)


def time_keys(sources: dict[str, TensorDataset], n_keys: int, repeats: int) -> dict[str, Any]:
    total = sum(len(s) for s in sources.values())
    weights = torch.ones(total, dtype=torch.double)
    g = torch.Generator().manual_seed(0)

    def gar(update: bool) -> Callable[[], int]:
        def go() -> int:
            s = GARSampler(sources, batch_size=BATCH, seed=0, num_batches=n_keys // BATCH)
            r = torch.randn(BATCH, generator=g)
            n = 0
            for keys in s.track(s):
                n += len(keys)
                if update:
                    s.update(r)
            return n

        return go

    def wrs() -> int:
        return sum(1 for _ in WeightedRandomSampler(weights, n_keys, generator=g))

    def wrs_batched() -> int:
        bs = BatchSampler(WeightedRandomSampler(weights, n_keys, generator=g), BATCH, False)
        return sum(len(b) for b in bs)

    variants = {
        "GARSampler": gar(False),
        "GARSampler+update": gar(True),
        "WeightedRandomSampler": wrs,
        "BatchSampler(WeightedRandomSampler)": wrs_batched,
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    return {k: stats(v) for k, v in rates.items()}


def time_loaders(sources: dict[str, TensorDataset], workers: int, repeats: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": workers}
    if workers:
        kw["persistent_workers"] = True
    plain = DataLoader(ConcatDataset(list(sources.values())), batch_size=BATCH, shuffle=True, **kw)
    gar = GARSampler(sources, batch_size=BATCH, seed=0, num_batches=len(plain))
    gar_loader = gar.track(DataLoader(gar.dataset, batch_sampler=gar, **kw))
    gar_u = GARSampler(sources, batch_size=BATCH, seed=0, num_batches=len(plain))
    gar_u_loader = gar_u.track(DataLoader(gar_u.dataset, batch_sampler=gar_u, **kw))
    drawn_from = GARSampler(sources, batch_size=BATCH, seed=1)
    drawn = [(list(b), list(b.sources)) for b in drawn_from.track(drawn_from)]
    replayed = ReplayedGARSampler(
        sources, batch_size=BATCH, seed=0, num_batches=len(plain), batches=drawn
    )
    replayed_loader = replayed.track(DataLoader(replayed.dataset, batch_sampler=replayed, **kw))
    r = torch.randn(BATCH, generator=torch.Generator().manual_seed(0))

    def epoch(loader: DataLoader, sampler: GARSampler | None) -> int:
        n = 0
        for x, _ in loader:
            n += len(x)
            if sampler is not None:
                sampler.update(r)
        return n

    variants = {
        "plain (RandomSampler)": (plain, None),
        "GARSampler": (gar_loader, None),
        "GARSampler+update": (gar_u_loader, gar_u),
        "GARSampler, draws replayed": (replayed_loader, None),
    }
    for loader, sampler in variants.values():  # warm-up: start workers, touch pages
        epoch(loader, sampler)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (loader, sampler) in variants.items():
            t = time.perf_counter()
            n = epoch(loader, sampler)
            rates[name].append(n / (time.perf_counter() - t))
    out = {k: stats(v) for k, v in rates.items()}
    base = out["plain (RandomSampler)"]["median"]
    for name in ("GARSampler", "GARSampler+update", "GARSampler, draws replayed"):
        out[name]["vs_plain"] = out[name]["median"] / base
        out[name]["vs_plain_paired"] = paired(rates[name], rates["plain (RandomSampler)"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--per-source", type=int, default=10_000, help="examples per source")
    parser.add_argument("--keys", type=int, default=200_000, help="keys per keys/s measurement")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.per_source, args.keys, args.repeats = 500, 5_000, 1
    sources = make_sources(args.per_source)
    results: dict[str, Any] = {
        **header(),
        "batch": BATCH,
        "per_source": args.per_source,
        "keys": args.keys,
        "repeats": args.repeats,
        "target_vs_plain": TARGET,
    }
    print("keys/s ...", flush=True)
    results["keys_per_s"] = time_keys(sources, args.keys, args.repeats)
    results["examples_per_s"] = {}
    for workers in (0, 2):
        print(f"DataLoader, num_workers={workers} ...", flush=True)
        results["examples_per_s"][f"num_workers={workers}"] = time_loaders(
            sources, workers, args.repeats
        )

    print("\n| sampler | keys/s median | min | max |")
    print("|---|---|---|---|")
    for name, s in results["keys_per_s"].items():
        print(f"| {name} | {s['median']:,.0f} | {s['min']:,.0f} | {s['max']:,.0f} |")
    print_rate_table(results["examples_per_s"])
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
