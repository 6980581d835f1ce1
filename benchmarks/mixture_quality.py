"""Does GARSampler learn a good data mixture? Fashion-MNIST with three corrupted sources.

Four training sources cut from disjoint parts of the Fashion-MNIST training set:

* ``clean`` (2,000 examples), the only useful one;
* ``label_noise`` (4,000): labels replaced by uniformly random ones;
* ``pixel_noise`` (3,000): Gaussian pixel noise of standard deviation 1.5 (pixels in [0, 1]);
* ``inverted`` (3,000): a shifted source, images ``1 - x``.

A held-out clean split (1,000 training images) is the reference; accuracy is measured on the
10,000 test images. A small CNN (2 conv + 1 linear, ~19k parameters) trains with Adam (lr 1e-3,
batch 64) for the same number of steps under each mixture:

* ``uniform`` and ``proportional`` (to source sizes): fixed weights; ``uniform_x2`` (not in
  the default run): the uniform mixture for twice the steps, an equal-compute baseline for
  the GAR arms that cost about 2x;
* ``exp3_loss``: the online loss bandit of ODM: exponentiated gradient on the training loss;
* GAR arms (``GAR_ARMS``): GARSampler updated with the rewards of
  ``GradientProbe(estimator="ghost")`` against a reference batch (128) from the held-out split,
  preconditioned by Adam's state: ``gar_dot`` with the plain reward ``<g_i, D>``, the others
  with ``reward="cosine"`` (``<g_i, D> / (||g_i|| ||D||)``): ``gar_reinforce`` (REINFORCE),
  ``gar_exp_grad`` (exponentiated gradient, the default rule and step size 0.3),
  ``gar_exp_grad_lr0.1`` (a third of that step), ``gar_exp_grad_k4`` (probe and update every
  4th step only), ``gar_exp_grad_floor0.05`` (five times the default exploration floor, the
  former default);
* one-line arms (``LINE_ARMS``): the loop the README shows, ``GAR(model, sampler,
  optimizer=opt, reference=ReferenceBatches(held_out, 128, seed=seed), loss_fn=...)`` with
  ``gar.step()`` after ``backward()``, every default otherwise (cosine reward, exponentiated
  gradient): ``gar_line`` rewards every step's batch, ``gar_line_k4`` every 4th step's,
  ``gar_line_r8`` every step's against a reference gradient recomputed every 8th step
  (``reference_refresh=8``), ``gar_line_rows16`` 16 rows of every batch of 64 (``rows=16``),
  ``gar_line_rows16_r8`` both (``gar_line_r32``, ``gar_line_rows16_r32``: the reference
  every 32nd step);
  ``gar_line_fd_rows16_r8`` the same with ``estimator="fd"``
  (forward-only rewards, ``reward="dot"``), ``gar_line_dot_rows16_r8`` its control (the exact
  rewards, ``reward="dot"``). The reference batches are the same as the probe
  arms' (same held-out split and seed);
* ``oracle``: the clean source only; ``oracle_floor``: the clean source at the largest weight the
  exploration floor allows (every other source keeps ``0.01 / 4``), never updated: the best
  any learned mixture with the default floor can do.

3 seeds each (model initialisation and sampler seed), interleaved. Reported: test accuracy
(mean, std, min, max over seeds), wall and CPU time per run, GAR's overhead (its run time
over uniform's, in both), the time spent in the probe and ``update()`` calls (``probe_s``; in
``gar.step()`` for the one-line arms, whose hooks also add to the training forward and
backward), the first step at which each corrupted source's weight fell below 5%, and the
weights over time (``benchmarks/results/mixture_quality_weights.png``); with ``--eval-every N``
the accuracy on ``--eval-size`` test images every N steps against CPU time (evaluation not
counted), in ``..._time.png``.

    python benchmarks/mixture_quality.py [DATA_DIR]          # full run, ~10-20 min on 2 cores
    python benchmarks/mixture_quality.py [DATA_DIR] --quick  # smoke run (seconds), writes nothing

The one-line arms beside the probe (``benchmarks/results/mixture_line.json``)::

    python benchmarks/mixture_quality.py --out benchmarks/results/mixture_line.json \
        --methods uniform,gar_exp_grad,gar_line,gar_line_k4,oracle

``DATA_DIR`` holds ``fashion-mnist/*.gz`` (default: ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import expect_fixed_arms, header, summary, write

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# GAR arms: policy rule, policy lr (None: the rule's default), the probe's reward, probe every
# k, and the exploration floor's total mass (None: the default, 0.01; each source gets 1/K of it).
GAR_ARMS: dict[str, tuple[str, float | None, str, int, float | None]] = {
    "gar_dot": ("exp_grad", 0.1, "dot", 1, None),  # the dot reward's best step (0.3 is worse)
    "gar_reinforce": ("reinforce", None, "cosine", 1, None),
    "gar_exp_grad": ("exp_grad", None, "cosine", 1, None),
    "gar_exp_grad_lr0.1": ("exp_grad", 0.1, "cosine", 1, None),
    "gar_exp_grad_k4": ("exp_grad", None, "cosine", 4, None),
    "gar_exp_grad_floor0.05": ("exp_grad", None, "cosine", 1, 0.05),  # the former default
}
# One-line GAR arms: (every, reference_refresh, rows, estimator, budget); "fd" arms use
# reward="dot" (the only reward it estimates), the others GAR's default. The explicit arms have
# no budget (budget=None: exactly what they measured before budget= existed); the budget arms
# leave every, reference_refresh and rows to it (gar_default: every default).
LINE_ARMS: dict[str, tuple[int | None, int | None, int | None, str, float | None]] = {
    "gar_line": (1, 1, None, "ghost", None),
    "gar_line_k4": (4, 1, None, "ghost", None),
    "gar_line_r8": (1, 8, None, "ghost", None),
    "gar_line_rows16": (1, 1, 16, "ghost", None),
    "gar_line_rows16_r8": (1, 8, 16, "ghost", None),
    "gar_line_r32": (1, 32, None, "ghost", None),
    "gar_line_rows16_r32": (1, 32, 16, "ghost", None),
    "gar_line_fd_rows16_r8": (1, 8, 16, "fd", None),
    "gar_line_dot_rows16_r8": (1, 8, 16, "ghost_dot", None),  # the estimator's control
    "gar_default": (None, None, None, "ghost", 0.1),
    "gar_budget0.2": (None, None, None, "ghost", 0.2),
    "gar_budget0.4": (None, None, None, "ghost", 0.4),
}
METHODS = (
    "uniform",
    "proportional",
    "exp3_loss",
    *GAR_ARMS,
    *LINE_ARMS,
    "oracle_floor",
    "oracle",
)
CORRUPTED = ("label_noise", "pixel_noise", "inverted")
MEAN, STD = 0.286, 0.353  # Fashion-MNIST pixel statistics


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): byte 3 = number of dims n, then n big-endian uint32 sizes, then uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    folder = data_dir / "fashion-mnist"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        sys.exit(
            f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}.\n"
            "Pass the folder that holds fashion-mnist/ as the first argument, e.g.\n"
            "    python benchmarks/mixture_quality.py /path/to/data\n"
            "(the IDX .gz files from https://github.com/zalandoresearch/fashion-mnist)."
        )
    arrays = [torch.from_numpy(read_idx(folder / f).copy()) for f in FILES]
    xtr, ytr, xte, yte = arrays
    return (
        xtr.float().div(255).unsqueeze(1),
        ytr.long(),
        xte.float().div(255).unsqueeze(1),
        yte.long(),
    )


def build_sources(
    xtr: torch.Tensor, ytr: torch.Tensor, sizes: dict[str, int], n_ref: int
) -> tuple[dict[str, TensorDataset], TensorDataset]:
    """Disjoint subsets of the training set, corrupted as described (fixed data seed 1234)."""
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(xtr), generator=g)
    out: dict[str, TensorDataset] = {}
    start = 0
    for name, n in sizes.items():
        idx = perm[start : start + n]
        start += n
        x, y = xtr[idx].clone(), ytr[idx].clone()
        if name == "label_noise":
            y = torch.randint(0, 10, (n,), generator=g)
        elif name == "pixel_noise":
            x = x + 1.5 * torch.randn(x.shape, generator=g)
        elif name == "inverted":
            x = 1.0 - x
        out[name] = TensorDataset((x - MEAN) / STD, y)
    idx = perm[start : start + n_ref]
    ref = TensorDataset((xtr[idx] - MEAN) / STD, ytr[idx])
    return out, ref


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
        for i in range(0, len(x), 1000)
    )
    model.train()
    return 100.0 * correct / len(x)


def run(
    method: str,
    seed: int,
    sources: dict[str, TensorDataset],
    ref_set: TensorDataset,
    test: tuple[torch.Tensor, torch.Tensor],
    steps_per_epoch: int,
    epochs: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    kw: dict[str, Any] = {"batch_size": args.batch, "seed": seed, "num_batches": steps_per_epoch}
    if args.lag is not None:
        kw["lag"] = args.lag
    gar = method in GAR_ARMS
    line = method in LINE_ARMS
    every = 1
    if method == "oracle":
        sampler = ad.GARSampler({"clean": sources["clean"]}, **kw)
    elif method == "oracle_floor":
        sampler = ad.GARSampler(sources, weights={"clean": 1.0}, **kw)
    elif method == "proportional":
        sampler = ad.GARSampler(sources, weights="proportional", **kw)
    elif method == "exp3_loss":
        sampler = ad.GARSampler(sources, rule="exp_grad", lr=0.1, **kw)
    elif gar:
        rule, lr, reward, every, floor = GAR_ARMS[method]
        if floor is not None:
            kw["floor"] = floor / len(sources)
        sampler = ad.GARSampler(sources, rule=rule, lr=lr, **kw)
    else:
        sampler = ad.GARSampler(sources, **kw)
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=0))
    probe = ad.GradientProbe(model, loss_fn, estimator="ghost", reward=reward) if gar else None
    ref = (
        ad.ReferenceBatches(ref_set, batch_size=args.ref_batch, seed=seed) if gar or line else None
    )
    one_line = None
    if line:
        line_every, refresh, rows, estimator, budget = LINE_ARMS[method]
        extra: dict[str, Any] = {}
        if estimator != "ghost":  # "fd", or "ghost_dot": the exact rewards, reward="dot"
            extra = {"estimator": estimator.removeprefix("ghost_").replace("dot", "ghost")}
            extra["reward"] = "dot"
        one_line = ad.GAR(
            model,
            sampler,
            optimizer=opt,
            every=line_every,
            reference=ref,
            loss_fn=loss_fn,
            reference_refresh=refresh,
            rows=rows,
            budget=budget,
            **extra,
        )
    probe_time = 0.0
    below: dict[str, int | None] = {name: None for name in CORRUPTED}
    step = 0
    # (step, wall s, CPU s, accuracy on the first eval_size test images); evaluation is not
    # counted in the times
    curve: list[tuple[int, float, float, float]] = []
    wall = cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "uniform_x2":  # the uniform mixture for twice the steps: equal compute
        epochs *= 2
    for _ in range(epochs):
        for x, y in loader:
            if gar and step % every == 0:
                tp = time.perf_counter()
                r = probe(x, y, reference=tuple(next(ref)), optimizer=opt)
                sampler.update(r)
                probe_time += time.perf_counter() - tp
            losses = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            if one_line is not None:
                tp = time.perf_counter()
                one_line.step()
                probe_time += time.perf_counter() - tp
            opt.step()
            if method == "exp3_loss":
                sampler.update(losses.detach())
            step += 1
            for name in CORRUPTED:
                if below[name] is None and name in sampler.weights and sampler.weights[name] < 0.05:
                    below[name] = step
            if args.eval_every and step % args.eval_every == 0:
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                n = args.eval_size
                curve.append((step, wall, cpu, accuracy(model, test[0][:n], test[1][:n])))
                t0, c0 = time.perf_counter(), time.process_time()
    wall += time.perf_counter() - t0
    cpu += time.process_time() - c0
    gar_metrics = None
    if one_line is not None:
        gar_metrics = one_line.metrics()
        one_line.close()
    m = sampler.metrics()
    return {
        "gar_metrics": gar_metrics,
        "accuracy": accuracy(model, *test),
        "wall_s": wall,
        "cpu_s": cpu,
        "probe_s": probe_time,
        "steps": step,
        "curve": curve,
        "final_weights": sampler.weights,
        "first_step_below_5pct": {k: v for k, v in below.items() if k in sampler.weights},
        "nonfinite_rewards": m["nonfinite_rewards"],
        "history": [h["weights"] for h in sampler.history] if method != "uniform" else None,
    }


def compact(results: dict[str, Any], points: int = 250) -> None:
    """Keep the weights history of the first seed only, at most ``points`` entries (the plot)."""
    for entry in results["methods"].values():
        for i, run in enumerate(entry["runs"]):
            hist = run.get("history")
            if hist is None:
                continue
            if i > 0:
                run["history"] = None
                continue
            stride = max(1, -(-len(hist) // points))
            run["history_stride"] = stride
            run["history"] = hist[::stride]


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no weights plot")
        return False
    shown = [
        m for m in ("gar_dot", "gar_exp_grad", "gar_line", "exp3_loss") if m in results["methods"]
    ] or [m for m in results["methods"] if m in LINE_ARMS]  # a run of other one-line arms
    if not shown:
        return False
    fig, axes = plt.subplots(
        1, len(shown), figsize=(5 * len(shown), 3.6), sharey=True, squeeze=False
    )
    for ax, method in zip(axes[0], shown, strict=True):
        run = results["methods"][method]["runs"][0]
        hist, stride = run["history"], run.get("history_stride", 1)
        ad.draw_history(hist, ax, stride=stride, legend=False)  # the library's own plot
        ax.axhline(0.05, color="grey", lw=0.8, ls=":")
        ax.axvline(results["steps_per_epoch"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{method} (seed {results['seeds'][0]})")
        ax.set_xlabel("update")
    axes[0][0].set_ylabel("weight")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_curves(results: dict[str, Any], path: Path) -> bool:
    """Test accuracy (on the evaluation subset) against CPU time, mean over seeds, per arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, entry in results["methods"].items():
        curves = [r["curve"] for r in entry["runs"] if r.get("curve")]
        if not curves:
            continue
        points = min(len(c) for c in curves)
        xs = [statistics.fmean(c[i][2] for c in curves) for i in range(points)]
        ys = [statistics.fmean(c[i][3] for c in curves) for i in range(points)]
        ax.plot(xs, ys, marker=".", label=method)
    ax.set_xlabel("CPU time (s, mean over seeds)")
    ax.set_ylabel(f"test accuracy on {results['eval_size']} images (%)")
    ax.set_title("accuracy against compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    expect_fixed_arms()  # uniform, uniform_x2, proportional, the oracles
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding fashion-mnist/ (default: ../shared/data)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate every N steps for an accuracy-against-time plot (0: off)",
    )
    parser.add_argument("--eval-size", type=int, default=2000, help="test images per evaluation")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ref-batch", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--lag", type=int, default=None, help="GARSampler(lag=) of every arm (default: its default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "mixture_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {"clean": 2000, "label_noise": 4000, "pixel_noise": 3000, "inverted": 3000}
    n_ref, n_test = 1000, None
    if args.quick:
        sizes = {k: v // 20 for k, v in sizes.items()}
        n_ref, n_test, args.epochs, args.seeds = 200, 1000, 1, "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    xtr, ytr, xte, yte = load(args.data)
    sources, ref_set = build_sources(xtr, ytr, sizes, n_ref)
    xte = (xte - MEAN) / STD
    test = (xte[:n_test], yte[:n_test]) if n_test else (xte, yte)
    steps_per_epoch = sum(sizes.values()) // args.batch

    results: dict[str, Any] = {
        **header(),
        "sizes": sizes,
        "reference_size": n_ref,
        "test_size": len(test[0]),
        "batch": args.batch,
        "epochs": args.epochs,
        "eval_every": args.eval_every,
        "eval_size": args.eval_size,
        "steps_per_epoch": steps_per_epoch,
        "seeds": seeds,
        "gar_arms": {
            name: {"rule": r, "lr": lr, "reward": rw, "probe_every": k, "floor_total": f}
            for name, (r, lr, rw, k, f) in GAR_ARMS.items()
        },
        "line_arms": {
            name: {"every": e, "reference_refresh": k, "rows": m, "estimator": est, "budget": b}
            for name, (e, k, m, est, b) in LINE_ARMS.items()
        },
        "targets": {
            "gar_vs_oracle_points": -0.5,
            "gar_vs_uniform_points": 3.0,
            "corrupted_below_5pct_within_epoch": 1,
        },
        "methods": {m: {"runs": []} for m in methods},
    }
    start = time.perf_counter()
    for seed in seeds:  # interleaved, so machine noise hits every method alike
        for method in methods:
            res = run(method, seed, sources, ref_set, test, steps_per_epoch, args.epochs, args)
            res["seed"] = seed
            results["methods"][method]["runs"].append(res)
            print(
                f"seed {seed} {method:14s} acc {res['accuracy']:6.2f}  {res['wall_s']:6.1f}s  "
                f"weights {', '.join(f'{k}={v:.3f}' for k, v in res['final_weights'].items())}",
                flush=True,
            )
    results["total_wall_s"] = time.perf_counter() - start

    base = results["methods"].get("uniform")
    for method, entry in results["methods"].items():
        runs = entry["runs"]
        entry["accuracy"] = summary([r["accuracy"] for r in runs])
        entry["wall_s"] = summary([r["wall_s"] for r in runs])
        entry["cpu_s"] = summary([r["cpu_s"] for r in runs])
        if base is not None:
            entry["time_vs_uniform"] = statistics.median(
                r["wall_s"] / b["wall_s"] for r, b in zip(runs, base["runs"], strict=True)
            )
            entry["cpu_vs_uniform"] = statistics.median(
                r["cpu_s"] / b["cpu_s"] for r, b in zip(runs, base["runs"], strict=True)
            )
        if method not in ("oracle", "oracle_floor", "uniform", "uniform_x2", "proportional"):
            firsts = {
                name: [r["first_step_below_5pct"].get(name) for r in runs] for name in CORRUPTED
            }
            entry["first_step_below_5pct"] = firsts
            entry["all_corrupted_below_5pct_within_epoch"] = [
                all(
                    v is not None and v <= steps_per_epoch
                    for v in (firsts[n][i] for n in CORRUPTED)
                )
                for i in range(len(runs))
            ]

    print(
        "\n| method | test accuracy mean | std | min | max | wall s (median) | x uniform time "
        "| CPU s (median) | x uniform CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method, entry in results["methods"].items():
        a, w, c = entry["accuracy"], entry["wall_s"], entry["cpu_s"]
        ratio = entry.get("time_vs_uniform", float("nan"))
        cpu_ratio = entry.get("cpu_vs_uniform", float("nan"))
        print(
            f"| {method} | {a['mean']:.2f} | {a['std']:.2f} | {a['min']:.2f} | {a['max']:.2f} | "
            f"{w['median']:.1f} | {ratio:.2f} | {c['median']:.1f} | {cpu_ratio:.2f} |"
        )
    for method, entry in results["methods"].items():
        if "first_step_below_5pct" in entry:
            print(
                f"{method}: first step below 5% per seed {entry['first_step_below_5pct']} "
                f"(epoch = {steps_per_epoch} steps)"
            )
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        compact(results)
        png = args.out.with_name(args.out.stem + "_weights.png")
        if plot(results, png):
            results["weights_plot"] = (
                str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
            )
        curves = args.out.with_name(args.out.stem + "_time.png")
        if args.eval_every and plot_curves(results, curves):
            results["time_plot"] = (
                str(curves.relative_to(ROOT)) if curves.is_relative_to(ROOT) else str(curves)
            )
        write(args.out, results, indent=1)


if __name__ == "__main__":
    main()
