"""Which reference can tell good data from bad? A clean and a random-label source, 20 seeds.

Two training sources with the same kind of inputs (16-d Gaussian, labels of a fixed random
linear teacher over 4 classes), 600 examples each: ``clean`` keeps the teacher's labels,
``noisy`` has uniformly random ones; a clean held-out split of 256 examples is never trained on.
A 16-64-4 MLP trains with Adam (lr 1e-2, batch 32) for 3 epochs on the mixture a
``GARSampler`` learns (every default: exponentiated gradient, cosine reward), starting from
0.5 / 0.5. Two references for the reward of each batch:

* ``held_out``: the one-line ``GAR(model, sampler, optimizer=opt,
  reference=ReferenceBatches(held_out, 64, seed=seed), loss_fn=...)``; each batch is rewarded
  at its own step against a clean held-out batch's gradient.
* ``next_batch``: the next batch of the learned mixture is the reference, the GAR authors'
  choice (``GAR`` refuses it over a mixture, so the explicit probe computes it):
  ``GradientProbe(estimator="ghost", reward="cosine")`` rewards batch t when batch t + 1 arrives,
  against batch t + 1's mean-loss gradient preconditioned by Adam's state, and
  ``sampler.update(r, batch=t)`` with the id read from ``sampler.last_batch`` when batch t
  arrived. An epoch's last batch is rewarded against the next epoch's first; the run's last
  batch is never rewarded (as in ``GAR``).

Reported per arm: the clean source's final weight on each seed, how many seeds end below 0.9,
its min and median, and the wall and CPU time per run (CPU time: less inflated by other work on
a shared machine). The seeds set the data, the model's
initialisation and the sampler.

    python benchmarks/reference_choice.py          # 20 seeds x 2 arms, ~2-4 min on 2 cores
    python benchmarks/reference_choice.py --quick  # smoke run (2 seeds, 1 epoch), writes nothing
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, summary, write

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("held_out", "next_batch")
THRESHOLD = 0.9  # a run "finds" the clean source when its final weight exceeds this
LOSS = nn.CrossEntropyLoss(reduction="none")


def teacher_task(seed: int, n: int = 600) -> tuple[dict[str, TensorDataset], TensorDataset]:
    """Clean and random-label sources with the same inputs (labels of a fixed random linear
    teacher), and a clean held-out split of 256 (tests/test_gar.py runs it on a few seeds)."""
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(16, 4, generator=g)

    def split(m: int, noisy: bool = False) -> TensorDataset:
        x = torch.randn(m, 16, generator=g)
        y = torch.randint(0, 4, (m,), generator=g) if noisy else (x @ w).argmax(1)
        return TensorDataset(x, y)

    return {"clean": split(n), "noisy": split(n, noisy=True)}, split(256)


def run(arm: str, seed: int, epochs: int) -> dict[str, Any]:
    sources, held_out = teacher_task(seed)
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler(sources, batch_size=32, seed=seed)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    t0, c0 = time.perf_counter(), time.process_time()
    if arm == "held_out":
        reference = ad.ReferenceBatches(held_out, 64, seed=seed)
        with ad.GAR(model, sampler, optimizer=opt, reference=reference, loss_fn=LOSS) as gar:
            for _ in range(epochs):
                for x, y in loader:
                    opt.zero_grad()
                    LOSS(model(x), y).mean().backward()
                    gar.step()
                    opt.step()
    elif arm == "next_batch":
        probe = ad.GradientProbe(model, LOSS, estimator="ghost", reward="cosine")
        previous: tuple[torch.Tensor, torch.Tensor, int] | None = None
        for _ in range(epochs):
            for x, y in loader:
                batch = sampler.last_batch  # the id of the batch just received
                if previous is not None:
                    px, py, pid = previous
                    sampler.update(probe(px, py, reference=(x, y), optimizer=opt), batch=pid)
                opt.zero_grad()
                LOSS(model(x), y).mean().backward()
                opt.step()
                previous = (x, y, batch)
    else:
        raise ValueError(f"arm should be one of {', '.join(ARMS)}, but got arm={arm!r}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seed": seed,
        "clean_weight": sampler.weights["clean"],
        "updates": sampler.metrics()["updates"],
        "wall_s": wall,
        "cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch; writes nothing")
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 (default 20)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "reference_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.epochs = 2, 1
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            parser.error(f"arms should be among {', '.join(ARMS)}, but got {arm!r}")

    results: dict[str, Any] = {
        **header(),
        "task": "clean vs random-label source, 600 examples each; held-out clean split of 256",
        "model": "MLP 16-64-4, Adam lr 1e-2, batch 32",
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        "threshold": THRESHOLD,
        "arms": {arm: {"runs": []} for arm in arms},
    }
    for seed in range(args.seeds):  # interleaved, so machine noise hits both arms alike
        for arm in arms:
            res = run(arm, seed, args.epochs)
            results["arms"][arm]["runs"].append(res)
            print(
                f"seed {seed:2d} {arm:10s} clean weight {res['clean_weight']:.3f}  "
                f"{res['wall_s']:.2f}s",
                flush=True,
            )

    print(
        f"\n| reference | seeds below {THRESHOLD} | min | median | wall s per run (median) "
        "| CPU s per run (median) |"
    )
    print("|---|---|---|---|---|---|")
    for arm, entry in results["arms"].items():
        weights = [r["clean_weight"] for r in entry["runs"]]
        entry["clean_weight"] = summary(weights)
        entry["below_threshold"] = sum(w < THRESHOLD for w in weights)
        entry["wall_s"] = summary([r["wall_s"] for r in entry["runs"]])
        entry["cpu_s"] = summary([r["cpu_s"] for r in entry["runs"]])
        print(
            f"| {arm} | {entry['below_threshold']} of {len(weights)} | {min(weights):.3f} | "
            f"{statistics.median(weights):.3f} | {entry['wall_s']['median']:.2f} | "
            f"{entry['cpu_s']['median']:.2f} |"
        )
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
