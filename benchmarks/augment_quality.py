"""Does GARTransform learn a good augmentation policy? CIFAR-10 in a low-data setting.

A 5-conv CNN (BatchNorm, channels_last) trains on a class-balanced subset of the CIFAR-10
training set (default 5,000 images, the first of each class by file index) and is tested on
all 10,000 test images, with SGD (momentum 0.9, nesterov, weight decay 5e-4, lr 0.05 with a
cosine schedule), batch 128, under each augmentation, every pipeline being
``RandomCrop(32, padding=4), RandomHorizontalFlip(), <augmentation>, ToImage, ToDtype,
Normalize`` on PIL images:

* ``crop_flip``: no further augmentation;
* ``trivial_augment``: ``v2.TrivialAugmentWide()``;
* ``rand_augment``: ``v2.RandAugment(num_ops=2, magnitude=9)``;
* ``gar_clean_ref``: ``GARTransform()`` with ``GARSampler(reference_every=2)``: every other
  batch is drawn un-augmented; the rewards of each augmented batch are the probe's cosine
  rewards against the un-augmented batch that follows it (the GAR authors' scheme);
* ``gar_aug_ref``: the same, but every batch is augmented and the reference is the next
  (augmented) batch;
* ``gar_frozen``: the control of ``gar_clean_ref``: the same pipeline and schedule (every
  other batch un-augmented) with both policies frozen at their uniform start, so that the
  difference to ``gar_clean_ref`` is what the learning adds.

Both GAR arms probe every other step (``GradientProbe(estimator="ghost", reward="cosine")``,
after the optimizer step of the earlier batch, before the step on the later one), so they
cost the same. Every arm trains on every batch.

Budgets: each ``--budgets`` entry is a number of epochs; the issue asks for one where
TrivialAugmentWide loses to crop+flip and a longer one where it wins. Reported: test accuracy
(mean, std, min, max over ``--seeds``), wall time, and for GAR the op probabilities and
expected magnitudes over time (``benchmarks/results/augment_quality_policy.png``).

    python benchmarks/augment_quality.py [DATA_DIR]             # full run: hours on 2 cores
    python benchmarks/augment_quality.py [DATA_DIR] --quick     # smoke run, writes nothing
    python benchmarks/augment_quality.py --device cuda          # where a GPU exists

``DATA_DIR`` holds ``cifar10-jpeg.tar.gz`` (default ``../shared/data`` beside the
repository). The JPEGs are decoded once and cached as ``.npz`` under ``--cache``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import adaptive_data as ad

from _common import header, summary, write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = Path.home() / ".cache" / "adaptive_data"
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ARMS = (
    "crop_flip",
    "trivial_augment",
    "rand_augment",
    "gar_clean_ref",
    "gar_aug_ref",
    "gar_frozen",
)
MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


# ------------------------------------------------------------------ data


def decode(tar_path: Path) -> dict[str, np.ndarray]:
    """All CIFAR-10 JPEGs as uint8 arrays [N, 32, 32, 3], in (class, file index) order."""
    found: dict[str, dict[tuple[int, int], np.ndarray]] = {"train": {}, "test": {}}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or not parts[-1].endswith(".jpg"):
                continue
            split, cls, name = parts[-3], parts[-2], parts[-1]
            if split not in found or cls not in CLASSES:
                continue
            raw = tar.extractfile(member)
            if raw is None:
                continue
            with Image.open(io.BytesIO(raw.read())) as im:
                found[split][(CLASSES.index(cls), int(name[:-4]))] = np.asarray(im.convert("RGB"))
    out: dict[str, np.ndarray] = {}
    for split, items in found.items():
        keys = sorted(items)
        out[f"x_{split}"] = np.stack([items[k] for k in keys])
        out[f"y_{split}"] = np.array([k[0] for k in keys], dtype=np.int64)
        out[f"i_{split}"] = np.array([k[1] for k in keys], dtype=np.int64)
    return out


def load(data_dir: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    tar_path = data_dir / "cifar10-jpeg.tar.gz"
    cached = cache_dir / "cifar10-jpeg.npz"
    if cached.is_file():
        with np.load(cached) as f:
            return {k: f[k] for k in f.files}
    if not tar_path.is_file():
        sys.exit(
            f"CIFAR-10 not found: {tar_path} does not exist.\n"
            "Pass the folder that holds cifar10-jpeg.tar.gz (train/<class>/NNNN.jpg, "
            "test/<class>/NNNN.jpg) as the first argument, e.g.\n"
            "    python benchmarks/augment_quality.py /path/to/data"
        )
    print(f"decoding {tar_path} (once; cached in {cached}) ...", flush=True)
    arrays = decode(tar_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cached, **arrays)
    return arrays


class Images:
    """PIL images with labels and a torchvision-style ``transform`` (as torchvision's CIFAR10)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Any) -> None:
        self.images = [Image.fromarray(a) for a in x]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i]), self.labels[i]


def subset(arrays: dict[str, np.ndarray], per_class: int) -> tuple[np.ndarray, np.ndarray]:
    keep = arrays["i_train"] < per_class  # file indices 0..per_class-1 of every class
    return arrays["x_train"][keep], arrays["y_train"][keep]


def pipeline(augment: Any | None) -> v2.Compose:
    steps: list[Any] = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if augment is not None:
        steps.append(augment)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


# ------------------------------------------------------------------ model and training


def cnn(width: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(3, w),
        *block(w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        nn.MaxPool2d(2),
        *block(4 * w, 4 * w),
        nn.MaxPool2d(2),
        *block(4 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        xb = x[i : i + 1000].to(device).contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1).cpu() == y[i : i + 1000]).sum())
    model.train()
    return 100.0 * correct / len(x)


def run(
    arm: str,
    seed: int,
    epochs: int,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    device = args.device
    model = cnn(args.width).to(device).to(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    tf = None
    if arm == "trivial_augment":
        augment: Any = v2.TrivialAugmentWide()
    elif arm == "rand_augment":
        augment = v2.RandAugment(num_ops=2, magnitude=9)
    elif arm.startswith("gar"):
        frozen = arm == "gar_frozen"  # the control: the same batches, nothing learned
        tf = augment = ad.GARTransform(
            lr=args.gar_lr, learn_ops=not frozen, learn_magnitudes=not frozen
        )
    else:
        augment = None
    data = Images(*train, pipeline(augment))
    steps_per_epoch = len(data) // args.batch
    sampler = ad.GARSampler(
        data,
        batch_size=args.batch,
        seed=seed,
        transform=tf,
        reference_every=None if tf is None or arm == "gar_aug_ref" else 2,
        lag=max(8, 2 * args.workers + 2),  # covers 2 prefetched batches per worker, 1 late
    )
    loader = sampler.track(
        DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=args.workers)
    )
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    learns = tf is not None and arm != "gar_frozen"
    probe = ad.GradientProbe(model, loss_fn, estimator="ghost", reward="cosine") if learns else None
    probe_s = 0.0
    step = 0
    previous: tuple[torch.Tensor, torch.Tensor, int] | None = None
    curve: list[tuple[float, float]] = []  # (training wall s, test accuracy) every eval_every
    paused = 0.0  # time spent evaluating, left out of the wall time
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for x, y in loader:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            batch = sampler.last_batch
            if probe is not None:
                if previous is not None:
                    tp = time.perf_counter()
                    r = probe(previous[0], previous[1], reference=(x, y), optimizer=opt)
                    sampler.update(r, batch=previous[2])
                    probe_s += time.perf_counter() - tp
                    previous = None
                elif not sampler.is_reference(batch):
                    previous = (x, y, batch)  # rewarded against the next batch
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            opt.step()
            sched.step()
            step += 1
        previous = None  # the last batch of an epoch keeps no reward
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < epochs:
            te = time.perf_counter()
            acc = accuracy(model, *test, device)
            curve.append((te - t0 - paused, acc))
            paused += time.perf_counter() - te
    wall = time.perf_counter() - t0 - paused
    final = accuracy(model, *test, device)
    out: dict[str, Any] = {
        "accuracy": final,
        "curve": [*curve, (wall, final)],
        "wall_s": wall,
        "probe_s": probe_s,
        "steps": step,
    }
    if tf is not None:
        out["op_weights"] = tf.policy.op_weights
        out["magnitude"] = {
            k: v for k, v in tf.policy.metrics().items() if k.startswith("magnitude/")
        }
        out["history"] = tf.policy.history
        out["nonfinite_rewards"] = tf.policy.metrics()["nonfinite_rewards"]
    return out


# ------------------------------------------------------------------ reporting


def compact(history: list[dict[str, Any]], points: int = 200) -> list[dict[str, Any]]:
    stride = max(1, -(-len(history) // points))
    return history[::stride]


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no policy plot")
        return False
    shown = [
        (budget, arm)
        for budget, per_arm in results["budgets"].items()
        for arm in per_arm
        if arm.startswith("gar") and per_arm[arm]["runs"][0].get("history")
    ]
    if not shown:
        return False
    fig, axes = plt.subplots(2, len(shown), figsize=(5.5 * len(shown), 7), squeeze=False)
    for col, (budget, arm) in enumerate(shown):
        hist = results["budgets"][budget][arm]["runs"][0]["history"]
        updates = [h["update"] for h in hist]
        for name in hist[0]["op_weights"]:
            axes[0][col].plot(updates, [h["op_weights"][name] for h in hist], label=name)
        for name in hist[0]["magnitude"]:
            axes[1][col].plot(updates, [h["magnitude"][name] for h in hist], label=name)
        axes[0][col].set_title(f"{arm}, {budget} epochs (seed {results['seeds'][0]})")
        axes[0][col].set_ylabel("op probability")
        axes[1][col].set_ylabel("expected magnitude (fraction of range)")
        axes[1][col].set_xlabel("update")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def plot_time(results: dict[str, Any], path: Path) -> bool:
    """Test accuracy against training wall time (evaluation left out), one line per arm
    and seed, one panel per budget: what each arm reaches for the same compute."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no time plot")
        return False
    budgets = list(results["budgets"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for col, budget in enumerate(budgets):
        ax = axes[0][col]
        for i, (arm, entry) in enumerate(results["budgets"][budget].items()):
            for j, run in enumerate(entry["runs"]):
                t, a = zip(*run["curve"], strict=True)
                ax.plot(t, a, color=f"C{i}", alpha=0.8, label=arm if j == 0 else None)
        ax.set_title(f"{budget} epochs, seeds {results['seeds']}")
        ax.set_xlabel("training wall time (s, evaluation left out)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def at_time(curve: list[list[float]], t: float) -> float:
    """Accuracy of the last evaluation at or before wall time ``t`` (NaN before the first):
    what the run had reached by then, no interpolation."""
    reached = [a for s, a in curve if s <= t]
    return reached[-1] if reached else float("nan")


def equal_time(per_arm: dict[str, Any]) -> dict[str, Any]:
    """Each arm's accuracy at the wall time of the fastest arm's whole run (per seed), so
    arms are compared for the same compute; ``None`` where an arm has no evaluation by then
    (use --eval-every)."""
    n = len(next(iter(per_arm.values()))["runs"])
    out: dict[str, Any] = {}
    for seed_i in range(n):
        t = min(e["runs"][seed_i]["wall_s"] for e in per_arm.values())
        for arm, e in per_arm.items():
            out.setdefault(arm, []).append(at_time(e["runs"][seed_i]["curve"], t))
    return {arm: (summary(v) if all(x == x for x in v) else None) for arm, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding cifar10-jpeg.tar.gz (default: ../shared/data)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="decoded-array cache")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="10,30", help="epochs of each budget")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--gar-lr", type=float, default=None, help="GARTransform's op step (default: its own)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate every N epochs for the accuracy-against-time plot (0: at the end only)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "augment_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but torch.cuda.is_available() is False")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; the arms are {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    arrays = load(args.data, args.cache)
    x_test = torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2).float().div(255)
    x_test = v2.functional.normalize(x_test, MEAN, STD)
    y_test = torch.from_numpy(arrays["y_test"])
    if args.quick:
        args.per_class, seeds, budgets = 30, seeds[:1], [1]
        x_test, y_test = x_test[::20], y_test[::20]
    train = subset(arrays, args.per_class)
    results: dict[str, Any] = {
        **header(),
        "train_images": len(train[0]),
        "test_images": len(x_test),
        "seeds": seeds,
        "width": args.width,
        "batch": args.batch,
        "lr": args.lr,
        "device": args.device,
        "budgets": {},
    }
    for epochs in budgets:
        per_arm: dict[str, Any] = {arm: {"runs": []} for arm in arms}
        for seed in seeds:  # arms interleaved within each seed
            for arm in arms:
                print(f"{epochs} epochs, {arm}, seed {seed} ...", flush=True)
                out = run(arm, seed, epochs, train, (x_test, y_test), args)
                print(f"    {out['accuracy']:.2f}% in {out['wall_s']:.0f} s", flush=True)
                per_arm[arm]["runs"].append(out)
        for entry in per_arm.values():
            entry["accuracy"] = summary([r["accuracy"] for r in entry["runs"]])
            entry["wall_s"] = summary([r["wall_s"] for r in entry["runs"]])
        for arm, same in equal_time(per_arm).items():
            per_arm[arm]["accuracy_at_fastest_wall"] = same
            for i, r in enumerate(entry["runs"]):
                if "history" in r:
                    r["history"] = compact(r["history"]) if i == 0 else None
        results["budgets"][str(epochs)] = per_arm
    best_fixed = {}
    print(
        "\n| epochs | arm | accuracy mean | std | min | max | wall s (mean) "
        "| accuracy at the fastest arm's wall time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for budget, per_arm in results["budgets"].items():
        for arm, e in per_arm.items():
            a, same = e["accuracy"], e["accuracy_at_fastest_wall"]
            same_s = "n/a" if same is None else f"{same['mean']:.2f} +- {same['std']:.2f}"
            print(
                f"| {budget} | {arm} | {a['mean']:.2f} | {a['std']:.2f} | {a['min']:.2f} | "
                f"{a['max']:.2f} | {e['wall_s']['mean']:.0f} | {same_s} |"
            )
        fixed = [a for a in per_arm if not a.startswith("gar")]
        if fixed:
            best = max(fixed, key=lambda a: per_arm[a]["accuracy"]["mean"])
            best_fixed[budget] = {"arm": best, "accuracy": per_arm[best]["accuracy"]["mean"]}
    results["best_fixed"] = best_fixed
    if not args.quick:
        write(args.out, results)
        png = args.out.with_name(f"{args.out.stem}_policy.png")
        if plot(results, png):
            print(f"wrote {png}")
        png = args.out.with_name(f"{args.out.stem}_time.png")
        if plot_time(results, png):
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
