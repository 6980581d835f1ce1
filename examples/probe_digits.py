"""GAR rewards on scikit-learn's digits: examples with wrong labels get negative rewards.

A small MLP trains on digits where a third of the training labels were replaced by random
ones. Every few steps, GradientProbe scores one batch against a clean held-out reference batch:
r_i = <grad l_i, grad L_ref>, preconditioned by Adam. The mean reward of clean examples should be
well above that of mislabelled ones, which is what the learned mixtures of adaptive_data build on.

    python examples/probe_digits.py [--steps 300] [--estimator ghost]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import adaptive_data as ad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument(
        "--estimator", default="ghost", choices=ad.ESTIMATORS, help="how rewards are computed"
    )
    parser.add_argument("--noise", type=float, default=0.33, help="fraction of random labels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=g)
    train, ref = order[:1400], order[1400:]
    noisy = torch.rand(len(train), generator=g) < args.noise
    y_train = y[train].clone()
    y_train[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = ad.GradientProbe(model, loss_fn, estimator=args.estimator)

    print(f"{'step':>5} {'train loss':>10} {'reward clean':>13} {'reward noisy':>13}")
    clean_sum = noisy_sum = 0.0
    clean_n = noisy_n = 0
    totals = {"clean": [0.0, 0], "mislabelled": [0.0, 0]}  # sum and count over the whole run
    probe_time = step_time = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (64,), generator=g)
        xb, yb = x[train[idx]], y_train[idx]
        if step % 5 == 0:
            r_idx = torch.randint(0, len(ref), (128,), generator=g)
            t0 = time.perf_counter()
            r = probe(xb, yb, reference=(x[ref[r_idx]], y[ref[r_idx]]), optimizer=opt)
            probe_time += time.perf_counter() - t0
            mask = noisy[idx]
            clean_sum += float(r[~mask].sum())
            noisy_sum += float(r[mask].sum())
            clean_n += int((~mask).sum())
            noisy_n += int(mask.sum())
            for name, part in (("clean", r[~mask]), ("mislabelled", r[mask])):
                totals[name][0] += float(part.sum())
                totals[name][1] += len(part)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(xb), yb).mean()
        loss.backward()
        opt.step()
        step_time += time.perf_counter() - t0
        if step % 50 == 0:
            print(
                f"{step:>5} {loss.item():>10.3f} {clean_sum / max(clean_n, 1):>13.3g} "
                f"{noisy_sum / max(noisy_n, 1):>13.3g}"
            )
            clean_sum = noisy_sum = 0.0
            clean_n = noisy_n = 0
    with torch.no_grad():
        acc = (model(x[ref]).argmax(1) == y[ref]).float().mean().item()
    clean, mislabelled = (total / max(n, 1) for total, n in totals.values())
    print(
        f"mean reward over the run: clean {clean:+.3g}, mislabelled {mislabelled:+.3g} "
        f"(clean positive and mislabelled negative: {clean > 0 > mislabelled})"
    )
    print(
        f"held-out accuracy {acc:.3f}; probe call {1e3 * probe_time / (args.steps // 5):.2f} ms, "
        f"training step {1e3 * step_time / args.steps:.2f} ms (estimator={args.estimator})"
    )


if __name__ == "__main__":
    main()
