"""A learned data mixture under DDP: run it with torchrun, on CPU (gloo) or GPUs (nccl).

Every rank draws its own batches from its own shard of each source; ``gar.step()`` rewards
each rank's batch against the gradient of a held-out clean reference batch (the ranks' reference
gradients are averaged, one all-reduce per step), and the sampler all-reduces the reward
statistics, so every rank holds the same mixture.

    torchrun --standalone --nproc_per_node 2 examples/ddp_mixture.py            # ~20 s on CPU
    torchrun --standalone --nproc_per_node 2 examples/ddp_mixture.py --quick    # CI

Data: scikit-learn's digits in three sources (clean, half the labels random, all random), a
clean held-out split of 200 examples (the reference) and a test split of 197.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad


def sources() -> tuple[dict[str, TensorDataset], TensorDataset, TensorDataset]:
    digits = load_digits()
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    order = torch.randperm(len(digits.target), generator=g)
    x = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(digits.target)[order]
    noisy = y[400:900].clone()
    half = torch.rand(500, generator=g) < 0.5
    noisy[half] = torch.randint(0, 10, (int(half.sum()),), generator=g)
    return (
        {
            "clean": TensorDataset(x[:400], y[:400]),
            "half_random": TensorDataset(x[400:900], noisy),
            "random": TensorDataset(x[900:1400], torch.randint(0, 10, (500,), generator=g)),
        },
        TensorDataset(x[1400:1600], y[1400:1600]),
        TensorDataset(x[1600:], y[1600:]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="two epochs (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 2
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    torch.set_num_threads(1)

    train, held_out, test = sources()
    sampler = ad.GARSampler(train, batch_size=32, seed=0)  # this rank's shards and keys
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # per-example losses, for the reference
    # Batches of data the user trusts: a mixture learns from them, never from its own batches.
    # Each rank draws its own reference batches; GAR averages their gradients.
    reference = ad.ReferenceBatches(held_out, 128, seed=rank, device=device)
    with ad.GAR(ddp, sampler, optimizer=opt, reference=reference, loss_fn=loss_fn) as gar:
        for epoch in range(args.epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss_fn(ddp(x), y).mean().backward()
                gar.step()  # the one line; a collective like backward()
                opt.step()
            if rank == 0:
                w = ", ".join(f"{k} {v:.3f}" for k, v in sampler.weights.items())
                print(f"epoch {epoch + 1}: weights {w}", flush=True)
    weights = [None] * world
    dist.all_gather_object(weights, sampler.weights)
    if rank == 0:
        same = all(w == weights[0] for w in weights)
        with torch.no_grad():
            xt, yt = test.tensors
            acc = (model(xt.to(device)).argmax(1).cpu() == yt).float().mean().item()
        print(f"{world} ranks hold identical weights: {same}; test accuracy {100 * acc:.1f}%")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
