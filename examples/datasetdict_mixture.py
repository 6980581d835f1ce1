"""Learn the mixture of a Hugging Face DatasetDict's splits with one line in the training loop.

A DatasetDict with five splits built from scikit-learn's digits: "curated" (correct labels),
"web" (half the labels wrong), "scraped" (every label random), "trusted" (200 clean examples
held out of training) and "validation". GARSampler draws each batch from a mixture of the three
training splits; GAR (``gar.step()``, one line) learns the mixture from the gradient-alignment
reward against batches of the trusted split (a mixture learns from data you trust, never from
its own batches); the clean validation split measures the result. Compare with ``--uniform``
(the same loop, no learning).

    python examples/datasetdict_mixture.py            # about 10 seconds on 2 cores
    python examples/datasetdict_mixture.py --quick    # a few seconds (CI)
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, DatasetDict
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

import adaptive_data as ad


def build(seed: int) -> DatasetDict:
    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.target), generator=g).tolist()
    x = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(digits.target)[order]
    cuts = {"curated": (0, 400), "web": (400, 900), "scraped": (900, 1400)}
    splits = {}
    for name, (a, b) in cuts.items():
        labels = y[a:b].clone()
        wrong = torch.rand(b - a, generator=g) < {"curated": 0.0, "web": 0.5, "scraped": 1.0}[name]
        labels[wrong] = torch.randint(0, 10, (int(wrong.sum()),), generator=g)
        splits[name] = Dataset.from_dict({"x": x[a:b].tolist(), "y": labels.tolist()})
    for name, (a, b) in {"trusted": (1400, 1600), "validation": (1600, len(y))}.items():
        splits[name] = Dataset.from_dict({"x": x[a:b].tolist(), "y": y[a:b].tolist()})
    return DatasetDict(splits).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two epochs (a smoke run)")
    parser.add_argument("--uniform", action="store_true", help="no learning: a uniform mixture")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2
    torch.set_num_threads(1)

    dd = build(args.seed)
    sampler = ad.GARSampler(dd, batch_size=32, seed=args.seed, names=["curated", "web", "scraped"])
    # batches are dicts of tensors; track() tells the sampler which batch the loop holds
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # per-example losses, for the reference
    # Reference batches from the trusted split, as (x, y) pairs (its rows are dicts).
    reference = ad.ReferenceBatches(
        dd["trusted"],
        128,
        seed=args.seed,
        collate_fn=lambda rows: (
            torch.stack([r["x"] for r in rows]),
            torch.stack([r["y"] for r in rows]),
        ),
    )
    gar = (
        None
        if args.uniform
        else ad.GAR(model, sampler, optimizer=opt, reference=reference, loss_fn=loss_fn)
    )
    for epoch in range(args.epochs):
        for batch in loader:
            opt.zero_grad()
            loss_fn(model(batch["x"]), batch["y"]).mean().backward()
            if gar is not None:
                gar.step()  # the one line: rewards this batch, updates the mixture
            opt.step()
        weights = ", ".join(f"{k} {v:.2f}" for k, v in sampler.weights.items())
        print(f"epoch {epoch + 1}: weights {weights}")
    if gar is not None:
        gar.close()
    val = dd["validation"][:]  # a dict of tensors
    with torch.no_grad():
        accuracy = (model(val["x"]).argmax(1) == val["y"]).float().mean().item()
    print(f"validation accuracy: {100 * accuracy:.1f}%")


if __name__ == "__main__":
    main()
