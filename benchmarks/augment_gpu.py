"""GARTransform against TrivialAugmentWide in the seed's setting: CIFAR-10/100, a WRN, a GPU.

The setting of the TrivialAugment paper: all 50,000 CIFAR-10 training images, a Wide-ResNet
(WRN-40-2 by default, ``--depth 28 --widen 10`` for WRN-28-10), SGD (momentum 0.9, nesterov,
weight decay 5e-4, lr 0.1, cosine schedule), batch 128, 200 epochs, tested on all 10,000 test
images, every pipeline being ``RandomCrop(32, padding=4), RandomHorizontalFlip(),
<augmentation>, ToImage, ToDtype, Normalize`` on PIL images. Arms (``--arms``):

* ``trivial_augment``: ``v2.TrivialAugmentWide()``, the anchor;
* ``gar``: ``GARTransform()`` with ``GARSampler(reference_every=2)``; each augmented batch is
  rewarded against the un-augmented batch that follows it (``GradientProbe(estimator="ghost",
  reward="cosine")``), as in ``augment_quality.py``;
* ``gar_frozen``: its control, learning off (bit-identical to ``lr=0``): the same batches and
  un-augmented half, nothing learned;
* ``crop_flip``: no further augmentation.

A GPU is lent for minutes at a time, so the work runs in pieces: each call trains until
``--time-limit`` seconds (default 540) would be passed by one more epoch, checkpoints every run
it touched at an epoch's end under ``--out``, and exits with status 3 while work is left. Run
the same command again (on the same or a fresh machine, with ``--out`` carried over) to go on;
it resumes every run exactly where it stopped (the sampler's state carries the GAR policy, the
data order and each example's augmentation; torch's global generator, which TrivialAugmentWide
and the model's initialisation draw from, is seeded per run and epoch). Runs go seed by seed,
arms interleaved, each to its end before the next starts, so a partial study holds finished
runs. Status 0 means every run is done; the table is printed and ``results.json`` complete.

    python benchmarks/augment_gpu.py [DATA_DIR] --device cuda --out OUT      # repeat until 0
    python benchmarks/augment_gpu.py [DATA_DIR] --quick                       # CPU smoke run

``DATA_DIR`` holds ``cifar10-jpeg.tar.gz`` (default ``../shared/data``); the decoded arrays are
cached under ``--cache``. ``--dataset cifar100`` reads torchvision's ``cifar-100-python`` folder
under ``DATA_DIR`` instead (100 classes, 500 training images each; never downloaded here). A
WRN-40-2 checkpoint is about 18 MB (weights and momentum).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import adaptive_data as ad

from _common import header, summary
from augment_quality import DEFAULT_CACHE, DEFAULT_DATA, MEAN, STD, Images, load, subset

# CIFAR-100's channel statistics (of its training images), as CIFAR-10's MEAN and STD.
MEAN_100, STD_100 = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)

ARMS = ("trivial_augment", "gar", "gar_frozen", "crop_flip")
DATASETS = ("cifar10", "cifar100")
MORE_TO_DO = 3  # exit status while runs are left


# ------------------------------------------------------------------ data


def load_cifar100(data_dir: Path) -> dict[str, np.ndarray]:
    """CIFAR-100 from torchvision's ``cifar-100-python`` folder under ``data_dir`` (what
    ``torchvision.datasets.CIFAR100(data_dir, download=True)`` writes), as ``load`` returns
    CIFAR-10: uint8 ``[N, 32, 32, 3]`` images, fine labels, and each image's index within its
    class (``i_train``, for ``--per-class``)."""
    folder = data_dir / "cifar-100-python"
    missing = [f for f in ("train", "test") if not (folder / f).is_file()]
    if missing:
        sys.exit(
            f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}. This benchmark never "
            "downloads: run torchvision.datasets.CIFAR100(DATA_DIR, download=True) where the "
            "internet is reachable, and pass that DATA_DIR"
        )
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        with open(folder / split, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the format's own pickles, from the user
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(d[b"fine_labels"], dtype=np.int64)
        seen: dict[int, int] = {}
        within = np.empty(len(y), dtype=np.int64)
        for k, label in enumerate(y.tolist()):
            within[k] = seen.get(label, 0)
            seen[label] = within[k] + 1
        out[f"x_{split}"], out[f"y_{split}"], out[f"i_{split}"] = np.ascontiguousarray(x), y, within
    return out


def pipeline(augment: Any | None, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """``RandomCrop(32, padding=4), RandomHorizontalFlip(), <augmentation>, ToImage, ToDtype,
    Normalize(mean, std)``."""
    steps: list[Any] = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if augment is not None:
        steps.append(augment)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


# ------------------------------------------------------------------ the model


class Block(nn.Module):
    """A pre-activation basic block of a Wide-ResNet (BN-ReLU-conv, twice)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (
            None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wide_resnet(depth: int, widen: int, classes: int = 10) -> nn.Sequential:
    """WRN-depth-widen for 32x32 images (Zagoruyko and Komodakis): depth = 6n + 4."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"depth should be 6n + 4 >= 10, but got depth={depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
    for group in range(3):
        for i in range(n):
            cin = widths[group] if i == 0 else widths[group + 1]
            layers.append(Block(cin, widths[group + 1], 2 if (i == 0 and group > 0) else 1))
    layers += [
        nn.BatchNorm2d(widths[3]),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[3], classes),
    ]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


# ------------------------------------------------------------------ one run, epoch by epoch


class Run:
    """One (arm, seed) training run that can stop after any epoch and resume from its file."""

    def __init__(self, arm: str, seed: int, train: tuple[np.ndarray, np.ndarray], args: Any):
        self.arm, self.seed, self.args = arm, seed, args
        self.path = args.out / f"run_{arm}_seed{seed}.pt"
        torch.manual_seed(seed)  # the model's initialisation
        self.model = wide_resnet(args.depth, args.widen, args.classes).to(args.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.tf: ad.GARTransform | None = None
        augment: Any = None
        if arm == "trivial_augment":
            augment = v2.TrivialAugmentWide()
        elif arm.startswith("gar"):
            frozen = arm == "gar_frozen"
            self.tf = augment = ad.GARTransform(learn_ops=not frozen, learn_magnitudes=not frozen)
        data = Images(*train, pipeline(augment, args.mean, args.std))
        self.sampler = ad.GARSampler(
            data,
            batch_size=args.batch,
            seed=seed,
            transform=self.tf,
            reference_every=None if self.tf is None else 2,
            # 2 batches prefetched per worker, rewards one batch late: the lag must cover both
            lag=max(8, 2 * args.workers + 2),
        )
        self.loader = self.sampler.track(
            DataLoader(
                self.sampler.dataset,
                batch_sampler=self.sampler,
                num_workers=args.workers,
                pin_memory=args.device.startswith("cuda"),
                persistent_workers=False,
            )
        )
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=args.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=args.weight_decay,
        )
        steps = args.epochs * len(self.sampler)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)
        learns = self.tf is not None and arm != "gar_frozen"
        self.probe = (
            ad.GradientProbe(self.model, self.loss_fn, estimator="ghost", reward="cosine")
            if learns
            else None
        )
        self.log: dict[str, Any] = {"epochs_done": 0, "train_loss": [], "wall_s": 0.0}
        self.log["probe_s"] = 0.0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        state = torch.load(self.path, map_location=self.args.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.log = state["log"]

    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sampler": self.sampler.state_dict(),  # with the transform's policy
            "log": self.log,
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a call killed while saving keeps the previous file

    @property
    def done(self) -> bool:
        return self.log["epochs_done"] >= self.args.epochs

    def epoch(self) -> None:
        """Train one epoch (and save): seeded by (seed, epoch), so a resumed run repeats it."""
        device, model, opt = self.args.device, self.model, self.opt
        torch.manual_seed(self.seed * 100_003 + self.log["epochs_done"])
        t0 = time.perf_counter()
        total, count, probe_s = 0.0, 0, 0.0
        previous: tuple[torch.Tensor, torch.Tensor, int] | None = None
        for x, y in self.loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            batch = self.sampler.last_batch
            if self.probe is not None:
                if previous is not None:
                    tp = time.perf_counter()
                    r = self.probe(previous[0], previous[1], reference=(x, y), optimizer=opt)
                    self.sampler.update(r, batch=previous[2])
                    probe_s += time.perf_counter() - tp
                    previous = None
                elif not self.sampler.is_reference(batch):
                    previous = (x, y, batch)  # rewarded against the next (reference) batch
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(x), y).mean()
            loss.backward()
            opt.step()
            self.sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        self.log["epochs_done"] += 1
        self.log["train_loss"].append(total / max(count, 1))
        self.log["wall_s"] += time.perf_counter() - t0
        self.log["probe_s"] += probe_s
        self.save()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        correct = 0
        for i in range(0, len(x), 1000):
            xb = x[i : i + 1000].to(self.args.device).contiguous(memory_format=torch.channels_last)
            correct += int((self.model(xb).argmax(1).cpu() == y[i : i + 1000]).sum())
        self.model.train()
        return 100.0 * correct / len(x)

    def result(self, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        out = {"accuracy": self.accuracy(*test), **self.log}
        if self.tf is not None:
            out["op_weights"] = self.tf.policy.op_weights
            out["magnitude"] = {
                k: v for k, v in self.tf.policy.metrics().items() if k.startswith("magnitude/")
            }
            out["nonfinite_rewards"] = self.tf.policy.metrics()["nonfinite_rewards"]
        return out


# ------------------------------------------------------------------ the study, in pieces


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding cifar10-jpeg.tar.gz (default: ../shared/data)",
    )
    parser.add_argument("--out", type=Path, default=Path("augment_gpu_runs"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="decoded-array cache")
    parser.add_argument("--arms", default="trivial_augment,gar,gar_frozen")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--depth", type=int, default=40)
    parser.add_argument("--widen", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument(
        "--dataset", choices=DATASETS, default="cifar10", help="cifar10 (default) or cifar100"
    )
    parser.add_argument(
        "--per-class", type=int, default=None, help="training images per class (default: all)"
    )
    parser.add_argument("--test-every", type=int, default=1, help="keep every k-th test image")
    parser.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    parser.add_argument(
        "--time-limit", type=float, default=540.0, help="seconds this call may train"
    )
    parser.add_argument(
        "--epochs-per-call", type=int, default=0, help="stop after this many epochs (0: no cap)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: WRN-10-1, 10 images per class, 2 epochs, one seed, one thread",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.depth, args.widen, args.per_class = "cpu", 10, 1, 10
        args.epochs, args.batch, args.workers, args.test_every = 2, 25, 0, 50
        args.threads = 1
        args.seeds = args.seeds.split(",")[0]
    return args


def main(argv: list[str] | None = None) -> int:
    """Train until the time limit; 0 when every run is done, ``MORE_TO_DO`` otherwise."""
    args = parse(argv)
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda was asked for, but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; the arms are {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    )
    if args.dataset == "cifar100":
        arrays = load_cifar100(args.data)
        args.classes, args.mean, args.std = 100, MEAN_100, STD_100
    else:
        arrays = load(args.data, args.cache)
        args.classes, args.mean, args.std = 10, MEAN, STD
    train = subset(arrays, args.per_class or len(arrays["y_train"]))
    x_test = torch.from_numpy(arrays["x_test"][:: args.test_every]).permute(0, 3, 1, 2)
    x_test = v2.functional.normalize(x_test.float().div(255), args.mean, args.std)
    test = (x_test, torch.from_numpy(arrays["y_test"][:: args.test_every]))
    epochs_this_call, slowest = 0, 0.0
    todo = [(arm, seed) for seed in seeds for arm in arms]
    for arm, seed in todo:
        name = f"{arm}/seed{seed}"
        if name in results["runs"]:
            continue
        run = Run(arm, seed, train, args)
        while not run.done:
            elapsed = time.perf_counter() - start
            capped = args.epochs_per_call and epochs_this_call >= args.epochs_per_call
            if capped or elapsed + 1.2 * slowest > args.time_limit:
                left = sum(name not in results["runs"] for name in _names(todo))
                print(
                    f"stopping after {elapsed:.0f} s: {name} at epoch {run.log['epochs_done']}/"
                    f"{args.epochs}, {left} run(s) unfinished; run the same command again",
                    flush=True,
                )
                return MORE_TO_DO
            t0 = time.perf_counter()
            run.epoch()
            slowest = max(slowest, time.perf_counter() - t0)
            epochs_this_call += 1
            print(
                f"{name} epoch {run.log['epochs_done']}/{args.epochs}: train loss "
                f"{run.log['train_loss'][-1]:.3f} ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        results["runs"][name] = run.result(test)
        results.update(_setting(args))
        _write(results_path, results)
        print(f"{name}: {results['runs'][name]['accuracy']:.2f}%", flush=True)
    table(results, arms, seeds)
    return 0


def _names(todo: list[tuple[str, int]]) -> list[str]:
    return [f"{arm}/seed{seed}" for arm, seed in todo]


def _setting(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **header(),
        "model": f"WRN-{args.depth}-{args.widen}",
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "dataset": args.dataset,
        "train_images": args.classes * args.per_class if args.per_class else "all",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }


def _write(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def table(results: dict[str, Any], arms: list[str], seeds: list[int]) -> None:
    print("\n| arm | seeds | accuracy mean | std | min | max | train wall s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        runs = [results["runs"][f"{arm}/seed{s}"] for s in seeds]
        a = summary([r["accuracy"] for r in runs])
        wall = summary([r["wall_s"] for r in runs])["mean"]
        print(
            f"| {arm} | {len(runs)} | {a['mean']:.2f} | {a['std']:.2f} | {a['min']:.2f} | "
            f"{a['max']:.2f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
