"""A training run that checkpoints, can be killed with SIGKILL at a chosen step, and resumes
from its last checkpoint (tests/test_crash_resume.py runs it in a subprocess).

Each step appends ``{"step", "batch", "x", "weights"}`` to ``log.jsonl`` in ``--out``; a resumed
run appends the steps after its checkpoint again, and the last line of each step is the one
that counts. ``params.pt`` holds the final parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

LOSS = nn.CrossEntropyLoss(reduction="none")


def data() -> tuple[dict[str, TensorDataset], TensorDataset]:
    """A clean source (labels from a fixed linear teacher), a random-label one, and a clean
    held-out target: 40 + 40 examples, 10 batches of 8 an epoch."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 3, generator=g)

    def split(n: int, noisy: bool = False) -> TensorDataset:
        x = torch.randn(n, 6, generator=g)
        y = torch.randint(0, 3, (n,), generator=g) if noisy else (x @ teacher).argmax(1)
        return TensorDataset(x, y)

    return {"clean": split(40), "noisy": split(40, noisy=True)}, split(32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--kill-at", type=int, default=-1, help="SIGKILL after this step")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loader", choices=["DataLoader", "StatefulDataLoader"])
    args = parser.parse_args()
    torch.manual_seed(0)
    sources, target = data()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ad.GARSampler(sources, batch_size=8, seed=0)
    if args.loader == "StatefulDataLoader":
        from torchdata.stateful_dataloader import StatefulDataLoader

        base = StatefulDataLoader(sampler.dataset, batch_sampler=sampler, num_workers=args.workers)
    else:
        base = DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=args.workers)
    loader = sampler.track(base)
    ref = ad.ReferenceBatches(target, batch_size=16, seed=0)
    gar = ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=LOSS)
    ckpt_path, log_path = args.out / "ckpt.pt", args.out / "log.jsonl"
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if "loader" in ckpt:
            base.load_state_dict(ckpt["loader"])
        sampler.load_state_dict(ckpt["sampler"])
        gar.load_state_dict(ckpt["gar"])
        step = ckpt["step"]
    with log_path.open("a") as log:
        while step < args.steps:
            for x, y in loader:
                opt.zero_grad()
                LOSS(model(x), y).mean().backward()
                gar.step()
                opt.step()
                entry = {
                    "step": step,
                    "batch": sampler.last_batch,
                    "x": x[:, 0].tolist(),
                    "weights": sampler.weights,
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()
                step += 1
                if step % args.every == 0:
                    ckpt = {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sampler": sampler.state_dict(),
                        "gar": gar.state_dict(),
                        "step": step,
                    }
                    if args.loader == "StatefulDataLoader":
                        ckpt["loader"] = base.state_dict()
                    torch.save(ckpt, args.out / "ckpt.tmp")
                    os.replace(args.out / "ckpt.tmp", ckpt_path)  # never a half-written one
                if step - 1 == args.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == args.steps:
                    break
    gar.close()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out / "params.pt")


if __name__ == "__main__":
    main()
