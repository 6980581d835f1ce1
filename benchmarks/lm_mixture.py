"""Which data mixture trains a byte-level language model best for a target domain?

Six training sources of byte sequences (length 128, cut from ``text/*.txt.gz`` in the shared
data folder, described in its README):

* ``en_man1`` (English manual pages, section 1), the source closest to the target;
* ``de_man``, ``fr_man`` (German and French manual pages), ``py_code`` (Python sources);
* ``random_bytes``: uniformly random bytes (as many sequences as ``en_man1`` has, times 1.5);
* ``shuffled_en``: the ``en_man1`` sequences with their bytes shuffled within each sequence
  (unigram statistics of English, no order).

Target: ``en_man1_target`` (other English section-1 pages), its sequences split into two
disjoint halves: one for reference batches, one for the test loss (nats per byte, the mean
next-byte cross-entropy over a fixed set of test sequences).

Model: a byte-level causal transformer from stock parts (``nn.Embedding`` tokens, learned
positions ``nn.Embedding(128, d)`` on ``arange(T)``, ``nn.TransformerEncoder(batch_first=True,
norm_first=True)`` with a causal mask, a Linear head; d=128, 2 layers, 4 heads, about 0.48M
parameters), AdamW (lr 1e-3), batch 16. Arms, run in one process, interleaved per seed, all
for the same number of steps:

* ``uniform``, ``proportional`` (to source sizes): fixed weights;
* ``odm_exp3``: ODM's online bandit, exponentiated gradient on the training loss of each
  batch (``GARSampler(rule="exp_grad", lr=0.1)`` updated with the per-example losses);
* ``doremi``: DoReMi's weights (exponentiated gradient on the per-domain excess loss,
  ``max(0, loss_proxy - loss_reference)``, step 1, smoothing 1e-3) for the model being
  trained, the reference model trained first on the uniform mixture for the same number of
  steps; that training is counted in this arm's wall time;
* ``doge``: DoGE's out-of-domain rule: the batch is drawn uniformly, each domain's gradient
  ``g_i`` (of its examples' mean loss) is aligned with the gradient of a target reference
  batch, ``W_i = <g_i, g_target>``, the weights move by ``alpha <- softmax(log alpha + eta W)``
  and the model steps on ``sum_i alpha_i g_i`` (eta scaled by the learning rate, as DoGE does);
* ``gar``: the one-line GAR with a held-out reference (``ReferenceBatches`` of 32 target
  sequences), every default otherwise; ``gar_every4``: the same, rewarding every 4th step;
  ``gar_r8`` and ``gar_every4_r8`` (not in the default run: ``--methods``): the same two
  against a reference gradient recomputed every 8th step (``reference_refresh=8``);
  ``gar_r8_rows4`` and ``gar_r8_rows8``: every step, the reference recomputed every 8th, 4 or
  8 rows of each batch of 16 rewarded (``rows=``); ``gar_fd_r8_rows4``: as
  ``gar_r8_rows4`` with forward-only rewards (``estimator="fd"``, ``reward="dot"``), and
  ``gar_dot_r8_rows4`` the exact rewards with that same reward (the estimator's control);
  ``gar_r32``, ``gar_r32_rows4`` and ``gar_fd_r32_rows4``: as ``gar_r8``, ``gar_r8_rows4``
  and ``gar_fd_r8_rows4`` with the reference gradient recomputed every 32nd step.

Reported per arm: test loss against steps and against wall time
(``benchmarks/results/lm_mixture_loss_steps.png``, ``..._loss_wall.png``), the weights over
time (``..._weights.png``), final loss (mean, std over seeds), wall time, the steps and wall
time each arm needs to reach uniform's final loss (per seed), the loss each arm has at
uniform's wall time (equal compute), and when the corrupted sources fall under 5% weight.
Evaluation is not counted in wall time.

    python benchmarks/lm_mixture.py [DATA_DIR]          # full run (20 min on 2 shared cores)
    python benchmarks/lm_mixture.py [DATA_DIR] --quick  # smoke run (seconds), writes nothing

``DATA_DIR`` holds ``text/*.txt.gz`` (default: ``../shared/data`` beside the repository).

``--stream`` reads every training source as a sharded Hugging Face stream
(``datasets.Dataset.from_dict(...).to_iterable_dataset(num_shards=...)``, ``--shards`` shards
each), as a corpus is read in practice, through ``--workers`` DataLoader workers (persistent,
each reading its own shards); the batches are then dicts (``input_ids``, ``labels``,
``domain``). The sequences are the same; which of them a batch holds differs from the
map-style run (a stream is read in order, a map-style source in a shuffled one).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import expect_fixed_arms, header, summary, write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DOMAINS = ("en_man1", "de_man", "fr_man", "py_code")
TARGET = "en_man1_target"
SEQ = 128
VOCAB = 256
METHODS = ("uniform", "proportional", "odm_exp3", "doremi", "doge", "gar", "gar_every4")
# The GAR arms: (every, reference_refresh, rows, estimator, reward, budget; None: GAR's
# default, except the budget: the explicit arms run without one, budget=None, what they
# measured before it existed). gar_default is every default (the budget chooses). The _r8,
# _rows, _fd and budget arms are not in the default run.
GAR_ARMS: dict[str, tuple[int | None, int | None, int | None, str, str | None, float | None]] = {
    "gar": (1, 1, None, "ghost", None, None),
    "gar_every4": (4, 1, None, "ghost", None, None),
    "gar_r8": (1, 8, None, "ghost", None, None),
    "gar_every4_r8": (4, 8, None, "ghost", None, None),
    "gar_r8_rows4": (1, 8, 4, "ghost", None, None),
    "gar_r8_rows8": (1, 8, 8, "ghost", None, None),
    "gar_dot_r8_rows4": (1, 8, 4, "ghost", "dot", None),
    "gar_fd_r8_rows4": (1, 8, 4, "fd", "dot", None),
    "gar_r32": (1, 32, None, "ghost", None, None),
    "gar_r32_rows4": (1, 32, 4, "ghost", None, None),
    "gar_fd_r32_rows4": (1, 32, 4, "fd", "dot", None),
    "gar_default": (None, None, None, "ghost", None, 0.1),
    "gar_budget0.2": (None, None, None, "ghost", None, 0.2),
}
CORRUPTED = ("random_bytes", "shuffled_en")


def read_domain(folder: Path, name: str) -> torch.Tensor:
    """The domain's bytes cut into sequences of SEQ + 1 (input and next-byte target), uint8."""
    with gzip.open(folder / f"{name}.txt.gz", "rb") as f:
        raw = f.read()
    n = len(raw) // (SEQ + 1)
    return torch.frombuffer(bytearray(raw[: n * (SEQ + 1)]), dtype=torch.uint8).view(n, SEQ + 1)


def pairs(seqs: torch.Tensor, domain: int | None = None) -> TensorDataset:
    """``(input, target)`` pairs, plus the domain's id in every example when given (the
    DoReMi and DoGE arms read it to split a batch by domain; the others ignore it)."""
    seqs = seqs.long()
    x, y = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
    if domain is None:
        return TensorDataset(x, y)
    return TensorDataset(x, y, torch.full((len(seqs),), domain, dtype=torch.long))


def stream(source: TensorDataset, shards: int) -> Any:
    """The same examples as a Hugging Face stream of ``shards`` shards (dict examples:
    ``input_ids``, ``labels``, ``domain``), as ``load_dataset(..., streaming=True)`` reads a
    sharded corpus."""
    import datasets

    x, y, domain = source.tensors
    table = datasets.Dataset.from_dict(
        {"input_ids": x.numpy(), "labels": y.numpy(), "domain": domain.numpy()}
    )
    return table.to_iterable_dataset(num_shards=shards).with_format("torch")


def loader_for(sampler: ad.GARSampler, args: argparse.Namespace) -> Any:
    """The tracked loader over the sampler; with ``--stream``, ``--workers`` persistent
    workers (each holds its place in its shards of the streams)."""
    workers = args.workers if args.stream else 0
    return sampler.track(
        DataLoader(
            sampler.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
    )


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input, target, domain)`` of a map-style (tuple) or a stream (dict) batch."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"], batch["domain"]
    return batch


def load(data_dir: Path, scale: float) -> tuple[dict[str, TensorDataset], TensorDataset, Any]:
    """Sources, the reference half of the target and the test half (fixed data seed 1234)."""
    folder = data_dir / "text"
    missing = [n for n in (*DOMAINS, TARGET) if not (folder / f"{n}.txt.gz").is_file()]
    if missing:
        sys.exit(
            f"text domains not found: {folder} lacks "
            f"{', '.join(n + '.txt.gz' for n in missing)}.\n"
            "Pass the folder that holds text/ as the first argument, e.g.\n"
            "    python benchmarks/lm_mixture.py /path/to/data"
        )
    g = torch.Generator().manual_seed(1234)
    raw = {n: read_domain(folder, n) for n in (*DOMAINS, TARGET)}
    if scale < 1:
        raw = {n: s[: max(64, int(len(s) * scale))] for n, s in raw.items()}
    en = raw["en_man1"]
    noise = torch.randint(0, 256, (int(1.5 * len(en)), SEQ + 1), generator=g, dtype=torch.uint8)
    order = torch.argsort(torch.rand(en.shape, generator=g), dim=1)
    shuffled = torch.gather(en, 1, order)
    sources = {n: pairs(raw[n], i) for i, n in enumerate(DOMAINS)}
    sources["random_bytes"] = pairs(noise, len(DOMAINS))
    sources["shuffled_en"] = pairs(shuffled, len(DOMAINS) + 1)
    target = raw[TARGET][torch.randperm(len(raw[TARGET]), generator=g)]
    half = len(target) // 2
    return sources, pairs(target[:half]), pairs(target[half:])


class ByteLM(nn.Module):
    """Token and position embeddings, a pre-norm causal TransformerEncoder, a Linear head.
    ``stock``: as nanoGPT-style code keeps it, the causal mask a registered buffer sliced in
    each forward, and torch's default dropout 0.1."""

    def __init__(
        self,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        expand_positions: bool = False,
        stock: bool = False,
    ) -> None:
        super().__init__()
        self.expand_positions = expand_positions
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1 if stock else 0.0, batch_first=True, norm_first=True
        )
        self.stock = stock
        if stock:
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        positions = torch.arange(t, device=x.device)
        if self.expand_positions:  # [B, T]: the position embedding's output holds the batch
            positions = positions.expand(b, t)
        h = self.tok(x) + self.pos(positions)
        if self.stock:
            mask = self.mask[:t, :t]
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.head(self.norm(self.body(h, mask=mask, is_causal=True)))


def per_example_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of each sequence: ``[N, T, V], [N, T] -> [N]``."""
    return F.cross_entropy(output.transpose(1, 2), target, reduction="none").mean(1)


@torch.no_grad()
def target_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> float:
    """The mean loss on ``(x, y)``; the stock model (the only one with dropout) in eval mode,
    its mode left as it was (the others as they always were measured, in train mode)."""
    training = model.training
    if getattr(model, "stock", False):
        model.eval()
    try:
        total = sum(
            float(per_example_loss(model(x[i : i + chunk]), y[i : i + chunk]).sum())
            for i in range(0, len(x), chunk)
        )
    finally:
        model.train(training)
    return total / len(x)


def set_weights(sampler: ad.GARSampler, weights: list[float]) -> None:
    """Make the sampler draw from ``weights`` (its floor still applies): logits = log w."""
    state = sampler.policy.state_dict()
    state["logits"] = torch.tensor([math.log(max(w, 1e-30)) for w in weights], dtype=torch.float64)
    sampler.policy.load_state_dict(state)


def train_reference(
    sources: dict[str, TensorDataset], seed: int, steps: int, args: argparse.Namespace
) -> tuple[nn.Module, float]:
    """DoReMi's reference model: the same model trained on the uniform mixture."""
    torch.manual_seed(10_000 + seed)
    model = ByteLM(expand_positions=args.expand_positions, stock=args.stock)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = ad.GARSampler(sources, batch_size=args.batch, seed=10_000 + seed, num_batches=steps)
    loader = loader_for(sampler, args)
    t0 = time.perf_counter()
    for batch in loader:
        x, y, _ = unpack(batch)
        loss = per_example_loss(model(x), y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, time.perf_counter() - t0


def run(
    method: str,
    seed: int,
    sources: dict[str, TensorDataset],
    ref_set: TensorDataset,
    test: tuple[torch.Tensor, torch.Tensor],
    reference_model: tuple[nn.Module, float] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    names = list(sources)
    k = len(names)
    torch.manual_seed(seed)  # the model's initialisation (benchmark code, not the library)
    model = ByteLM(expand_positions=args.expand_positions, stock=args.stock)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    kw: dict[str, Any] = {"batch_size": args.batch, "seed": seed, "num_batches": args.steps}
    if args.lag is not None:
        kw["lag"] = args.lag
    if method == "proportional":  # to the sources' sizes (a stream has no len(): given)
        sampler = ad.GARSampler(sources, weights=[args.sizes[n] for n in names], **kw)
    elif method == "odm_exp3":
        sampler = ad.GARSampler(sources, rule="exp_grad", lr=0.1, **kw)
    else:
        sampler = ad.GARSampler(sources, **kw)
    loader = loader_for(sampler, args)
    gar = None
    if method in GAR_ARMS:
        every, refresh, rows, estimator, reward, budget = GAR_ARMS[method]
        extra: dict[str, Any] = {} if reward is None else {"reward": reward}
        gar = ad.GAR(
            model,
            sampler,
            optimizer=opt,
            every=every,
            reference=ad.ReferenceBatches(ref_set, args.ref_batch, seed=seed),
            loss_fn=per_example_loss,
            reference_refresh=refresh,
            rows=rows,
            estimator=estimator,
            budget=budget,
            **extra,
        )
    ref_iter = (
        iter(ad.ReferenceBatches(ref_set, args.ref_batch, seed=seed)) if method == "doge" else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    alpha = [1.0 / k] * k  # DoReMi's and DoGE's own weights
    weights_hist: list[list[float]] = []
    curve: list[tuple[int, float, float]] = []  # (step, wall s, test loss)
    below: dict[str, int | None] = {n: None for n in CORRUPTED}
    drawn_below: dict[str, int | None] = {n: None for n in CORRUPTED}
    wall = reference_model[1] if method == "doremi" else 0.0
    curve.append((0, wall, target_loss(model, *test)))
    step = 0
    tick = time.perf_counter()
    for batch in loader:
        x, y, src = unpack(batch)
        if method == "doge":
            xr, yr = next(ref_iter)
            g_t = torch.autograd.grad(per_example_loss(model(xr), yr).mean(), params)
            grads: dict[int, tuple[torch.Tensor, ...]] = {}
            for i in src.unique().tolist():
                rows = src == i
                loss_i = per_example_loss(model(x[rows]), y[rows]).mean()
                grads[i] = torch.autograd.grad(loss_i, params)
            eta = args.doge_eta * args.lr
            logits = [math.log(a) for a in alpha]
            for i, g in grads.items():
                w_i = sum(float((a * b).sum()) for a, b in zip(g, g_t, strict=True))
                logits[i] += eta * w_i
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            alpha = [v / sum(e) for v in e]
            # the model steps on sum_i alpha_i g_i over the domains in the batch, renormalised
            mass = sum(alpha[i] for i in grads)
            opt.zero_grad(set_to_none=True)
            for j, p in enumerate(params):
                p.grad = sum(alpha[i] / mass * g[j] for i, g in grads.items())
            opt.step()
        else:
            out = model(x)
            losses = per_example_loss(out, y)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            if gar is not None:
                gar.step()
            opt.step()
            if method == "odm_exp3":
                sampler.update(losses.detach())
            elif method == "doremi":
                with torch.no_grad():
                    ref_losses = per_example_loss(reference_model[0](x), y)
                excess = (losses.detach() - ref_losses).clamp_min(0)
                logits = [math.log(a) for a in alpha]
                for i in src.unique().tolist():
                    logits[i] += args.doremi_eta * float(excess[src == i].mean())
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                q = [v / sum(e) for v in e]
                c = 1e-3
                alpha = [(1 - c) * v + c / k for v in q]
                set_weights(sampler, alpha)
        step += 1
        w = alpha if method == "doge" else list(sampler.weights.values())
        weights_hist.append(w)
        drawn = alpha if method == "doge" else list(sampler.drawing_weights.values())
        for n in CORRUPTED:
            if below[n] is None and w[names.index(n)] < 0.05:
                below[n] = step
            if drawn_below[n] is None and drawn[names.index(n)] < 0.05:
                drawn_below[n] = step  # the next batch is drawn with it under 5%
        if step % args.eval_every == 0 or step == args.steps:
            wall += time.perf_counter() - tick
            curve.append((step, wall, target_loss(model, *test)))
            tick = time.perf_counter()
    gar_metrics = None
    if gar is not None:
        gar_metrics = gar.metrics()
        gar.close()
    stride = max(1, len(weights_hist) // 200)
    return {
        "gar_metrics": gar_metrics,
        "final_loss": curve[-1][2],
        "wall_s": curve[-1][1],
        "reference_wall_s": reference_model[1] if method == "doremi" else 0.0,
        "steps": step,
        "curve": curve,
        "final_weights": dict(zip(names, weights_hist[-1], strict=True)),
        "first_step_below_5pct": below,
        "first_drawn_step_below_5pct": drawn_below,
        "weights_stride": stride,
        "weights": weights_hist[::stride],
    }


def reach(curve: list[list[float]], level: float) -> tuple[int | None, float | None]:
    """First evaluated (step, wall s) at which the test loss is at or below ``level``."""
    for step, wall, loss in curve:
        if loss <= level:
            return int(step), wall
    return None, None


def at_wall(curve: list[list[float]], wall: float) -> float:
    """Test loss at ``wall`` seconds (linear between evaluations; the last one past the end)."""
    for (_, w0, l0), (_, w1, l1) in itertools.pairwise(curve):
        if w0 <= wall <= w1:
            return l0 + (l1 - l0) * (wall - w0) / max(w1 - w0, 1e-12)
    return curve[-1][2] if wall > curve[-1][1] else curve[0][2]


def analyse(results: dict[str, Any]) -> None:
    methods = results["methods"]
    uni = methods["uniform"]["runs"]
    steps = results["steps"]
    for entry in methods.values():
        runs = entry["runs"]
        entry["final_loss"] = summary([r["final_loss"] for r in runs])
        entry["wall_s"] = summary([r["wall_s"] for r in runs])
        hits = [reach(r["curve"], u["final_loss"]) for r, u in zip(runs, uni, strict=True)]
        entry["steps_to_uniform_final"] = [h[0] for h in hits]
        entry["wall_to_uniform_final"] = [h[1] for h in hits]
        entry["loss_at_uniform_wall"] = summary(
            [at_wall(r["curve"], u["wall_s"]) for r, u in zip(runs, uni, strict=True)]
        )
        entry["time_vs_uniform"] = statistics.median(
            r["wall_s"] / u["wall_s"] for r, u in zip(runs, uni, strict=True)
        )
        firsts = {n: [r["first_step_below_5pct"][n] for r in runs] for n in CORRUPTED}
        entry["first_step_below_5pct"] = firsts
        drawn = {n: [r["first_drawn_step_below_5pct"][n] for r in runs] for n in CORRUPTED}
        entry["first_drawn_step_below_5pct"] = drawn  # what the batches follow, after the lag
        entry["random_below_5pct_in_first_10pct"] = [
            v is not None and v <= steps // 10 for v in drawn["random_bytes"]
        ]
        entry["shuffled_below_5pct_at_end"] = [
            r["final_weights"]["shuffled_en"] < 0.05 for r in runs
        ]
    gar = methods.get("gar")
    if gar is not None:
        others = [m for m in methods if m != "gar"]
        best_other = min(others, key=lambda m: methods[m]["final_loss"]["mean"])
        frac = [None if s is None else s / steps for s in gar["steps_to_uniform_final"]]
        results["targets"] = {
            "gar_steps_to_uniform_final_fraction": frac,
            "gar_within_60pct_of_uniform_steps": [f is not None and f <= 0.6 for f in frac],
            "best_other_arm": best_other,
            "gar_margin_over_best_other": methods[best_other]["final_loss"]["mean"]
            - gar["final_loss"]["mean"],
            "gar_beats_every_other_arm_by_0.02": methods[best_other]["final_loss"]["mean"]
            - gar["final_loss"]["mean"]
            >= 0.02,
        }


def print_tables(results: dict[str, Any]) -> None:
    steps = results["steps"]
    print(
        "\n| arm | final test loss (nats/byte) mean ± std | wall s (median) | x uniform time "
        "| steps to uniform's final loss (per seed) | wall s to it | loss at uniform's wall time |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, e in results["methods"].items():
        fl, w, aw = e["final_loss"], e["wall_s"], e["loss_at_uniform_wall"]
        st = ", ".join("-" if s is None else str(s) for s in e["steps_to_uniform_final"])
        wt = ", ".join("-" if s is None else f"{s:.0f}" for s in e["wall_to_uniform_final"])
        print(
            f"| {method} | {fl['mean']:.3f} ± {fl['std']:.3f} | {w['median']:.1f} | "
            f"{e['time_vs_uniform']:.2f} | {st} | {wt} | {aw['mean']:.3f} ± {aw['std']:.3f} |"
        )
    print(
        f"\n| arm | random_bytes first step < 5% (10% = {steps // 10}) | shuffled_en < 5% at end |"
    )
    print("|---|---|---|")
    for method, e in results["methods"].items():
        f = e["first_step_below_5pct"]["random_bytes"]
        print(
            f"| {method} | {', '.join('-' if v is None else str(v) for v in f)} | "
            f"{', '.join(str(v) for v in e['shuffled_below_5pct_at_end'])} |"
        )
    print("\nfinal weights (first seed):")
    for method, e in results["methods"].items():
        w = e["runs"][0]["final_weights"]
        print(f"  {method:12s} " + ", ".join(f"{n}={v:.3f}" for n, v in w.items()))
    if "targets" in results:
        print(f"\ntargets: {results['targets']}")


def plot(results: dict[str, Any], out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return {}
    paths: dict[str, str] = {}
    methods = results["methods"]
    for key, axis, label in (("steps", 0, "step"), ("wall", 1, "wall time (s)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, e in methods.items():
            curves = [r["curve"] for r in e["runs"]]
            xs = [statistics.fmean(c[i][axis] for c in curves) for i in range(len(curves[0]))]
            ys = [statistics.fmean(c[i][2] for c in curves) for i in range(len(curves[0]))]
            ax.plot(xs[1:], ys[1:], label=method, marker="." if axis else None)
        ax.axhline(methods["uniform"]["final_loss"]["mean"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(label + (" (mean over seeds)" if axis else ""))
        ax.set_ylabel("target test loss (nats/byte)")
        ax.set_title(f"target test loss vs {label}, mean of {len(results['seeds'])} seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_loss_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"loss_vs_{key}"] = (
            str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        )
    shown = [m for m in ("odm_exp3", "doremi", "doge", *GAR_ARMS) if m in methods]
    fig, axes = plt.subplots(
        1, len(shown), figsize=(4 * len(shown), 3.4), sharey=True, squeeze=False
    )
    names = results["sources"]
    for ax, method in zip(axes[0], shown, strict=True):
        run = methods[method]["runs"][0]
        hist, stride = run["weights"], run["weights_stride"]
        for j, n in enumerate(names):
            ax.plot([(i + 1) * stride for i in range(len(hist))], [h[j] for h in hist], label=n)
        ax.axhline(0.05, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{method} (seed {results['seeds'][0]})")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("weight")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_weights.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["weights"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return paths


def main() -> None:
    expect_fixed_arms()  # uniform, proportional and DoReMi's reference model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding text/ (default: ../shared/data)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read every source as a sharded Hugging Face stream (dict batches)",
    )
    parser.add_argument("--shards", type=int, default=8, help="shards per stream (--stream)")
    parser.add_argument(
        "--workers", type=int, default=1, help="DataLoader workers with --stream (default 1)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ref-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--doremi-eta", type=float, default=1.0)
    parser.add_argument("--doge-eta", type=float, default=100.0, help="DoGE's step / lr")
    parser.add_argument(
        "--expand-positions",
        action="store_true",
        help="call the position embedding on arange(T).expand(B, T) (its output then holds "
        "the batch, which GAR's ghost rules cover without replaying the whole model)",
    )
    parser.add_argument(
        "--stock",
        action="store_true",
        help="the model as nanoGPT-style code keeps it: the causal mask a registered buffer "
        "sliced in each forward, and torch's default dropout 0.1",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--lag", type=int, default=None, help="GARSampler(lag=) of every arm (default: its default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "lm_mixture.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 1.0
    if args.quick:
        args.steps, args.eval_every, args.test_size, args.seeds, scale = 4, 2, 16, "0", 0.02
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    known = list(dict.fromkeys((*METHODS, *GAR_ARMS)))
    unknown = sorted(set(methods) - set(known))
    if unknown:
        sys.exit(f"unknown --methods {unknown}: choose from {', '.join(known)}")
    if "uniform" not in methods:
        sys.exit("--methods must include uniform (the other arms are measured against it)")
    sources, ref_set, test_set = load(args.data, scale)
    args.sizes = sizes = {n: len(s) for n, s in sources.items()}
    if args.stream:
        sources = {n: stream(s, args.shards) for n, s in sources.items()}
    test = (test_set.tensors[0][: args.test_size], test_set.tensors[1][: args.test_size])
    n_params = sum(p.numel() for p in ByteLM().parameters())
    results: dict[str, Any] = {
        **header(),
        "sources": list(sources),
        "sizes": sizes,
        "reference_size": len(ref_set),
        "test_size": len(test[0]),
        "model_parameters": n_params,
        "sequence": SEQ,
        "batch": args.batch,
        "ref_batch": args.ref_batch,
        "lr": args.lr,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "doremi_eta": args.doremi_eta,
        "doge_eta_over_lr": args.doge_eta,
        "expand_positions": args.expand_positions,
        "stock": args.stock,
        "stream": args.stream,
        "shards": args.shards if args.stream else None,
        "workers": args.workers if args.stream else 0,
        "seeds": seeds,
        "methods": {m: {"runs": []} for m in methods},
    }
    print(f"model parameters: {n_params:,}; sizes: {results['sizes']}", flush=True)
    start = time.perf_counter()
    for seed in seeds:  # interleaved, so machine noise hits every arm alike
        reference = (
            train_reference(sources, seed, args.steps, args) if "doremi" in methods else None
        )
        for method in methods:
            res = run(method, seed, sources, ref_set, test, reference, args)
            res["seed"] = seed
            results["methods"][method]["runs"].append(res)
            print(
                f"seed {seed} {method:12s} loss {res['final_loss']:.3f}  {res['wall_s']:6.1f}s  "
                + ", ".join(f"{n}={v:.3f}" for n, v in res["final_weights"].items()),
                flush=True,
            )
    results["total_wall_s"] = time.perf_counter() - start
    analyse(results)
    print_tables(results)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["plots"] = plot(results, args.out)
        write(args.out, results, indent=1)


if __name__ == "__main__":
    main()
