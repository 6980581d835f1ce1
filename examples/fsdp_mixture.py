"""A learned data mixture on a model sharded by FSDP2 (``fully_shard``): run it with torchrun,
on CPU (gloo) or GPUs (nccl).

The model is sharded per Linear and at the root, so each rank holds a slice of every weight.
The one change from the DDP example is ``GAR(..., estimator="fd", reward="dot")``: the
forward-only estimator moves each rank's shards in place for its two forwards and never
gathers a parameter or a gradient (the default estimator needs each parameter whole and is
refused on FSDP2). Every rank draws its own batches; every rank ends with the same mixture.

    torchrun --standalone --nproc-per-node 2 examples/fsdp_mixture.py            # ~40 s on CPU
    torchrun --standalone --nproc-per-node 2 examples/fsdp_mixture.py --quick    # CI

With ``--checkpoint DIR`` it saves every ``--save-every`` steps into ``DIR/step-N``: the
sharded model and optimizer as a distributed checkpoint (``torch.distributed.checkpoint``,
each rank writes its shards), the sampler's and GAR's states and the RNG state in one file per
rank beside it. ``--resume`` continues from the newest complete save, with the batches and
weights an uninterrupted run would have had:

    torchrun --standalone --nproc-per-node 2 examples/fsdp_mixture.py --steps 60 --checkpoint ckpt
    torchrun --standalone --nproc-per-node 2 examples/fsdp_mixture.py --checkpoint ckpt --resume

Data: scikit-learn's digits in three sources (clean, half the labels random, all random), a
clean held-out split of 200 examples (the reference) and a test split of 197.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
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


def build(train, held_out, rank, device):
    """The sharded model, its optimizer, the sampler, the tracked loader and GAR (the same
    calls on a resume: each state is then loaded into them)."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # each Linear its own FSDP unit...
    fully_shard(model)  # ...and the root
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = ad.GARSampler(train, batch_size=32, seed=0)  # this rank's shards and keys
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
    # Batches of data the user trusts: a mixture learns from them, never from its own batches.
    reference = ad.ReferenceBatches(held_out, 128, seed=rank, device=device)
    gar = ad.GAR(
        model,
        sampler,
        optimizer=opt,
        reference=reference,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),  # per-example losses
        estimator="fd",  # forward-only: runs on the shards
        reward="dot",
    )
    return model, opt, sampler, loader, gar


def save(folder: Path, step: int, model, opt, sampler, gar, rank: int) -> None:
    """Into ``folder/step-N``: a distributed checkpoint of the sharded model and optimizer,
    and this rank's own file for what is per rank (the sampler's shards of the sources and its
    draws, GAR, the RNG). A ``done`` file, written last, marks it complete."""
    where = folder / f"step-{step}"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(where))
    mine = {
        "sampler": sampler.state_dict(),
        "gar": gar.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
    }
    torch.save(mine, where / f"adaptive_data-rank{rank}.pt")
    dist.barrier()  # every rank's file is written
    if rank == 0:
        (where / "done").touch()


def load(folder: Path, model, opt, sampler, gar, rank: int) -> tuple[int, torch.Tensor]:
    """Load the newest complete save in ``folder``; the step and the RNG state to restore
    (after the next DataLoader pass has started)."""
    done = [p.parent for p in folder.glob("step-*/done")]
    if not done:
        raise SystemExit(f"--resume: no complete checkpoint in {folder}")
    where = max(done, key=lambda p: int(p.name.split("-")[1]))
    mine = torch.load(where / f"adaptive_data-rank{rank}.pt", weights_only=True)
    gar.check_state(mine["gar"])  # refuses before anything is loaded, not halfway
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sampler.load_state_dict(mine["sampler"])
    gar.load_state_dict(mine["gar"])
    return mine["step"], mine["rng"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240, help="training steps in all")
    parser.add_argument("--quick", action="store_true", help="60 steps (a smoke run)")
    parser.add_argument("--checkpoint", type=Path, help="save into this folder")
    parser.add_argument("--save-every", type=int, default=30)
    parser.add_argument("--resume", action="store_true", help="from --checkpoint's last save")
    args = parser.parse_args()
    if args.quick:
        args.steps = 60
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint DIR")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)  # this process's GPU, before NCCL starts
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    train, held_out, test = sources()
    model, opt, sampler, loader, gar = build(train, held_out, rank, device)
    step, rng = 0, None
    if args.resume:
        step, rng = load(args.checkpoint, model, opt, sampler, gar, rank)
        if rank == 0:
            print(f"resumed at step {step}", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    with gar:
        while step < args.steps:
            batches = iter(loader)  # starting a pass draws from the global RNG...
            if rng is not None:
                torch.set_rng_state(rng)  # ...so a resume restores it after
                rng = None
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                gar.step()  # the one line; a collective, like backward()
                opt.step()
                step += 1
                if rank == 0 and step % 20 == 0:
                    w = ", ".join(f"{k} {v:.3f}" for k, v in sampler.weights.items())
                    print(f"step {step}: weights {w}", flush=True)
                if args.checkpoint and step % args.save_every == 0:
                    save(args.checkpoint, step, model, opt, sampler, gar, rank)
                if step == args.steps:
                    break
        metrics = gar.metrics()
    weights = [None] * world
    dist.all_gather_object(weights, sampler.weights)
    with torch.no_grad():  # every rank runs the forward: FSDP gathers the shards
        xt, yt = test.tensors
        acc = (model(xt.to(device)).argmax(1).cpu() == yt).float().mean().item()
    if rank == 0:
        same = all(w == weights[0] for w in weights)
        w = ", ".join(f"{k} {v:.3f}" for k, v in sampler.weights.items())
        print(f"final weights: {w}")
        print(
            f"{int(metrics['batches_rewarded'])} of {int(metrics['steps'])} batches rewarded; "
            f"{world} ranks hold identical weights: {same}; test accuracy {100 * acc:.1f}%"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
