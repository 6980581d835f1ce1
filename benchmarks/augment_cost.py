"""What does GARTransform cost a data pipeline? Examples/s against TrivialAugmentWide's loader.

Both loaders read the same in-memory CIFAR-sized images (32x32 RGB PIL images, as
torchvision's CIFAR10 returns them) through ``v2.Compose([RandomCrop(32, padding=4),
RandomHorizontalFlip(), <augmentation>, ToImage(), ToDtype(float32, scale=True)])``, batch 128:

* plain: ``DataLoader(..., shuffle=True)`` (a ``RandomSampler``) with ``v2.TrivialAugmentWide()``;
* GAR: ``GARSampler(..., transform=tf)`` with ``tf = GARTransform()`` in the pipeline (the
  decisions drawn in the main process, applied in the workers, every example's random state
  set from its key), with and without an ``update()`` of random rewards per batch; every
  batch augmented (``reference_every=None``: the default's un-augmented reference batches would
  make half the batches cheaper).

``num_workers`` 0 and 2 (persistent workers), steady state after a warm-up epoch, variants
interleaved and repeated; the ratio is the median of paired (same repeat) ratios. Target:
at least 0.95x the plain loader. Figures go to ``benchmarks/results/augment_cost.json``.

    python benchmarks/augment_cost.py            # full run (about 3-5 minutes on 2 cores)
    python benchmarks/augment_cost.py --quick    # smoke run (seconds), writes nothing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from adaptive_data import GARSampler, GARTransform

from _common import header, paired, print_rate_table, stats, write

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95
BATCH = 128


class Images:
    """In-memory 32x32 RGB PIL images with labels and a torchvision-style ``transform``."""

    def __init__(self, n: int, transform: Any) -> None:
        g = torch.Generator().manual_seed(0)
        # Smooth random images (upsampled noise), so the ops have structure to act on.
        small = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        big = torch.nn.functional.interpolate(small.float(), size=32, mode="bilinear")
        arrays = big.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.images = [Image.fromarray(a) for a in arrays]
        self.labels = torch.randint(0, 10, (n,), generator=g).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i]), self.labels[i]


def pipeline(augment: Any) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            augment,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def time_loaders(n: int, workers: int, repeats: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": workers}
    if workers:
        kw["persistent_workers"] = True
    plain = DataLoader(
        Images(n, pipeline(v2.TrivialAugmentWide())), batch_size=BATCH, shuffle=True, **kw
    )
    loaders: dict[str, tuple[DataLoader, GARSampler | None]] = {
        "plain (TrivialAugmentWide)": (
            plain,
            None,
        )
    }
    for name, update in (("GARSampler+GARTransform", False), ("... +update", True)):
        tf = GARTransform(learn_ops=True, learn_magnitudes=True)
        # Every batch augmented (no un-augmented reference batches), like the plain loader.
        s = GARSampler(
            Images(n, pipeline(tf)), batch_size=BATCH, seed=0, transform=tf, reference_every=None
        )
        loaders[name] = (
            s.track(DataLoader(s.dataset, batch_sampler=s, **kw)),
            s if update else None,
        )
    g = torch.Generator().manual_seed(0)

    def epoch(loader: DataLoader, sampler: GARSampler | None) -> int:
        count = 0
        for x, _ in loader:
            count += len(x)
            if sampler is not None:
                sampler.update(torch.randn(len(x), generator=g))
        return count

    for loader, sampler in loaders.values():  # warm-up: start workers
        epoch(loader, sampler)
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(repeats):
        for name, (loader, sampler) in loaders.items():
            t = time.perf_counter()
            count = epoch(loader, sampler)
            rates[name].append(count / (time.perf_counter() - t))
    out = {k: stats(v) for k, v in rates.items()}
    base = rates["plain (TrivialAugmentWide)"]
    for name in list(loaders)[1:]:
        out[name]["vs_plain_paired"] = paired(rates[name], base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--images", type=int, default=4096, help="images per epoch")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "augment_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.repeats = 256, 1
    results: dict[str, Any] = {
        **header(),
        "batch": BATCH,
        "images": args.images,
        "repeats": args.repeats,
        "target_vs_plain": TARGET,
        "examples_per_s": {},
    }
    for workers in (0, 2):
        print(f"DataLoader, num_workers={workers} ...", flush=True)
        results["examples_per_s"][f"num_workers={workers}"] = time_loaders(
            args.images, workers, args.repeats
        )
    print_rate_table(results["examples_per_s"])
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
