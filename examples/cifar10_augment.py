"""Learn an augmentation policy on CIFAR-10 with GARTransform and one line in the loop.

The pipeline is the usual one (random crop, flip, then the learned TrivialAugment-style op,
then conversion); GARSampler draws every decision in the main process and carries it to the
workers; every second batch is un-augmented and serves as the reference of the augmented batch
before it (``reference_every=2``); ``gar.step()`` rewards and learns.

Data: a folder holding ``cifar10-jpeg.tar.gz`` (``train/<class>/NNNN.jpg``), given as
``--data DIR`` (or ``DATA_DIR``), else ``$ADAPTIVE_DATA_DIR``, else ``data/`` inside the clone
or ``../shared/data`` beside it; or ``--torchvision-root DIR`` for torchvision's own CIFAR10
files, downloaded into ``DIR`` if they are not there yet.

    python examples/cifar10_augment.py --data DIR              # 5,000 images, 10 epochs
    python examples/cifar10_augment.py --data DIR --quick      # under a minute (CI)
    python examples/cifar10_augment.py --torchvision-root DIR  # torchvision's CIFAR10
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

import adaptive_data as ad

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TARBALL = "cifar10-jpeg.tar.gz"
DATA_ENV = "ADAPTIVE_DATA_DIR"
CLONE = Path(__file__).resolve().parents[1]  # the repository this script sits in


def find_data(explicit: Path | None) -> Path:
    """The tarball to read: in ``explicit`` if given, else in ``$ADAPTIVE_DATA_DIR`` if set,
    else in ``data/`` inside the clone or ``../shared/data`` beside it. Exits with a message
    naming every place it looked when none holds it."""
    if explicit is not None:
        places = [(explicit, "--data")]
    elif os.environ.get(DATA_ENV):
        places = [(Path(os.environ[DATA_ENV]), f"${DATA_ENV}")]
    else:
        places = [
            (CLONE / "data", "inside the clone"),
            (CLONE.parent / "shared" / "data", "beside the clone"),
        ]
    for folder, _ in places:
        if (folder / TARBALL).is_file():
            return folder / TARBALL
    looked = "; ".join(f"{folder / TARBALL} ({why})" for folder, why in places)
    sys.exit(
        f"CIFAR-10 not found: no {looked}. Pass the folder that holds {TARBALL} with --data DIR "
        f"(or set {DATA_ENV}=DIR), or use --torchvision-root DIR for torchvision's CIFAR10 "
        "files (downloaded into DIR if they are not there)."
    )


def first_per_class(targets: list[int], per_class: int) -> list[int]:
    """Indices of the first ``per_class`` examples of each class, in dataset order."""
    left = dict.fromkeys(range(len(CLASSES)), per_class)
    picked = []
    for i, t in enumerate(targets):
        if left[t] > 0:
            left[t] -= 1
            picked.append(i)
    return picked


class JpegCIFAR10:
    """The first ``per_class`` training images of each class from the JPEG tarball, as PIL
    images, with a torchvision-style ``transform`` (like ``torchvision.datasets.CIFAR10``)."""

    def __init__(self, tar_path: Path, per_class: int, transform: Any) -> None:
        self.items: list[tuple[Image.Image, int]] = []
        wanted = {c: per_class for c in CLASSES}
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if len(parts) < 3 or parts[-3] != "train" or not member.isfile():
                    continue
                cls = parts[-2]
                if wanted.get(cls, 0) <= 0 or int(parts[-1][:-4]) >= per_class:
                    continue
                raw = tar.extractfile(member)
                if raw is None:
                    continue
                image = Image.open(io.BytesIO(raw.read())).convert("RGB")
                self.items.append((image, CLASSES.index(cls)))
                wanted[cls] -= 1
                if not any(wanted.values()):
                    break
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.items[i]
        return self.transform(image), label


def model() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, help="the same as --data")
    parser.add_argument("--data", type=Path, help=f"folder holding {TARBALL}")
    parser.add_argument(
        "--torchvision-root", type=Path, help="torchvision's CIFAR10 files instead (downloaded)"
    )
    parser.add_argument("--per-class", type=int, default=500, help="images per class")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="300 images, 1 epoch (a smoke run)")
    args = parser.parse_args()
    if args.data is not None and args.data_dir is not None and args.data != args.data_dir:
        parser.error(f"DATA_DIR {args.data_dir} and --data {args.data} disagree; give one")
    if args.quick:
        args.per_class, args.epochs = 30, 1
    torch.manual_seed(0)

    # TrivialAugmentWide's space, learned: opt-in, since learning has not been shown to beat
    # its frozen control (docs/benchmark-log.md, "Augmentation: what the reward learns")
    tf = ad.GARTransform(learn_ops=True, learn_magnitudes=True)
    pipeline = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            tf,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
        ]
    )
    if args.torchvision_root is not None:
        from torchvision import datasets

        try:
            full = datasets.CIFAR10(
                args.torchvision_root, train=True, transform=pipeline, download=True
            )
        except OSError as e:  # no internet (URLError) or a partial download
            sys.exit(f"could not fetch CIFAR-10 into {args.torchvision_root}: {e}")
        train_set: Any = Subset(full, first_per_class(full.targets, args.per_class))
    else:
        tar_path = find_data(args.data or args.data_dir)
        train_set = JpegCIFAR10(tar_path, args.per_class, pipeline)

    # The policy lag must cover the loader: 2 batches prefetched per worker, and each augmented
    # batch rewarded when the next one arrives (docs/howto-mixture.md, "The policy lag").
    lag = max(8, 2 * args.workers + 2)
    sampler = ad.GARSampler(
        train_set, batch_size=128, seed=0, transform=tf, reference_every=2, lag=lag
    )
    loader = sampler.track(
        DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=args.workers)
    )
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    with ad.GAR(net, sampler, optimizer=opt) as gar:
        for epoch in range(args.epochs):
            total, n = 0.0, 0
            for x, y in loader:
                x = x.contiguous(memory_format=torch.channels_last)
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                gar.step()  # the one line
                opt.step()
                total, n = total + loss.item() * len(y), n + len(y)
            top = sorted(tf.policy.op_weights.items(), key=lambda kv: -kv[1])[:4]
            ops = ", ".join(f"{k} {v:.3f}" for k, v in top)
            print(f"epoch {epoch + 1}: train loss {total / n:.3f}; most likely ops: {ops}")
    print("metrics:", {k: round(v, 4) for k, v in tf.policy.metrics().items() if "/" not in k})


if __name__ == "__main__":
    main()
