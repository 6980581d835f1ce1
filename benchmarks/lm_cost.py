"""What does GAR cost a language model's training step, against model size?

For three causal language models built from configs (nothing downloaded: a stock
``nn.TransformerEncoder`` LM with dropout and a buffered causal mask, ``transformers``'
``GPT2LMHeadModel`` and ``LlamaForCausalLM``; byte-level vocabulary of 256, random tokens,
AdamW) at several sizes, the same loop over a two-source ``GARSampler`` loader runs without
``GAR`` (``plain``) and with it, ``gar.step()`` between ``backward()`` and
``optimizer.step()``, a held-out ``ReferenceBatches`` of the batch size and the per-sequence
mean next-token cross-entropy as ``loss_fn``, for each documented setting: ``exact``
(``budget=None``: a fresh reference gradient every step, cosine, every row), ``dot``
(``reward="dot"``), ``r32_rows4`` (``reference_refresh=32, rows=batch // 4``),
``fd_r32_rows4`` (the same with ``estimator="fd", reward="dot"``) and ``every4_r8``
(``every=4, reference_refresh=8``), all without the budget, and ``default`` (every default:
``GAR(budget=0.1)``; time it after its exact first phase with ``--warmup 24`` and runs of
``--steps 32``).

Each variant's model, optimizer and ``GAR`` are built once per (model, size) from the same
seed and warmed up (3 steps); then each of ``--repeats`` repeats times ``--steps`` steps of
every variant in turn (interleaved). The ratio to the plain loop is taken per repeat (the same
repeat's plain run) and reported as the median and the mean over repeats: with
``reference_refresh=k`` the reference forward and backward land in one repeat in k steps, so
the median shows the steps between refreshes and the mean the amortised cost (the total-time
ratio is in the JSON too). A variant that raises is recorded (exception type and message) and
left out of that (model, size). ``--memory`` runs each variant alone in a subprocess instead
(warm-up and ``--steps`` steps) and reports its peak resident memory (``ru_maxrss``; with
``--device cuda`` also ``torch.cuda.max_memory_allocated``) beside the plain loop's.
``--device cuda`` times with CUDA events and runs the loop's forward under bf16 autocast.
Figures go to ``benchmarks/results/lm_cost.json`` and the ratio against parameter count to
``lm_cost.png`` (``--memory``: ``lm_cost_memory.json``).

Sizes (d_model, layers, sequence length, batch; heads d // 64, at least 2): ``d64L2``
(64, 2, 128, 16), ``d128L4`` (128, 4, 128, 16), ``d256L4`` (256, 4, 128, 16) and ``d512L8``
(512, 8, 256, 8): 0.12-0.16M, 0.84-1.05M, 3.3-4.1M and 25-32M parameters. The default run
takes the first three (23 minutes here; ``d256L4`` alone 16, with sequences of 128 rather than
256 to fit). ``d512L8`` (a plain step 5-6 s on one CPU thread, GAR's every-step default
about 2.5x that) would take hours on this machine: name it with ``--sizes`` on a GPU.

    python benchmarks/lm_cost.py               # full run (23 minutes on 2 shared cores)
    python benchmarks/lm_cost.py --memory --sizes d64L2,d128L4   # peak memory (5 minutes)
    python benchmarks/lm_cost.py --device cuda --sizes 0,1,2,3   # on a GPU
    python benchmarks/lm_cost.py --quick       # smoke run (about 15 s), writes nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaptive_data as ad

from _common import header, paired, write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VOCAB = 256
WARMUP = 3  # steps before the timing (1 with --quick)
# Lines on the plot: the cost issue's target for the held-out mode (1.15x a plain step), 1.5x.
LINES = (1.15, 1.5)
# name -> (d_model, layers, sequence length, batch)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "d64L2": (64, 2, 128, 16),
    "d128L4": (128, 4, 128, 16),
    "d256L4": (256, 4, 128, 16),
    "d512L8": (512, 8, 256, 8),
}
DEFAULT_SIZES = "d64L2,d128L4,d256L4"


def variants(batch: int) -> dict[str, dict[str, Any] | None]:
    """variant -> GAR's keyword arguments besides the reference (None: the plain loop)."""
    return {
        "plain": None,
        "exact": {"budget": None},
        "dot": {"budget": None, "reward": "dot"},
        "r32_rows4": {"budget": None, "reference_refresh": 32, "rows": batch // 4},
        "fd_r32_rows4": {
            "budget": None,
            "estimator": "fd",
            "reward": "dot",
            "reference_refresh": 32,
            "rows": batch // 4,
        },
        "every4_r8": {"budget": None, "every": 4, "reference_refresh": 8},
        "default": {},
    }


class StockLM(nn.Module):
    """Token and position ``nn.Embedding`` (positions called on ``arange(T)``), a pre-norm
    ``nn.TransformerEncoder`` (torch's default dropout 0.1, MLP 4d), a Linear head; the causal
    mask a registered buffer sliced in each forward and passed with ``is_causal``."""

    def __init__(self, dim: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        return self.head(self.body(h, mask=self.mask[:t, :t], is_causal=True))


def build_model(kind: str, size: str) -> nn.Module:
    d, layers, seq, _ = SIZES[size]
    heads = max(2, d // 64)
    if kind == "stock":
        return StockLM(d, heads, layers, seq)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_positions=seq,
                n_embd=d,
                n_layer=layers,
                n_head=heads,
                bos_token_id=VOCAB - 1,  # GPT-2's 50256 is outside the byte vocabulary
                eos_token_id=VOCAB - 1,
            )
        )
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=d,
                intermediate_size=4 * d,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=seq,
            )
        )
    raise ValueError(f"unknown model {kind!r}: choose from stock, gpt2, llama")


MODELS = ("stock", "gpt2", "llama")


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy, ``[N, T, V], [N, T] -> [N]`` (a Hugging
    Face output's ``.logits``)."""
    logits = output.logits if hasattr(output, "logits") else output
    return nn.functional.cross_entropy(
        logits.float().transpose(1, 2), target, reduction="none"
    ).mean(1)


def token_set(n: int, seq: int, seed: int) -> TensorDataset:
    """``n`` random byte sequences: inputs and the next tokens."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return TensorDataset(t[:, :-1].contiguous(), t[:, 1:].contiguous())


class Timer:
    """Seconds of a block: ``perf_counter`` on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1000
        return time.perf_counter() - self._t


def make_loop(
    kind: str, size: str, options: dict[str, Any] | None, device: torch.device
) -> tuple[Callable[[int], float], Any, int]:
    """A closure that runs ``n`` training steps and returns the seconds per step, the ``GAR``
    (or None) and the model's parameter count."""
    _, _, seq, batch = SIZES[size]
    torch.manual_seed(0)
    model = build_model(kind, size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sources = {"a": token_set(8 * batch, seq, 1), "b": token_set(8 * batch, seq, 2)}
    sampler = ad.GARSampler(sources, batch_size=batch, seed=0, num_batches=10**9)
    loader = iter(sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler)))
    gar = None
    if options is not None:
        ref = ad.ReferenceBatches(token_set(8 * batch, seq, 3), batch, seed=1, device=device)
        gar = ad.GAR(model, sampler, optimizer=opt, reference=ref, loss_fn=lm_loss, **options)
    cuda = device.type == "cuda"
    timer = Timer(device)

    def steps(n: int) -> float:
        timer.start()
        for _ in range(n):
            x, y = next(loader)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = lm_loss(model(x), y).mean()
            loss.backward()
            if gar is not None:
                gar.step()
            opt.step()
        return timer.stop() / n

    return steps, gar, n_params


def library_state() -> dict[str, Any]:
    """The commit, whether ``adaptive_data/`` differs from it, and a digest of its sources (the
    library may be edited between runs: the digest says which code a run measured)."""
    digest = hashlib.sha256()
    for f in sorted((ROOT / "adaptive_data").rglob("*.py")):
        digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    diff = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "adaptive_data"], check=False)
    return {
        "commit": commit.stdout.strip() or None,
        "adaptive_data_modified": diff.returncode != 0,
        "adaptive_data_sha256": digest.hexdigest()[:16],
    }


def failure(e: BaseException) -> dict[str, str]:
    where = traceback.extract_tb(e.__traceback__)[-1]
    return {
        "type": type(e).__name__,
        "message": str(e),
        "where": f"{Path(where.filename).name}:{where.lineno}",
    }


def time_case(kind: str, size: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of one (model, size), interleaved: per-step times and paired ratios."""
    device = torch.device(args.device)
    opts = variants(SIZES[size][3])
    loops: dict[str, Callable[[int], float]] = {}
    gars: dict[str, Any] = {}
    errors: dict[str, dict[str, str]] = {}
    n_params = 0
    for v in args.variants:
        try:
            loop, gar, n_params = make_loop(kind, size, opts[v], device)
            loop(args.warmup)  # warm-up (and the first reference gradient)
        except Exception as e:
            errors[v] = failure(e)
            print(f"  {kind} {size} {v} raised {errors[v]['type']}: {errors[v]['message']}")
            if v == "plain":
                return {"params": n_params, "errors": errors, "variants": {}}
            continue
        loops[v], gars[v] = loop, gar
    times: dict[str, list[float]] = {v: [] for v in loops}
    for _ in range(args.repeats):
        for v in list(loops):
            try:
                times[v].append(loops[v](args.steps))
            except Exception as e:
                errors[v] = failure(e)
                print(f"  {kind} {size} {v} raised {errors[v]['type']}: {errors[v]['message']}")
                del loops[v], times[v]
                if v == "plain":
                    return {"params": n_params, "errors": errors, "variants": {}}
    out: dict[str, Any] = {}
    base = times["plain"]
    for v, t in times.items():
        s: dict[str, Any] = {
            "ms_per_step": {
                "median": 1000 * statistics.median(t),
                "mean": 1000 * statistics.fmean(t),
                "min": 1000 * min(t),
                "max": 1000 * max(t),
            }
        }
        if v != "plain":
            p = paired(t, base)
            p["mean"] = statistics.fmean(a / b for a, b in zip(t, base, strict=True))
            s["vs_plain_paired"] = p
            s["vs_plain_total"] = sum(t) / sum(base)
            s["gar_metrics"] = gars[v].metrics()
        out[v] = s
    for g in gars.values():
        if g is not None:
            g.close()
    return {"params": n_params, "errors": errors, "variants": out}


def print_table(results: dict[str, Any]) -> None:
    names = [v for v in results["variant_names"] if v != "plain"]
    print(
        "\n| model | size | params | plain ms/step | "
        + " | ".join(f"{v} x plain (median / mean)" for v in names)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(names))
    for kind, sizes in results["models"].items():
        for size, case in sizes.items():
            vs = case["variants"]
            cells = []
            for v in names:
                if v in vs:
                    p = vs[v]["vs_plain_paired"]
                    cells.append(f"{p['median']:.2f} / {p['mean']:.2f}")
                elif v in case["errors"]:
                    cells.append(f"raised {case['errors'][v]['type']}")
                else:
                    cells.append("")
            plain = f"{vs['plain']['ms_per_step']['median']:.1f}" if "plain" in vs else "raised"
            print(
                f"| {kind} | {size} | {case['params'] / 1e6:.2f}M | {plain} | "
                + " | ".join(cells)
                + " |"
            )


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    names = [v for v in results["variant_names"] if v != "plain"]
    colours = {v: f"C{i}" for i, v in enumerate(names)}
    styles = dict(zip(MODELS, ("-", "--", ":"), strict=True))
    markers = dict(zip(MODELS, ("o", "s", "^"), strict=True))
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    for kind, sizes in results["models"].items():
        for v in names:
            pts = sorted(
                (c["params"], c["variants"][v]["vs_plain_paired"]["median"])
                for c in sizes.values()
                if v in c["variants"]
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    color=colours[v],
                    ls=styles.get(kind, "-"),
                    marker=markers.get(kind, "o"),
                    label=f"{kind}, {v}",
                )
    for y in LINES:
        ax.axhline(y, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")  # ratios from about 1 to several
    low, high = ax.get_ylim()
    steps = (1, *LINES, 2, 3, 5, 10, 20, 50, 100)
    top = next((t for t in steps if t >= high), high)
    ax.set_yticks([t for t in steps if t <= top], [f"{t:g}" for t in steps if t <= top])
    ax.set_yticks([], minor=True)
    ax.set_ylim(min(low, 0.95), top * 1.05)
    left, right = ax.get_xlim()
    xt = [m * 10**e for e in range(4, 10) for m in (1, 2, 5) if left <= m * 10**e <= right]
    ax.set_xticks(xt, [f"{t / 1e6:g}M" for t in xt])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("time per step / plain loop's (paired median)")
    threads = results["machine"]["torch_threads"]
    ax.set_title(f"GAR's cost per step on causal LMs ({results['device']}, {threads} thread(s))")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def child(args: argparse.Namespace) -> None:
    """One variant alone (warm-up and ``--steps`` steps): its peak memory, as one JSON line."""
    device = torch.device(args.device)
    kind, size = args.models[0], args.sizes[0]
    out: dict[str, Any] = {"library": library_state()}
    try:
        loop, _, out["params"] = make_loop(kind, size, variants(SIZES[size][3])[args.child], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loop(args.warmup + args.steps)
    except Exception as e:
        out["error"] = failure(e)
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def memory(args: argparse.Namespace) -> None:
    """Each variant alone in a subprocess: peak memory and the ratio to the plain loop's."""
    results: dict[str, Any] = {
        **header(),
        "device": args.device,
        "steps": args.steps,
        "sizes": {s: size_info(s) for s in args.sizes},
        "library": library_state(),
        "models": {},
    }
    print(
        "\n| model | size | variant | peak RSS (MiB) | x plain |"
        + (" CUDA peak (MiB) | x plain |" if args.device == "cuda" else "")
    )
    print("|---|---|---|---|---|" + ("---|---|" if args.device == "cuda" else ""), flush=True)
    for kind in args.models:
        for size in args.sizes:
            peaks: dict[str, dict[str, Any]] = {}
            for v in args.variants:
                cmd = [sys.executable, __file__, "--models", kind, "--sizes", size, "--device"]
                cmd += [args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
                done = subprocess.run(
                    [*cmd, "--child", v], capture_output=True, text=True, check=False
                )
                try:
                    peaks[v] = json.loads(done.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    peaks[v] = {"error": {"type": "ChildFailed", "message": done.stderr[-2000:]}}
                e = peaks[v].get("error")
                if e is not None:
                    print(f"| {kind} | {size} | {v} | raised {e['type']}: {e['message']} | |")
                    continue
                peaks[v]["maxrss_mib"] = peaks[v].pop("maxrss_kib") / 1024
                row = f"| {kind} | {size} | {v} | {peaks[v]['maxrss_mib']:.0f} | "
                if "plain" in peaks and "error" not in peaks["plain"]:
                    peaks[v]["vs_plain"] = peaks[v]["maxrss_mib"] / peaks["plain"]["maxrss_mib"]
                    row += f"{peaks[v]['vs_plain']:.2f} |"
                    if "cuda_peak_mib" in peaks[v]:
                        peaks[v]["cuda_vs_plain"] = (
                            peaks[v]["cuda_peak_mib"] / peaks["plain"]["cuda_peak_mib"]
                        )
                        row += (
                            f" {peaks[v]['cuda_peak_mib']:.0f} | {peaks[v]['cuda_vs_plain']:.2f} |"
                        )
                print(row, flush=True)
            results["models"].setdefault(kind, {})[size] = peaks
    seen = {
        p["library"]["adaptive_data_sha256"]
        for c in results["models"].values()
        for ps in c.values()
        for p in ps.values()
        if "library" in p
    }
    if seen != {results["library"]["adaptive_data_sha256"]}:
        print(f"\nthe library changed during the run: the subprocesses saw {sorted(seen)}")
    if not args.quick:
        write(args.out or RESULTS / "lm_cost_memory.json", results)


def size_info(size: str) -> dict[str, int]:
    return dict(zip(("d", "layers", "seq", "batch"), SIZES[size], strict=True))


def pick_sizes(text: str) -> list[str]:
    names = list(SIZES)
    out = []
    for s in text.split(","):
        s = s.strip()
        if s.isdigit() and int(s) < len(names):
            out.append(names[int(s)])
        elif s in SIZES:
            out.append(s)
        else:
            sys.exit(f"unknown size {s!r}: choose names {names} or indices 0-{len(names) - 1}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="steps before the timing")
    parser.add_argument("--models", default=",".join(MODELS), help="stock,gpt2,llama")
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"names or indices of {', '.join(SIZES)}"
    )
    parser.add_argument(
        "--variants", default=None, help="comma-separated subset (plain always runs)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of each variant, each alone in a subprocess",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.warmup = 1
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        sys.exit(f"unknown --models {unknown}: choose from {', '.join(MODELS)}")
    args.sizes = pick_sizes(args.sizes)
    if args.quick:
        args.sizes = [min(args.sizes, key=lambda s: math.prod(SIZES[s]))]
        args.steps, args.repeats = 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.child is not None:
        child(args)
        return
    names = list(variants(1))
    if args.variants is not None:
        chosen = args.variants.split(",")
        bad = sorted(set(chosen) - set(names))
        if bad:
            sys.exit(f"unknown --variants {bad}: choose from {', '.join(names)}")
        names = [v for v in names if v == "plain" or v in chosen]
    args.variants = names
    if args.memory:
        memory(args)
        return
    results: dict[str, Any] = {
        **header(),
        "device": args.device,
        "autocast": "bf16" if args.device == "cuda" else None,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lines": list(LINES),
        "variant_names": names,
        "variants": {v: variants(16)[v] for v in names},
        "variants_note": "rows = batch // 4 (shown for batch 16)",
        "sizes": {s: size_info(s) for s in args.sizes},
        "models": {},
    }
    results["library"] = library_state()
    t0 = time.perf_counter()
    for kind in args.models:
        for size in args.sizes:
            print(f"{kind} {size} ...", flush=True)
            t = time.perf_counter()
            case = time_case(kind, size, args)
            case["wall_s"] = time.perf_counter() - t
            results["models"].setdefault(kind, {})[size] = case
    results["wall_s"] = time.perf_counter() - t0
    end = library_state()
    if end != results["library"]:  # a commit, or edited sources (the digest)
        results["library_at_end"] = end
        print(f"\nthe library's state changed during the run: {results['library']} -> {end}")
    print_table(results)
    print(f"\nwall time {results['wall_s']:.0f} s")
    if not args.quick:
        out = args.out or RESULTS / "lm_cost.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        results["plot"] = plot(results, out.with_suffix(".png"))
        write(out, results)


if __name__ == "__main__":
    main()
