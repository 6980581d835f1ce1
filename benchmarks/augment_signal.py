"""How much does an augmentation op move GAR's reward, against the differences between examples?

A diagnostic for the learned augmentation policy. The 5-conv CNN of ``augment_quality.py``
trains with crop+flip on the same CIFAR-10 subset; after each of ``--checkpoints`` epochs a
fixed set of ``--batch`` training images (crop+flip with a fixed seed per image) is rewarded
under every op of the TrivialAugmentWide table at one magnitude bin (``--bin``; signed ops
positive). As in a GAR batch, the ops are mixed within a batch: in rotation ``j`` image ``i``
gets op ``(i + j) mod K``, so that over ``K`` rotations every image is seen under every op and
every batch holds every op about ``B / K`` times. Each batch is rewarded like
``augment_quality``'s ``gar_clean_ref`` arm: ``GradientProbe(estimator="ghost",
reward="cosine")`` (``--reward dot``: the plain reward) against each of ``--references``
un-augmented reference batches of other training images (a GAR run meets a new reference
batch at every update), with the SGD optimizer's state. ``R[j, k, i]`` is image i's reward
under op k against reference j. Per checkpoint it reports:

* ``op_effect[k]``: the mean of ``R[:, k, :]`` minus the mean over all ops (what the policy
  should learn), and ``spread_ops``: their standard deviation;
* ``op_effect_se[k]``: the standard error of op k's effect over the reference batches (how much
  the choice of reference batch moves it), and ``reference_agreement``: the mean correlation,
  over pairs of reference batches, of the op effects measured against each;
* ``sd_total``: the standard deviation of ``R`` around each op's mean per reference, what one
  reward in a mixed batch varies by (the noise a policy update sees);
* ``sd_within_example``: the same after removing each image's own mean over ops (what is left
  if every example had its own baseline);
* ``n_needed``: examples per op for the best op's effect to stand 2 standard errors clear of
  zero, ``(2 sd / best effect)^2``, with either noise.

``--reference heldout`` takes the reference batches from CIFAR-10 training images outside the
training subset (file indices from ``--per-class`` on), i.e. data the model never trains on,
instead of from the training subset.

Figures go to ``benchmarks/results/augment_signal.json`` (``augment_signal_dot.json`` with
``--reward dot``). ``--compare FILE...`` prints, from such files (runs at several ``--bin``,
say), each op's effect minus Identity's at every checkpoint: how the reward of an op at that
magnitude compares with leaving the image alone (the model checkpoints are the same in every
run, so the columns are comparable).

    python benchmarks/augment_signal.py [DATA_DIR]          # about 6 minutes on 2 cores
    python benchmarks/augment_signal.py [DATA_DIR] --quick  # smoke run, writes nothing
    python benchmarks/augment_signal.py --compare benchmarks/results/augment_signal_bin3.json \
        benchmarks/results/augment_signal.json benchmarks/results/augment_signal_bin27.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    refs: list[tuple[torch.Tensor, torch.Tensor]],
    reward: str,
) -> dict[str, Any]:
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    probe = ad.GradientProbe(model, loss_fn, estimator="ghost", reward=reward)
    k, n = len(ops), len(idx)
    per_ref = torch.empty(len(refs), k, n, dtype=torch.float64)
    for rotation in range(k):
        x, y = batch_under(data, ops, idx, rotation)
        for j, ref in enumerate(refs):
            r = probe(x, y, reference=ref, optimizer=opt).double()
            for pos in range(n):
                per_ref[j, (pos + rotation) % k, pos] = r[pos]
    # Op effects under each reference batch, and their mean: the expected reward a policy
    # learns from over many updates, each against another reference batch.
    ref_effects = per_ref.mean(2) - per_ref.mean((1, 2))[:, None]  # [refs, ops]
    rewards = per_ref.mean(0)  # [ops, images], averaged over the reference batches
    op_mean = rewards.mean(1)
    effect = op_mean - op_mean.mean()
    # Noise of one reward in a GAR batch: one image under one op against one reference.
    sd_total = float((per_ref - per_ref.mean(2, keepdim=True)).std())
    within = per_ref - per_ref.mean(1, keepdim=True)  # each image's own mean over ops removed
    sd_within = float((within - within.mean(2, keepdim=True)).std())
    best = int(effect.argmax())
    gap = float(effect[best])
    out = {
        "op_effect": {op: float(e) for (op, _), e in zip(ops, effect, strict=True)},
        "best_op": ops[best][0],
        "best_effect": gap,
        "spread_ops": float(effect.std()),
        "sd_total": sd_total,
        "sd_within_example": sd_within,
        "n_needed": (2 * sd_total / gap) ** 2 if gap > 0 else None,
        "n_needed_with_example_baseline": (2 * sd_within / gap) ** 2 if gap > 0 else None,
        "references": len(refs),
    }
    if len(refs) > 1:
        # How much the choice of reference batch moves each op's effect (standard error of
        # the mean over references), and whether two references rank the ops alike (mean
        # correlation of their op-effect vectors over all pairs).
        se = ref_effects.std(0) / len(refs) ** 0.5
        corr = torch.corrcoef(ref_effects)
        pairs = corr[torch.triu_indices(len(refs), len(refs), 1).unbind()]
        out["op_effect_se"] = {op: float(e) for (op, _), e in zip(ops, se, strict=True)}
        out["reference_agreement"] = float(pairs.mean())
        out["op_effect_per_reference"] = ref_effects.tolist()  # [reference][op], ops in order
    return out


def compare(paths: list[Path]) -> None:
    """Print each op's effect minus Identity's, per checkpoint, one column per results file,
    with two standard errors over the reference batches where a file has several."""
    runs = [json.loads(p.read_text()) for p in paths]
    columns = [f"{r['reward']} bin {r['bin']} ref {r['reference']}" for r in runs]
    for ck in runs[0]["checkpoints"]:
        print(f"\nafter {ck} epochs: op effect minus Identity's (± 2 standard errors)")
        print("| op | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(runs))
        for op in runs[0]["checkpoints"][ck]["op_effect"]:
            cells = []
            for r in runs:
                res = r["checkpoints"][ck]
                names = list(res["op_effect"])
                k, ident = names.index(op), names.index("Identity")
                cell = f"{res['op_effect'][op] - res['op_effect']['Identity']:+.4f}"
                per = res.get("op_effect_per_reference")
                if per and len(per) > 1:
                    diffs = [row[k] - row[ident] for row in per]
                    cell += f" ± {2 * statistics.stdev(diffs) / len(diffs) ** 0.5:.4f}"
                cells.append(cell)
            print(f"| {op} | " + " | ".join(cells) + " |")


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
    parser.add_argument(
        "--reference",
        default="train",
        choices=["train", "heldout"],
        help="reference batch from the training subset or from images outside it",
    )
    parser.add_argument(
        "--references", type=int, default=8, help="reference batches to average the rewards over"
    )
    parser.add_argument(
        "--compare", type=Path, nargs="+", help="print op effects minus Identity's from results"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/augment_signal[_dot].json"
    )
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.out is None:
        suffix = "" if args.reward == "cosine" else f"_{args.reward}"
        suffix += "" if args.reference == "train" else f"_{args.reference}"
        args.out = RESULTS / f"augment_signal{suffix}.json"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.per_class, args.checkpoints, args.batch, args.references = 20, "1", 16, 2
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    table = ad.trivial_augment_wide_table(31)
    ops = [(op, 0.0 if mags is None else mags[args.bin]) for op, (mags, _) in table.items()]

    arrays = load(args.data, args.cache)
    x_train, y_train = subset(arrays, args.per_class)
    data = Images(x_train, y_train, pipeline(None))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=g).tolist()
    b, m = args.batch, args.references
    idx = order[:b]
    ref_data, ref_pool = data, order[b : b + m * b]
    if args.reference == "heldout":
        outside = arrays["i_train"] >= args.per_class
        ref_data = Images(arrays["x_train"][outside], arrays["y_train"][outside], pipeline(None))
        ref_pool = torch.randperm(len(ref_data), generator=g)[: m * b].tolist()
    if len(ref_pool) < m * b:
        sys.exit(f"{m} reference batches of {b} need {m * b} images, only {len(ref_pool)} left")
    torch.manual_seed(args.seed)  # crop/flip of the references and the model (benchmark code)
    refs = []
    for j in range(m):
        chosen = ref_pool[j * b : (j + 1) * b]
        ref_x = torch.stack([ref_data[i][0] for i in chosen])
        refs.append(
            (
                ref_x.contiguous(memory_format=torch.channels_last),
                torch.tensor([ref_data.labels[i] for i in chosen]),
            )
        )

    model = cnn(16).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sampler = ad.GARSampler(data, batch_size=128, seed=args.seed)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    loss_fn = nn.CrossEntropyLoss()
    results: dict[str, Any] = {
        **header(),
        "train_images": len(data),
        "batch": args.batch,
        "bin": args.bin,
        "reward": args.reward,
        "reference": args.reference,
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
        res = measure(model, opt, data, ops, idx, refs, args.reward)
        results["checkpoints"][str(stop)] = res
        top = sorted(res["op_effect"].items(), key=lambda kv: -kv[1])[:3]
        agreement = res.get("reference_agreement")
        print(
            f"after {stop} epochs: op effects {statistics.pstdev(res['op_effect'].values()):.4f} "
            f"(best {', '.join(f'{o} {e:+.4f}' for o, e in top)}), sd per reward "
            f"{res['sd_total']:.4f}, within an example {res['sd_within_example']:.4f}; examples "
            f"per op to see the best: {res['n_needed'] or float('nan'):.0f} "
            f"({res['n_needed_with_example_baseline'] or float('nan'):.0f} with a per-example "
            f"baseline); references agree on the ranking: "
            f"{float('nan') if agreement is None else agreement:.2f} (mean correlation)",
            flush=True,
        )
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
