"""How stale may the held-out reference gradient be before the rewards degrade?

``GAR(reference_refresh=k)`` computes the reference gradient at most every k steps and reuses
it in between. This study measures what that reuse does to the rewards themselves, along a
training run, early and late, against the noise a fresh reference batch carries anyway.

A model trains on the uniform mixture of the task's sources (the weights never move, so the
batches do not depend on the rewards). At every step t the reference gradient ``g_t`` of a
fresh reference batch is computed and kept for the last ``max(lags)`` steps, and the batch
about to be trained on is rewarded (``GradientProbe(estimator="ghost", reward="cosine")``, the
direction preconditioned by the optimizer's current state, as ``GAR`` does) against:

* ``g_t`` (fresh, the every-step default);
* ``g_{t-k}`` for each lag ``k`` (what ``reference_refresh=k + 1`` uses at its oldest);
* ``g'_t``, the gradient of a *second*, independent fresh reference batch: the noise floor.
  A stale gradient that agrees with ``g_t`` as well as ``g'_t`` does loses nothing that a
  new reference batch would not lose anyway.

Two agreements with the fresh rewards, averaged over the steps of a phase (the first 10% of
the steps, and the rest):

* ``example``: Pearson correlation of the per-example rewards of the batch;
* ``source``: what the mixture policy reads. The rewards are z-scored within the batch (the
  sampler's default ``normalize="batch"``) and averaged per source; ``source`` is the cosine
  between the two rewards' per-source vectors (centred).

Tasks: ``fmnist`` (``mixture_quality.py``'s four Fashion-MNIST sources and held-out
reference, its CNN, Adam 1e-3, batch 64, reference batch 128) and ``lm`` (``lm_mixture.py``'s
six byte-level sources and target reference, its transformer with positions ``[B, T]``,
AdamW 1e-3, batch 16, reference batch 32).

    python benchmarks/reference_staleness.py [DATA_DIR] --task fmnist   # about 8 min
    python benchmarks/reference_staleness.py [DATA_DIR] --task lm       # about 12 min
    python benchmarks/reference_staleness.py --quick                    # smoke run

``DATA_DIR`` holds ``fashion-mnist/`` and ``text/`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, summary, write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def with_ids(sources: dict[str, TensorDataset]) -> dict[str, TensorDataset]:
    """Each example ``(x, y, source id)``: the batch says which source each row came from."""
    return {
        name: TensorDataset(*ds.tensors[:2], torch.full((len(ds),), i, dtype=torch.long))
        for i, (name, ds) in enumerate(sources.items())
    }


def fmnist_task(data: Path, quick: bool) -> dict[str, Any]:
    import mixture_quality as mq

    xtr, ytr, _, _ = mq.load(data)
    sizes = {"clean": 2000, "label_noise": 4000, "pixel_noise": 3000, "inverted": 3000}
    if quick:
        sizes = {n: 200 for n in sizes}
    sources, ref_set = mq.build_sources(xtr, ytr, sizes, 1000)
    return {
        "sources": with_ids(sources),
        "ref_set": ref_set,
        "model": mq.CNN,
        "optimizer": lambda p: torch.optim.Adam(p, lr=1e-3),
        "loss_fn": nn.CrossEntropyLoss(reduction="none"),
        "batch": 64,
        "ref_batch": 128,
        "steps": 748,
    }


def lm_task(data: Path, quick: bool) -> dict[str, Any]:
    import lm_mixture as lm

    sources, ref_set, _ = lm.load(data, 0.02 if quick else 1.0)
    return {
        "sources": with_ids(sources),
        "ref_set": ref_set,
        "model": lambda: lm.ByteLM(expand_positions=True),
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "loss_fn": lm.per_example_loss,
        "batch": 16,
        "ref_batch": 32,
        "steps": 150,
    }


def gradient(model: nn.Module, loss_fn: Any, batch: Any) -> dict[str, torch.Tensor]:
    """The mean reference loss's gradient, ``{name: tensor}``; ``.grad`` untouched."""
    x, y = batch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y).mean(), [p for _, p in named])
    return {n: g.detach() for (n, _), g in zip(named, grads, strict=True)}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def per_source(r: torch.Tensor, src: torch.Tensor, k: int) -> torch.Tensor:
    """Per-source mean of the batch-z-scored rewards (0 for a source absent from the batch)."""
    z = (r.double() - r.double().mean()) / r.double().std().clamp_min(1e-12)
    out = torch.zeros(k, dtype=torch.float64)
    for s in src.unique().tolist():
        out[s] = z[src == s].mean()
    return out


def run(task: dict[str, Any], seed: int, lags: list[int], steps: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = task["model"]()
    opt = task["optimizer"](model.parameters())
    loss_fn = task["loss_fn"]
    k = len(task["sources"])
    sampler = ad.GARSampler(task["sources"], batch_size=task["batch"], seed=seed)
    refs = iter(ad.ReferenceBatches(task["ref_set"], task["ref_batch"], seed=seed))
    refs_b = iter(ad.ReferenceBatches(task["ref_set"], task["ref_batch"], seed=seed + 1000))
    probe = ad.GradientProbe(model, loss_fn, estimator="ghost", reward="cosine")
    kept: deque[dict[str, torch.Tensor]] = deque(maxlen=max(lags) + 1)
    rows: list[dict[str, float]] = []
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    t0 = time.perf_counter()
    while len(rows) < steps:
        for x, y, src in loader:
            fresh = gradient(model, loss_fn, next(refs))
            kept.appendleft(fresh)
            r0 = probe(x, y, direction=fresh, optimizer=opt)
            s0 = per_source(r0, src, k)
            row: dict[str, float] = {}
            others = {"fresh_b": gradient(model, loss_fn, next(refs_b))}
            others.update({f"lag{lag}": kept[lag] for lag in lags if lag < len(kept)})
            for name, g in others.items():
                r = probe(x, y, direction=g, optimizer=opt)
                row[f"{name}_example"] = pearson(r, r0)
                a, b = per_source(r, src, k), s0
                row[f"{name}_source"] = pearson(a, b)
            rows.append(row)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            opt.step()
            if len(rows) == steps:
                break
    return {"rows": rows, "wall_s": time.perf_counter() - t0}


def phases(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each agreement's mean over the first 10% of the steps (``early``) and the rest."""
    cut = max(1, len(rows) // 10)
    out: dict[str, dict[str, float]] = {}
    for key in rows[-1]:
        for phase, part in (("early", rows[:cut]), ("late", rows[cut:])):
            values = [r[key] for r in part if key in r and r[key] == r[key]]
            if values:
                out.setdefault(key, {})[phase] = statistics.fmean(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--task", choices=("fmnist", "lm"), default="fmnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lags", default="1,3,7,15,31")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few steps; writes nothing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = (fmnist_task if args.task == "fmnist" else lm_task)(args.data, args.quick)
    lags = [int(v) for v in args.lags.split(",")]
    steps = args.steps or task["steps"]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        steps, seeds, lags = 6, seeds[:1], [1, 3]
    results: dict[str, Any] = {
        **header(),
        "task": args.task,
        "steps": steps,
        "lags": lags,
        "seeds": seeds,
        "runs": [],
    }
    for seed in seeds:
        res = run(task, seed, lags, steps)
        res["seed"] = seed
        res["phases"] = phases(res.pop("rows"))
        results["runs"].append(res)
        print(f"seed {seed}: {res['wall_s']:.0f} s", flush=True)
    keys = ["fresh_b", *(f"lag{lag}" for lag in lags)]
    table: dict[str, Any] = {}
    print(
        "\n| reference against the fresh one | example, early | example, late | source, early "
        "| source, late |"
    )
    print("|---|---|---|---|---|")
    for key in keys:
        cells = {}
        for what in ("example", "source"):
            for phase in ("early", "late"):
                values = [
                    r["phases"][f"{key}_{what}"][phase]
                    for r in results["runs"]
                    if phase in r["phases"].get(f"{key}_{what}", {})
                ]
                cells[f"{what}_{phase}"] = summary(values) if values else None
        table[key] = cells
        text = " | ".join(
            "-" if cells[c] is None else f"{cells[c]['mean']:.3f} ± {cells[c]['std']:.3f}"
            for c in ("example_early", "example_late", "source_early", "source_late")
        )
        label = "another fresh batch" if key == "fresh_b" else f"{key[3:]} steps old"
        print(f"| {label} | {text} |")
    results["table"] = table
    if not args.quick:
        write(args.out or RESULTS / f"reference_staleness_{args.task}.json", results)


if __name__ == "__main__":
    main()
