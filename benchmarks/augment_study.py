"""What can the GAR reward learn about augmentation? A controlled study on three data sets.

Issue 19, item 2. Every arm of a data set trains the same model on the same images with the
same sampler (``GARSampler``, ``num_workers=0``), seed for seed; only the augmentation and what
the policy learns from differ. Arms (interleaved within each seed):

* ``none``: the data set's fixed base only (CIFAR-10: ``RandomCrop(32, padding=4)`` and a
  horizontal flip; Fashion-MNIST and digits: nothing);
* ``trivial_augment``: base, then ``v2.TrivialAugmentWide()`` on every image;
* ``frozen``: base, then ``GARTransform(learn_ops=False, learn_magnitudes=False)`` with
  ``GARSampler(reference_every=2)``: every other batch un-augmented, the others drawn from
  TrivialAugmentWide's distribution. The control: what the GAR arms would do if they learned
  nothing (it does not probe: the probe never edits the model, so probing would not change it);
* ``gar``: the same pipeline with learning on, the library's defaults: the probe's cosine
  reward (``GradientProbe(estimator="ghost", reward="cosine")``) of each augmented batch, taken
  after the optimizer step on it, against the un-augmented batch that follows it
  (``sampler.update(r, batch=...)``).

The variants change one thing of ``gar``, through the public API only:

* ``gar_dot``: ``reward="dot"``;
* ``gar_heldout``: the reference is one fixed clean batch of training-split images that are not
  trained on (the same held-out batch for every reward), not the next batch;
* ``gar_baseline``: a per-image baseline: each augmented image's reward minus the reward of the
  same image un-augmented (the same crop and flip, no op), from a second probe call on the
  clean copies against the same reference; the rewards handed to ``sampler.update`` are the
  differences, the op's own effect. The sampler exposes no public accessor for the keys or
  indices of a batch (``last_batch`` is an id, ``decode`` takes keys the loop never sees), so
  the benchmark's own dataset returns the clean copy beside the augmented image: it applies
  the base transforms once (under the per-example seed the sampler sets) and the op on top;
* ``gar_mag_only``: ``learn_ops=False`` (magnitudes learn, ops stay uniform);
* ``gar_ops_only``: ``learn_magnitudes=False``;
* ``gar_big_evidence``: a 4x smaller step (``lr=0.025``, the magnitudes' step 0.3x that, as by
  default): with ``normalize="batch"`` four updates at a quarter step move the policy about as
  far as one update from four batches' rewards, so each move rests on 4x the evidence.

The one-line ``GAR`` arms (``LINE_ARMS``; not in the default set, name them in ``--arms``):
``gar``'s transform and sampler, rewarded by ``GAR(model, sampler, optimizer=opt)`` with
``gar.step()`` between the backward and the optimizer step (each augmented batch against the
gradient of the un-augmented batch that follows it, at the weights it was trained at):
``gar_line_exact`` (``budget=None``), ``gar_line_default`` (``budget="auto"``, 0.02 with the
next batch) and ``gar_line_0.1`` (``budget=0.1``, the next batch's default before). What the
next-batch default's smaller share costs the learning:

    OMP_NUM_THREADS=1 python benchmarks/augment_study.py --datasets digits \\
        --arms frozen,gar,gar_line_exact,gar_line_default,gar_line_0.1 --seeds 0,1,2,3,4,5 \\
        --out benchmarks/results/augment_study_line.json

Data sets (training subsets fixed, the same for every seed and arm):

* ``digits``: scikit-learn's 8x8 digits (embedded; pixels scaled to 0..255), a fixed shuffle:
  900 training images, 128 held out (the ``gar_heldout`` reference), the other 769 the test
  set; a 2-conv CNN, Adam 1e-3, batch 64, 30 epochs;
* ``fmnist``: Fashion-MNIST, the first 100 training images of each class (1,000), the held-out
  reference 128 other training images, all 10,000 test images; a 2-conv CNN, SGD (momentum 0.9,
  nesterov) lr 0.05 with a cosine schedule, batch 64, 25 epochs;
* ``cifar10``: the JPEG CIFAR-10, the first 200 training images of each class (2,000), the
  held-out reference 128 others, all 10,000 test images; ``augment_quality.py``'s 5-conv CNN
  (width 16, BatchNorm), SGD (momentum 0.9, nesterov, weight decay 5e-4) lr 0.05 cosine,
  batch 128, 10 epochs.

Reported per data set and arm: test accuracy (mean, std, min, max over seeds), mean wall time
(training, probes included; not the test pass), and for every arm its per-seed paired
difference to ``frozen`` and to ``trivial_augment`` (mean, min, max), the final op weights of
the GAR arms, and a verdict per variant: it *beats* (*loses to*) another arm on a data set when
its mean accuracy is above (below) that arm's by more than the larger of the two arms' standard
deviations over seeds. The issue's decision rule: a variant wins if it beats ``frozen`` on at
least two of the three data sets and never loses to ``trivial_augment``.

    OMP_NUM_THREADS=1 python benchmarks/augment_study.py            # full study (see below)
    python benchmarks/augment_study.py --quick --datasets digits     # smoke run, writes nothing
    python benchmarks/augment_study.py --datasets digits,fmnist --arms none,frozen,gar

Measured: the full study (3 data sets x 10 arms x seeds 0,1,2, one torch thread on a 2-core
CPU shared with other work) took 3,198 s (53 minutes: digits 6, Fashion-MNIST 11, CIFAR-10
36, test passes included); results in ``benchmarks/results/augment_study.json`` and
docs/benchmark-log.md. It ran against the library of commit 005a470 (``PYTHONPATH`` pointing at
an export of it, as the working tree held uncommitted sampler changes); the results file
records which ``adaptive_data`` was imported. The data folder (default
``../shared/data`` beside the repository) holds ``fashion-mnist/`` and
``cifar10-jpeg.tar.gz``; CIFAR-10 is decoded once and cached as ``.npz`` under ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import adaptive_data as ad

from _common import expect_fixed_arms, header, summary, write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = Path.home() / ".cache" / "adaptive_data"
DATASETS = ("digits", "fmnist", "cifar10")
ARMS = (
    "none",
    "trivial_augment",
    "frozen",
    "gar",
    "gar_dot",
    "gar_heldout",
    "gar_baseline",
    "gar_mag_only",
    "gar_ops_only",
    "gar_big_evidence",
)
# The one-line GAR (gar.step() between backward and the optimizer step), next-batch reference,
# learning on: its budget= per arm (not in the default study; name them in --arms).
LINE_ARMS: dict[str, dict[str, Any]] = {
    "gar_line_exact": {"budget": None},
    "gar_line_default": {},
    "gar_line_0.1": {"budget": 0.1},
}
HELDOUT = 128  # images in the held-out reference batch
DEFAULT_OP_STEP = 0.1  # GARTransform's default lr (exp_grad)
BIG_EVIDENCE = 4  # gar_big_evidence's step is the default's / this


# ------------------------------------------------------------------ data sets


@dataclass
class Setup:
    """One data set: images (uint8 HWC or HW), the model and optimiser, the schedule."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_held: np.ndarray
    y_held: np.ndarray
    x_test: torch.Tensor  # normalised float [N, C, H, W]
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    base: list[Any]  # fixed v2 transforms on PIL images before the augmentation
    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module, int], tuple[torch.optim.Optimizer, Any]]
    epochs: int
    batch: int
    channels_last: bool = False


def small_cnn(side: int, width: int = 16, hidden: int = 0) -> Callable[[], nn.Module]:
    """Two 3x3 convs, each followed by ReLU and a 2x2 max-pool, then a linear head."""

    def make() -> nn.Module:
        w = width
        flat = 2 * w * (side // 4) ** 2
        head: list[nn.Module] = (
            [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
            if hidden
            else [nn.Linear(flat, 10)]
        )
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            *head,
        )

    return make


def adam(lr: float) -> Callable[[nn.Module, int], tuple[torch.optim.Optimizer, Any]]:
    def make(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.Adam(model.parameters(), lr=lr), None

    return make


def sgd_cosine(
    lr: float, weight_decay: float = 0.0
) -> Callable[[nn.Module, int], tuple[torch.optim.Optimizer, Any]]:
    def make(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    return make


def normalised(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    t = torch.from_numpy(x)
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    return v2.functional.normalize(t.float().div(255), list(mean), list(std))


def balanced(y: np.ndarray, per_class: int, skip: int = 0) -> np.ndarray:
    """Indices of images ``skip .. skip + per_class - 1`` of each class, in file order."""
    idx = [np.flatnonzero(y == c)[skip : skip + per_class] for c in range(10)]
    return np.sort(np.concatenate(idx))


def digits_setup(args: argparse.Namespace) -> Setup:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(1234).permutation(len(x))
    n = args.digits_train
    tr, held, te = perm[:n], perm[n : n + HELDOUT], perm[n + HELDOUT :]
    mean, std = (float(x[tr].mean() / 255),), (float(x[tr].std() / 255),)
    return Setup(
        "digits",
        x[tr],
        y[tr],
        x[held],
        y[held],
        normalised(x[te], mean, std),
        torch.from_numpy(y[te]),
        mean,
        std,
        [],
        small_cnn(8, hidden=64),
        adam(1e-3),
        args.digits_epochs,
        64,
    )


def fmnist_setup(args: argparse.Namespace) -> Setup:
    from mixture_quality import FILES, read_idx

    folder = args.data / "fashion-mnist"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        sys.exit(
            f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}.\n"
            "Pass the folder that holds fashion-mnist/ with --data, or leave fmnist out of "
            "--datasets."
        )
    xtr, ytr, xte, yte = (read_idx(folder / f).copy() for f in FILES)
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    per = args.fmnist_train // 10
    tr = balanced(ytr, per)
    held = balanced(ytr, -(-HELDOUT // 10), skip=per)[:HELDOUT]
    mean, std = (0.286,), (0.353,)
    return Setup(
        "fmnist",
        xtr[tr],
        ytr[tr],
        xtr[held],
        ytr[held],
        normalised(xte, mean, std),
        torch.from_numpy(yte),
        mean,
        std,
        [],
        small_cnn(28, hidden=64),
        sgd_cosine(0.05),
        args.fmnist_epochs,
        64,
    )


def cifar_setup(args: argparse.Namespace) -> Setup:
    import augment_quality as aq

    if (
        not (args.cache / "cifar10-jpeg.npz").is_file()
        and not (args.data / "cifar10-jpeg.tar.gz").is_file()
    ):
        sys.exit(
            f"CIFAR-10 not found: {args.data / 'cifar10-jpeg.tar.gz'} does not exist.\n"
            "Pass the folder that holds it with --data, or leave cifar10 out of --datasets."
        )
    arrays = aq.load(args.data, args.cache)
    per = args.cifar_train // 10
    i_tr, y_tr = arrays["i_train"], arrays["y_train"]
    tr = np.flatnonzero(i_tr < per)
    held = np.flatnonzero((i_tr >= per) & (i_tr < per + -(-HELDOUT // 10)))[:HELDOUT]
    mean, std = aq.MEAN, aq.STD
    return Setup(
        "cifar10",
        arrays["x_train"][tr],
        y_tr[tr],
        arrays["x_train"][held],
        y_tr[held],
        normalised(arrays["x_test"], mean, std),
        torch.from_numpy(arrays["y_test"]),
        mean,
        std,
        [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()],
        lambda: aq.cnn(16),
        sgd_cosine(0.05, weight_decay=5e-4),
        args.cifar_epochs,
        128,
        channels_last=True,
    )


SETUPS = {"digits": digits_setup, "fmnist": fmnist_setup, "cifar10": cifar_setup}


class Images:
    """PIL images with labels: ``post(augment(base(image)))``, and with ``clean=True`` also
    ``post(base(image))``: the same crop and flip without the op, for the per-image baseline."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, base: Any, augment: Any, post: Any, clean: bool
    ) -> None:
        self.images = [Image.fromarray(a) for a in x]
        self.labels = y.tolist()
        self.base, self.augment, self.post, self.clean = base, augment, post, clean

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        img = self.base(self.images[i])
        out = self.post(self.augment(img) if self.augment is not None else img)
        if self.clean:
            return out, self.post(img), self.labels[i]
        return out, self.labels[i]


# ------------------------------------------------------------------ one run


def gar_options(arm: str) -> dict[str, Any] | None:
    """GARTransform's arguments for an arm; None for the arms without one."""
    if arm in ("none", "trivial_augment"):
        return None
    if arm == "frozen":
        return {"learn_ops": False, "learn_magnitudes": False}
    # learning is opt-in (GARTransform's default is the frozen control)
    if arm == "gar_mag_only":
        return {"learn_ops": False, "learn_magnitudes": True}
    if arm == "gar_ops_only":
        return {"learn_ops": True, "learn_magnitudes": False}
    learn = {"learn_ops": True, "learn_magnitudes": True}
    if arm == "gar_big_evidence":
        return {**learn, "lr": DEFAULT_OP_STEP / BIG_EVIDENCE}
    return learn


@torch.no_grad()
def accuracy(model: nn.Module, s: Setup) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(s.x_test), 1000):
        xb = s.x_test[i : i + 1000]
        if s.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1) == s.y_test[i : i + 1000]).sum())
    model.train()
    return 100.0 * correct / len(s.x_test)


def run(arm: str, seed: int, s: Setup) -> dict[str, Any]:
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    model = s.model()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    options = gar_options(arm)
    tf = ad.GARTransform(**options) if options is not None else None
    augment = v2.TrivialAugmentWide() if arm == "trivial_augment" else tf
    post = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(s.mean, s.std)]
    )
    base = v2.Compose(s.base) if s.base else (lambda im: im)
    baseline = arm == "gar_baseline"
    data = Images(s.x_train, s.y_train, base, augment, post, clean=baseline)
    sampler = ad.GARSampler(
        data,
        batch_size=s.batch,
        seed=seed,
        transform=tf,
        reference_every=2 if tf is not None else None,
    )
    loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler, num_workers=0))
    steps = s.epochs * len(sampler)
    opt, sched = s.optimizer(model, steps)
    learns = tf is not None and arm != "frozen"
    line = LINE_ARMS.get(arm)
    probe = (
        ad.GradientProbe(
            model, loss_fn, estimator="ghost", reward="dot" if arm == "gar_dot" else "cosine"
        )
        if learns and line is None
        else None
    )
    gar = None if line is None else ad.GAR(model, sampler, optimizer=opt, **line)
    held: tuple[torch.Tensor, torch.Tensor] | None = None
    if arm == "gar_heldout":
        held = (normalised(s.x_held, s.mean, s.std), torch.from_numpy(s.y_held))
        if s.channels_last:
            held = (held[0].contiguous(memory_format=torch.channels_last), held[1])

    def cl(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x

    probe_s, rewarded, step = 0.0, 0, 0
    previous: tuple[Any, ...] | None = None
    t0 = time.perf_counter()
    for _ in range(s.epochs):
        for parts in loader:
            if baseline:
                x, x_clean, y = cl(parts[0]), cl(parts[1]), parts[2]
            else:
                x, y = cl(parts[0]), parts[1]
                x_clean = None
            batch = sampler.last_batch
            if probe is not None:
                reference_batch = sampler.is_reference(batch)
                if previous is not None and reference_batch:
                    tp = time.perf_counter()
                    px, py, pclean, pbatch = previous
                    ref = held if held is not None else (x, y)
                    r = probe(px, py, reference=ref, optimizer=opt)
                    if pclean is not None:  # the op's own effect on each image
                        r = r - probe(pclean, py, reference=ref, optimizer=opt)
                    sampler.update(r, batch=pbatch)
                    probe_s += time.perf_counter() - tp
                    rewarded += 1
                previous = None if reference_batch else (x, y, x_clean, batch)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            if gar is not None:
                tp = time.perf_counter()
                gar.step()
                probe_s += time.perf_counter() - tp
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
        previous = None  # the last batch of an epoch keeps no reward
    wall = time.perf_counter() - t0
    if gar is not None:
        rewarded = int(gar.metrics()["batches_rewarded"])
        gar.close()
    out: dict[str, Any] = {
        "seed": seed,
        "accuracy": accuracy(model, s),
        "wall_s": wall,
        "probe_s": probe_s,
        "steps": step,
        "rewarded_batches": rewarded,
    }
    if tf is not None:
        m = tf.policy.metrics()
        out["op_weights"] = tf.policy.op_weights
        out["magnitude"] = {k[len("magnitude/") :]: v for k, v in m.items() if "magnitude/" in k}
        out["policy_updates"] = m["updates"]
        out["nonfinite_rewards"] = m["nonfinite_rewards"]
    return out


# ------------------------------------------------------------------ reporting


def paired(values: list[float], base: list[float]) -> dict[str, Any]:
    d = [a - b for a, b in zip(values, base, strict=True)]
    return {"mean": statistics.fmean(d), "min": min(d), "max": max(d), "per_seed": d}


def compare(a: dict[str, float], b: dict[str, float]) -> str:
    """'beats' / 'loses' / 'tie': a's mean against b's, by more than the larger std."""
    spread = max(a["std"], b["std"])
    diff = a["mean"] - b["mean"]
    return "beats" if diff > spread else "loses" if diff < -spread else "tie"


def analyse(per_arm: dict[str, Any]) -> None:
    for entry in per_arm.values():
        entry["accuracy"] = summary([r["accuracy"] for r in entry["runs"]])
        entry["wall_s"] = summary([r["wall_s"] for r in entry["runs"]])
    for name, entry in per_arm.items():
        acc = [r["accuracy"] for r in entry["runs"]]
        for ref in ("frozen", "trivial_augment"):
            if ref in per_arm and name != ref:
                other = per_arm[ref]
                entry[f"vs_{ref}"] = paired(acc, [r["accuracy"] for r in other["runs"]])
                entry[f"vs_{ref}"]["verdict"] = compare(entry["accuracy"], other["accuracy"])


def decide(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's rule per variant: beats frozen on >= 2 data sets, never loses to TA."""
    out: dict[str, Any] = {}
    arms = {a for per in results["datasets"].values() for a in per["arms"]}
    for arm in [a for a in (*ARMS, *LINE_ARMS) if a in arms and a.startswith("gar")]:
        beats, loses_frozen, loses_ta, seen = [], [], [], []
        for ds, per in results["datasets"].items():
            e = per["arms"].get(arm)
            if e is None:
                continue
            seen.append(ds)
            if e.get("vs_frozen", {}).get("verdict") == "beats":
                beats.append(ds)
            if e.get("vs_frozen", {}).get("verdict") == "loses":
                loses_frozen.append(ds)
            if e.get("vs_trivial_augment", {}).get("verdict") == "loses":
                loses_ta.append(ds)
        out[arm] = {
            "datasets": seen,
            "beats_frozen_on": beats,
            "loses_to_frozen_on": loses_frozen,
            "loses_to_trivial_augment_on": loses_ta,
            "meets_rule": len(beats) >= 2 and not loses_ta and len(seen) == 3,
        }
    return out


def fmt(p: dict[str, Any] | None) -> str:
    if p is None:
        return ""
    return f"{p['mean']:+.2f} ({p['min']:+.2f}..{p['max']:+.2f}) {p['verdict']}"


def print_tables(results: dict[str, Any]) -> None:
    print(
        "\n| data | arm | accuracy mean | std | min | max | wall s (mean) | vs frozen "
        "(paired mean, min..max) | vs trivial_augment |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for ds, per in results["datasets"].items():
        for arm, e in per["arms"].items():
            a = e["accuracy"]
            print(
                f"| {ds} | {arm} | {a['mean']:.2f} | {a['std']:.2f} | {a['min']:.2f} | "
                f"{a['max']:.2f} | {e['wall_s']['mean']:.1f} | {fmt(e.get('vs_frozen'))} | "
                f"{fmt(e.get('vs_trivial_augment'))} |"
            )
    print("\n| variant | beats frozen on | loses to frozen on | loses to TA on | meets rule |")
    print("|---|---|---|---|---|")
    for arm, d in results["decision"].items():
        print(
            f"| {arm} | {', '.join(d['beats_frozen_on']) or '-'} | "
            f"{', '.join(d['loses_to_frozen_on']) or '-'} | "
            f"{', '.join(d['loses_to_trivial_augment_on']) or '-'} | {d['meets_rule']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding fashion-mnist/ and cifar10-jpeg.tar.gz (default: ../shared/data)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="decoded CIFAR cache")
    parser.add_argument("--quick", action="store_true", help="tiny run that writes nothing")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--digits-train", type=int, default=900)
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--fmnist-train", type=int, default=1000)
    parser.add_argument("--fmnist-epochs", type=int, default=25)
    parser.add_argument("--cifar-train", type=int, default=2000)
    parser.add_argument("--cifar-epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "augment_study.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    expect_fixed_arms()  # none, trivial_augment and frozen never update their sampler
    datasets = args.datasets.split(",")
    arms = args.arms.split(",")
    all_arms = (*ARMS, *LINE_ARMS)
    for given, known, what in ((datasets, DATASETS, "data set"), (arms, all_arms, "arm")):
        unknown = [g for g in given if g not in known]
        if unknown:
            sys.exit(f"unknown {what}(s) {unknown}; they are {', '.join(known)}")
    seeds = [int(v) for v in args.seeds.split(",")]
    if args.quick:
        seeds = seeds[:1]
        args.digits_train, args.digits_epochs = 256, 1
        args.fmnist_train, args.fmnist_epochs = 200, 1
        args.cifar_train, args.cifar_epochs = 300, 1
    results: dict[str, Any] = {
        **header(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "adaptive_data": str(Path(ad.__file__).parent),
        "seeds": seeds,
        "arms": arms,
        "big_evidence": f"lr = default / {BIG_EVIDENCE} (magnitude step 0.3x that)",
        "rule": (
            "A beats (loses to) B on a data set when mean(A) - mean(B) > (<) the larger of the "
            "two arms' std over seeds; a variant meets the issue's rule when it beats frozen on "
            ">= 2 of the 3 data sets and loses to trivial_augment on none"
        ),
        "datasets": {},
    }
    t_all = time.perf_counter()
    for ds in datasets:
        s = SETUPS[ds](args)
        if args.quick:
            s.x_test, s.y_test = s.x_test[:500], s.y_test[:500]
        per_arm: dict[str, Any] = {arm: {"runs": []} for arm in arms}
        for seed in seeds:  # arms interleaved within each seed
            for arm in arms:
                out = run(arm, seed, s)
                print(
                    f"{ds}, {arm}, seed {seed}: {out['accuracy']:.2f}% in {out['wall_s']:.1f} s "
                    f"(probe {out['probe_s']:.1f} s)",
                    flush=True,
                )
                per_arm[arm]["runs"].append(out)
        analyse(per_arm)
        results["datasets"][ds] = {
            "train_images": len(s.x_train),
            "heldout_images": len(s.x_held),
            "test_images": len(s.x_test),
            "epochs": s.epochs,
            "batch": s.batch,
            "arms": per_arm,
        }
        if not args.quick:  # what is done so far survives an interrupted run
            results["total_wall_s"] = time.perf_counter() - t_all
            results["decision"] = decide(results)
            write(args.out, results)
    results["total_wall_s"] = time.perf_counter() - t_all
    results["decision"] = decide(results)
    print_tables(results)
    print(f"\ntotal {results['total_wall_s']:.0f} s")
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
