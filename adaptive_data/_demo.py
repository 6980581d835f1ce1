"""The demo: a learned mixture on scikit-learn's digits, against a uniform run (the
augmentation policy frozen, as ``GARTransform()`` is, unless ``--learn-augment``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["add_arguments", "run"]

SOURCES = ("clean", "random_labels", "pixel_noise")

# Augmentations sized for 8x8 digits (TrivialAugmentWide's 32-pixel translations would wipe
# them out), drawn uniformly in both runs unless --learn-augment.
OPS: dict[str, tuple[list[float] | None, bool]] = {
    "Identity": (None, False),
    "Rotate": ([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0], True),
    "ShearX": ([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3], True),
    "TranslateX": ([0.0, 1.0, 2.0], True),
    "TranslateY": ([0.0, 1.0, 2.0], True),
    "Contrast": ([0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9], True),
}


class Digits:
    """uint8 images ``[1, 8, 8]`` and labels, with a torchvision-style ``transform``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Any) -> None:
        self.x, self.y, self.transform = x, y.tolist(), transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.x[i]), self.y[i]


Split = tuple[torch.Tensor, torch.Tensor]


def load(seed: int) -> tuple[dict[str, Split], Split, Split]:
    """Three training sources, a clean validation split (GAR's trusted reference) and a test
    split, cut from the 1,797 digits (fixed data seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).mul(255 / 16).round()
    x = x.to(torch.uint8).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(1234 + seed)
    perm = torch.randperm(len(x), generator=g)
    test, val, train = perm[:400], perm[400:550], perm[550:]
    parts = train.chunk(3)
    noisy = x[parts[2]].float() + 120 * torch.randn(len(parts[2]), 1, 8, 8, generator=g)
    sources = {
        "clean": (x[parts[0]], y[parts[0]]),
        "random_labels": (x[parts[1]], torch.randint(0, 10, (len(parts[1]),), generator=g)),
        "pixel_noise": (noisy.clamp(0, 255).round().to(torch.uint8), y[parts[2]]),
    }
    return sources, (x[val].float().div(255), y[val]), (x[test].float().div(255), y[test])


def model_for(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the model's initialisation (the demo's script, not the library)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


class Progress:
    """One run's training steps as a ``tqdm`` bar on stderr, labelled with the run; nothing
    when not ``enabled`` (``--no-progress``, for logs)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # A log (stderr not a terminal) gets a line every 5 s instead of 10 a second.
            every = 0.1 if sys.stderr.isatty() else 5.0
            self.bar = tqdm(
                total=total, desc=label, unit="step", file=sys.stderr, mininterval=every
            )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# What `adaptive-data demo` imports beyond the package's own dependencies: module -> package.
DEMO_PACKAGES = {"sklearn": "scikit-learn", "tqdm": "tqdm"}


def require_packages(progress: bool) -> None:
    """Exit with the install command if a package the demo needs is missing."""
    missing = []
    for module, package in DEMO_PACKAGES.items():
        if module == "tqdm" and not progress:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise SystemExit(
            f"adaptive-data demo needs {' and '.join(missing)} (the digits data set and the "
            "progress bar come from them), which the [demo] extra installs: "
            "pip install 'adaptive-data[demo]'"
        )


def train(
    learn: bool,
    sources: dict[str, Split],
    val: Split,
    test: Split,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run: GAR (``learn=True``: the learned mixture; the augmentation policy learns too
    with ``--learn-augment``) or the uniform mixture. Both draw the augmentation from the
    same uniform policy unless it learns."""
    from torchvision.transforms import v2

    import adaptive_data as ad

    learn_augment = learn and args.learn_augment
    tf = ad.GARTransform(OPS, learn_ops=learn_augment, learn_magnitudes=learn_augment)
    pipeline = v2.Compose([tf, v2.ToDtype(torch.float32, scale=True)])
    datasets = {name: Digits(x, y, pipeline) for name, (x, y) in sources.items()}
    sampler = ad.GARSampler(datasets, batch_size=args.batch_size, seed=args.seed, transform=tf)
    plain = DataLoader(sampler.dataset, batch_sampler=sampler)
    # GAR pairs each forward with its batch through the tracked loader; the uniform run needs
    # none (a tracked loader nothing rewards is warned about).
    loader: Iterable[Any] = sampler.track(plain) if learn else plain
    model = model_for(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    gar = None
    if learn:  # the mixture learns from a clean validation split: data the user trusts
        reference = ad.ReferenceBatches(TensorDataset(*val), 64, seed=args.seed)
        per_example = nn.CrossEntropyLoss(reduction="none")
        gar = ad.GAR(model, sampler, optimizer=opt, reference=reference, loss_fn=per_example)
    progress = Progress(args.epochs * len(sampler), "GAR" if learn else "uniform", args.progress)
    t0 = time.perf_counter()
    try:
        for _ in range(args.epochs):
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if gar is not None:
                    gar.step()  # the one line
                opt.step()
                progress.advance()
    finally:
        progress.close()
    if gar is not None:
        gar.close()
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        accuracy = 100.0 * float((model(test[0]).argmax(1) == test[1]).float().mean())
    return {
        "accuracy": accuracy,
        "wall_s": wall,
        "weights": sampler.weights,
        "op_weights": tf.policy.op_weights,
        "learned_augmentation": learn_augment,
        "history": sampler.history,
        "steps": args.epochs * len(sampler),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("adaptive-data-demo"),
        help="folder for weights.png, history.pt and summary.json (default: ./adaptive-data-demo)",
    )
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each run (default 12)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the data split, model, sampler (default 0)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--learn-augment",
        action="store_true",
        help="the GAR run learns its augmentation policy too (off by default, as in "
        "GARTransform(): learning it has not been shown to help)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_false",
        dest="progress",
        help="no progress bars (for logs)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the GAR run and the uniform run; print the table; write the figure and summary."""
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit(
            f"--epochs and --batch-size should be >= 1, got {args.epochs} and {args.batch_size}"
        )
    require_packages(progress=args.progress)
    torch.set_num_threads(args.threads)
    sources, val, test = load(args.seed)
    augment = "learned augmentation" if args.learn_augment else "the uniform augmentation"
    print(
        "adaptive_data demo: digits (scikit-learn) from three sources, "
        + ", ".join(f"{n} ({len(sources[n][0])})" for n in SOURCES)
        + f"; {len(val[0])} clean validation digits (GAR's reference), {len(test[0])} clean "
        f"test digits. Training a small CNN twice for {args.epochs} epochs: with GAR (learned "
        f"mixture, {augment}) and with the uniform mixture and the uniform augmentation.",
        flush=True,
    )
    gar = train(True, sources, val, test, args)
    uniform = train(False, sources, val, test, args)
    print()
    print("| source | GAR weight | uniform weight |")
    print("|---|---|---|")
    for name in SOURCES:
        print(f"| {name} | {gar['weights'][name]:.3f} | {uniform['weights'][name]:.3f} |")
    print()
    print("| run | test accuracy | wall s |")
    print("|---|---|---|")
    print(f"| GAR | {gar['accuracy']:.1f}% | {gar['wall_s']:.1f} |")
    print(f"| uniform | {uniform['accuracy']:.1f}% | {uniform['wall_s']:.1f} |")
    print("(wall s: this machine's, with its load; other machines differ)")
    if args.learn_augment:
        top = sorted(gar["op_weights"].items(), key=lambda kv: -kv[1])
        print("\nlearned augmentation ops: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": " ".join(["adaptive-data", "demo", *sys.argv[2:]]),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "learn_augment": args.learn_augment,
        "sources": {n: len(sources[n][0]) for n in SOURCES},
        "validation_examples": len(val[0]),
        "test_examples": len(test[0]),
        "gar": {k: v for k, v in gar.items() if k != "history"},
        "uniform": {k: v for k, v in uniform.items() if k != "history"},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(gar["history"], args.out / "history.pt")  # for `adaptive-data plot`
    wrote = [str(args.out / "summary.json"), str(args.out / "history.pt")]
    try:
        from ._plot import plot_history

        title = "GARSampler on digits: learned source weights and rewards"
        wrote.append(str(plot_history(gar["history"], args.out / "weights.png", title=title)))
    except ImportError:
        print("(matplotlib is not installed: no weights.png; pip install 'adaptive-data[plot]')")
    print("wrote " + ", ".join(wrote))
    return summary
