"""How much does an augmentation op move GAR's reward, against the differences between examples?

A diagnostic for the learned augmentation policy. The 5-conv CNN of ``augment_quality.py``
trains with crop+flip on the same CIFAR-10 subset; after each of ``--checkpoints`` epochs a
fixed set of ``--batch`` training images (crop+flip with a fixed seed per image) is rewarded
under every op of the TrivialAugmentWide table at one magnitude bin (``--bin``; signed ops
positive). As in a GAR batch, the ops are mixed within a batch: in rotation ``j`` image ``i``
gets op ``(i + j) mod K``, so that over ``K`` rotations every image is seen under every op and
every batch holds every op about ``B / K`` times. Each batch is rewarded like
``augment_quality``'s ``gar_clean_ref`` arm: ``GradientProbe(method="ghost",
reward="cosine")`` (``--reward dot``: the plain reward) against an un-augmented reference
batch of other training images, with the SGD optimizer's state. ``R[k, i]`` is image i's
reward under op k. Per checkpoint it reports:

* ``op_effect[k]``: the mean of ``R[k, :]`` minus the mean over all ops (what the policy should
  learn), and ``spread_ops``: their standard deviation;
* ``sd_total``: the standard deviation of ``R`` around each op's mean, what one reward in a
  mixed batch varies by (the noise a policy update sees);
* ``sd_within_example``: the same after removing each image's own mean over ops (what is left
  if every example had its own baseline);
* ``n_needed``: examples per op for the best op's effect to stand 2 standard errors clear of
  zero, ``(2 sd / best effect)^2``, with either noise.

Figures go to ``benchmarks/results/augment_signal.json`` (``augment_signal_dot.json`` with
``--reward dot``).

    python benchmarks/augment_signal.py [DATA_DIR]          # a few minutes on 2 cores
    python benchmarks/augment_signal.py [DATA_DIR] --quick  # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import adaptive_data as ad

from _common import header, write
from augment_quality import DEFAULT_CACHE, DEFAULT_DATA, Images, cnn, load, pipeline, subset

RESULTS = Path(__file__).resolve().parent / "results"


def fixed_op(op: str, magnitude: float) -> Any:
    return lambda image: ad.apply_op(image, op, magnitude)


def batch_under(
    data: Images, ops: list[tuple[str, float]], idx: list[int], rotation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``idx`` under ops ``(i + rotation) mod K``, each with its own fixed crop and flip."""
    xs, ys = [], []
    for pos, i in enumerate(idx):
        op, magnitude = ops[(pos + rotation) % len(ops)]
        torch.manual_seed(1000 + i)  # the same crop and flip under every op (benchmark code)
        xs.append(pipeline(fixed_op(op, magnitude))(data.images[i]))
        ys.append(data.labels[i])
    return torch.stack(xs).contiguous(memory_format=torch.channels_last), torch.tensor(ys)


def measure(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Images,
    ops: list[tuple[str, float]],
    idx: list[int],
    ref: tuple[torch.Tensor, torch.Tensor],
    reward: str,
) -> dict[str, Any]:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    probe = ad.GradientProbe(model, loss_fn, method="ghost", reward=reward)
    k, n = len(ops), len(idx)
    rewards = torch.empty(k, n, dtype=torch.float64)
    for rotation in range(k):
        x, y = batch_under(data, ops, idx, rotation)
        r = probe(x, y, reference=ref, optimizer=opt).double()
        for pos in range(n):
            rewards[(pos + rotation) % k, pos] = r[pos]
    op_mean = rewards.mean(1)
    effect = op_mean - op_mean.mean()
    sd_total = float((rewards - op_mean[:, None]).std())
    within = rewards - rewards.mean(0, keepdim=True)  # each image's own mean over ops removed
    sd_within = float((within - within.mean(1, keepdim=True)).std())
    best = int(effect.argmax())
    gap = float(effect[best])
    return {
        "op_effect": {op: float(e) for (op, _), e in zip(ops, effect, strict=True)},
        "best_op": ops[best][0],
        "best_effect": gap,
        "spread_ops": float(effect.std()),
        "sd_total": sd_total,
        "sd_within_example": sd_within,
        "n_needed": (2 * sd_total / gap) ** 2 if gap > 0 else None,
        "n_needed_with_example_baseline": (2 * sd_within / gap) ** 2 if gap > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="decoded-array cache")
    parser.add_argument("--per-class", type=int, default=400, help="training images per class")
    parser.add_argument("--checkpoints", default="1,5,10", help="epochs of crop+flip training")
    parser.add_argument("--batch", type=int, default=128, help="images rewarded per rotation")
    parser.add_argument("--bin", type=int, default=15, help="magnitude bin of every op (of 31)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default="cosine", choices=["cosine", "dot"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/augment_signal[_dot].json"
    )
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.reward == "cosine" else f"_{args.reward}"
        args.out = RESULTS / f"augment_signal{suffix}.json"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.per_class, args.checkpoints, args.batch = 20, "1", 16
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    table = ad.trivial_augment_wide_table(31)
    ops = [(op, 0.0 if mags is None else mags[args.bin]) for op, (mags, _) in table.items()]

    arrays = load(args.data, args.cache)
    x_train, y_train = subset(arrays, args.per_class)
    data = Images(x_train, y_train, pipeline(None))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=g).tolist()
    idx, ref_idx = order[: args.batch], order[args.batch : 2 * args.batch]
    torch.manual_seed(args.seed)  # crop/flip of the reference and the model (benchmark code)
    ref_x = torch.stack([data[i][0] for i in ref_idx]).contiguous(memory_format=torch.channels_last)
    ref = (ref_x, torch.tensor([data.labels[i] for i in ref_idx]))

    model = cnn(16).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sampler = ad.GARSampler(data, batch_size=128, seed=args.seed)
    loader = DataLoader(sampler.dataset, batch_sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    results: dict[str, Any] = {
        **header(),
        "train_images": len(data),
        "batch": args.batch,
        "bin": args.bin,
        "reward": args.reward,
        "magnitudes": dict(ops),
        "checkpoints": {},
    }
    epoch = 0
    for stop in checkpoints:
        while epoch < stop:
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
                opt.step()
            epoch += 1
        m = measure(model, opt, data, ops, idx, ref, args.reward)
        results["checkpoints"][str(stop)] = m
        top = sorted(m["op_effect"].items(), key=lambda kv: -kv[1])[:3]
        print(
            f"after {stop} epochs: op effects {statistics.pstdev(m['op_effect'].values()):.4f} "
            f"(best {', '.join(f'{o} {e:+.4f}' for o, e in top)}), sd per reward "
            f"{m['sd_total']:.4f}, within an example {m['sd_within_example']:.4f}; examples per "
            f"op to see the best: {m['n_needed'] or float('nan'):.0f} "
            f"({m['n_needed_with_example_baseline'] or float('nan'):.0f} with a per-example "
            "baseline)",
            flush=True,
        )
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
