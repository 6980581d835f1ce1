"""How reliably do the cheap reward settings learn a mixture in a short run?

The cheap settings of the held-out mode (``reference_refresh=32``: one reference gradient per
32 steps; ``rows``: a quarter of each batch rewarded) end level with every-step exact rewards
on ``mixture_quality`` and ``lm_mixture`` (hundreds of steps, 3 seeds each) at 1.35x a plain
step instead of 3.5-4x. This measures what they cost where a run is short: two sources of a
tiny 4-class task, ``clean`` (labels from a linear teacher) and ``noisy`` (random labels), 96
examples each; an MLP (8-32-4, tanh) trained with AdamW (lr 1e-2) on batches of 16 from a
``GARSampler`` over both, ``GAR`` rewarding every step against a held-out clean reference of
64 examples (``--ref-batch``: batches of that many of them; cosine reward). Reported per arm
and horizon (number of steps): the clean source's final weight over ``--seeds`` (mean, min,
and how many seeds end below 0.9).

    python benchmarks/short_horizon.py             # 16 seeds, 24/96/384 steps
    python benchmarks/short_horizon.py --quick     # smoke run, writes nothing
    python benchmarks/short_horizon.py --arms exact,default --horizons 12,48,384 \
        --ref-batch 16 --out benchmarks/results/short_horizon_defaults_ref16.json
    python benchmarks/short_horizon.py --accumulate 2 --dropout 0.1 --horizons 12,48 \
        --out benchmarks/results/short_horizon_accumulate.json
    python benchmarks/short_horizon.py --accumulate 2 --dropout 0.1 --horizons 12,48 \
        --ref-batch 16 --out benchmarks/results/short_horizon_ref16.json  # as the Trainer's
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, write

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLASSES, BATCH, PER_SOURCE = 8, 4, 16, 96
# arm -> (reference_refresh, rows, budget): the explicit arms without the budget (what they
# measured before it existed); "default" is every default, GAR(budget=0.1).
ARMS: dict[str, tuple[int | None, int | None, float | None]] = {
    "exact": (1, None, None),
    "r32": (32, None, None),
    "rows4": (1, BATCH // 4, None),
    "r8_rows4": (8, BATCH // 4, None),
    "r32_rows4": (32, BATCH // 4, None),
    "default": (None, None, 0.1),
}


def make_data(seed: int) -> tuple[dict[str, TensorDataset], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, CLASSES, generator=g)

    def clean(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DIM, generator=g)
        return x, (x @ w).argmax(1)

    xc, yc = clean(PER_SOURCE)
    xn = torch.randn(PER_SOURCE, DIM, generator=g)
    yn = torch.randint(0, CLASSES, (PER_SOURCE,), generator=g)
    return {"clean": TensorDataset(xc, yc), "noisy": TensorDataset(xn, yn)}, clean(64)


def per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def run(
    arm: str, seed: int, steps: int, accumulate: int = 1, dropout: float = 0.0, ref: int = 64
) -> float:
    refresh, rows, budget = ARMS[arm]
    sources, (xv, yv) = make_data(seed)
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    hidden: list[nn.Module] = [nn.Linear(DIM, 32), nn.Tanh()]
    if dropout:
        hidden.append(nn.Dropout(dropout))
    model = nn.Sequential(*hidden, nn.Linear(32, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler(sources, batch_size=BATCH, seed=seed)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    reference = ad.ReferenceBatches(TensorDataset(xv, yv), ref, seed=seed)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reference=reference,
        loss_fn=per_example,
        reference_refresh=refresh,
        rows=rows,
        budget=budget,
    )
    done, micro = 0, 0
    while done < steps:
        for x, y in loader:
            # ``accumulate`` micro-batches per optimizer step, as a Trainer's gradient
            # accumulation: GAR rewards each of them at the step.
            (per_example(model(x), y).mean() / accumulate).backward()
            micro += 1
            if micro % accumulate:
                continue
            gar.step()
            opt.step()
            opt.zero_grad()
            done += 1
            if done == steps:
                break
    gar.close()
    return sampler.weights["clean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--horizons", default="24,96,384", help="steps of each run")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout before the head")
    parser.add_argument("--ref-batch", type=int, default=64, help="reference batch (of 64)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "short_horizon.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, horizons = list(range(args.seeds)), [int(h) for h in args.horizons.split(",")]
    if args.quick:
        seeds, horizons = seeds[:2], [8]
    results: dict[str, Any] = {
        **header(),
        "seeds": seeds,
        "batch": BATCH,
        "accumulate": args.accumulate,
        "dropout": args.dropout,
        "ref_batch": args.ref_batch,
        "horizons": {},
    }
    print("| steps | arm | clean weight, mean | min | seeds below 0.9 |")
    print("|---|---|---|---|---|")
    for steps in horizons:
        per_arm: dict[str, Any] = {}
        for arm in args.arms.split(","):
            w = [
                run(arm, seed, steps, args.accumulate, args.dropout, args.ref_batch)
                for seed in seeds
            ]
            below = sum(v < 0.9 for v in w)
            per_arm[arm] = {"clean_weight": w, "mean": statistics.fmean(w), "below_0.9": below}
            print(
                f"| {steps} | {arm} | {statistics.fmean(w):.3f} | {min(w):.3f} | "
                f"{below} of {len(w)} |",
                flush=True,
            )
        results["horizons"][str(steps)] = per_arm
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
