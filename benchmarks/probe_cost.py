"""Cost of one GradientProbe call against one plain training step, per method and model.

For an MLP, a small ResNet-style CNN with BatchNorm (32x32 images) and a transformer block
(Embedding + MultiheadAttention, sequence 64), this times, interleaved in one process so that
machine noise hits every variant alike:

* ``step``: the user's plain training step (zero_grad, forward, backward, SGD step);
* each probe method: ``probe(x, y, reference=(x_ref, y_ref))``, a reference batch of the same
  size, so a call includes the reference forward and backward.

It reports the median time of each, its ratio to the step, and the peak of memory allocated
by tensors during one call (a dispatch mode follows every tensor's storage), also as a ratio
to the step's. Figures go to ``benchmarks/results/probe_cost.json``.

    python benchmarks/probe_cost.py             # full run (a few minutes on 2 cores)
    python benchmarks/probe_cost.py --quick     # a smoke run for CI (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adaptive_data as ad

from _common import header, write

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_TIME = 2.5  # ghost and jvp calls vs a plain step (the target)
TARGET_MEMORY = 1.5  # ghost peak memory vs a plain step's


# ---------------------------------------------------------------- models


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.skip(x))


def small_resnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        ResidualBlock(32, 32, 1),
        ResidualBlock(32, 64, 2),
        ResidualBlock(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


class Positions(nn.Module):
    """Learned positions in a module of their own: ghost's JVP fallback then runs on it alone."""

    def __init__(self, seq: int, dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.pos


class TransformerClassifier(nn.Module):
    """Embedding, learned positions, one attention block, mean pooling, a Linear head.

    With ``own_module=False`` the positions are a bare Parameter of the root module, as in many
    vision transformers; ghost's JVP fallback then has to replay the whole model.
    """

    def __init__(
        self,
        vocab: int = 1000,
        dim: int = 128,
        heads: int = 4,
        seq: int = 64,
        own_module: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = Positions(seq, dim) if own_module else None
        if not own_module:
            self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.positions(self.embed(tokens)) if self.positions else self.embed(tokens) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.ff(h))
        return self.head(h.mean(1))


def cases(
    batch: int,
) -> dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Any]]]:
    def images(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(
            0, 10, (batch,), generator=g
        )

    def flat(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def tokens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randint(0, 1000, (batch, 64), generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    return {
        "mlp": (mlp, flat),
        "resnet_bn": (small_resnet, images),
        "transformer": (TransformerClassifier, tokens),
        "transformer_pos_module": (lambda: TransformerClassifier(own_module=True), tokens),
    }


# ---------------------------------------------------------------- memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive at each moment."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}
        self._tracked: set[int] = set()  # ids of live tensors already counted

    def _release(self, ident: int, key: int) -> None:
        self._tracked.discard(ident)
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in self._tracked:
                continue
            try:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
            except RuntimeError:
                # forward-AD dual tensors hide their storage: count the tensor's own bytes
                key, nbytes = -id(t), t.numel() * t.element_size()
            if key == 0:
                continue
            self._tracked.add(id(t))
            if key in self._storages:
                self._storages[key][1] += 1
            else:
                self._storages[key] = [nbytes, 1]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, id(t), key)
        return out


def peak_bytes(fn: Callable[[], object]) -> int | None:
    try:
        with LiveTensorBytes() as mode:
            fn()
        return mode.peak
    except Exception as exc:  # a transform that does not compose with dispatch modes
        print(f"    (memory not measured: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


# ---------------------------------------------------------------- timing


def run_case(
    name: str,
    build: Callable[[], nn.Module],
    draw: Callable[[torch.Generator], Any],
    methods: list[str],
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build().train()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [draw(g) for _ in range(4)]
    refs = [draw(g) for _ in range(4)]

    def step(i: int) -> None:
        x, y = batches[i % 4]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).mean().backward()
        opt.step()

    probes = {m: ad.GradientProbe(model, loss_fn, estimator=m, chunk_size=32) for m in methods}

    def call(method: str) -> Callable[[int], None]:
        def run(i: int) -> None:
            probes[method](*batches[i % 4], reference=refs[i % 4])

        return run

    variants: dict[str, Callable[[int], None]] = {"step": step, **{m: call(m) for m in methods}}
    for i in range(warmup):
        for fn in variants.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    shuffle = torch.Generator().manual_seed(1)  # the order in which the variants run
    for i in range(repeats):
        for j in torch.randperm(len(keys), generator=shuffle).tolist():
            key = keys[j]
            t0 = time.perf_counter()
            variants[key](i)
            times[key].append(time.perf_counter() - t0)
    memory = {key: peak_bytes(lambda fn=fn: fn(0)) for key, fn in variants.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "methods": {}}
    for key in variants:
        mem = memory[key]
        out["methods"][key] = {
            "median_ms": 1e3 * median[key],
            "p25_ms": 1e3 * statistics.quantiles(times[key], n=4)[0],
            "p75_ms": 1e3 * statistics.quantiles(times[key], n=4)[2],
            "time_ratio": median[key] / median["step"],
            "peak_mb": None if mem is None else mem / 2**20,
            "memory_ratio": None if mem is None or not memory["step"] else mem / memory["step"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--methods",
        default=",".join(ad.ESTIMATORS),
        help="comma-separated probe methods (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_cost.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batch = 3, 1, 16
    methods = args.methods.split(",")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results: dict[str, Any] = {
        **header(),
        "batch": args.batch,
        "repeats": args.repeats,
        "targets": {"time_ratio": TARGET_TIME, "memory_ratio": TARGET_MEMORY},
        "cases": {},
    }
    for name, (build, draw) in cases(args.batch).items():
        print(f"{name} ...", flush=True)
        results["cases"][name] = run_case(name, build, draw, methods, args.repeats, args.warmup)

    print("\n| model | variant | median ms | x step time | peak MB | x step memory |")
    print("|---|---|---|---|---|---|")
    for name, case in results["cases"].items():
        for key, m in case["methods"].items():
            mem = "n/a" if m["peak_mb"] is None else f"{m['peak_mb']:.1f}"
            ratio = "n/a" if m["memory_ratio"] is None else f"{m['memory_ratio']:.2f}"
            row = [name, key, f"{m['median_ms']:.2f}", f"{m['time_ratio']:.2f}", mem, ratio]
            print("| " + " | ".join(row) + " |")
    if not args.quick:
        write(args.out, results)


if __name__ == "__main__":
    main()
