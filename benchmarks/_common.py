"""What every benchmark records: the command that reproduces it, the commit it ran at and the
machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def git_commit(where: Path | None = None) -> dict[str, Any] | None:
    """``{"hash": short hash of HEAD, "dirty": whether tracked files had uncommitted
    changes}`` of the git checkout holding ``where`` (default: these benchmarks); ``None``
    outside a checkout or without git."""
    where = Path(__file__).resolve().parent if where is None else where

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return None
    return {"hash": commit, "dirty": bool(changes)}


def header() -> dict[str, Any]:
    """``{"command": ..., "commit": {...} or None, "machine": {...}}`` for the running
    script (:func:`git_commit`)."""
    script = Path(sys.argv[0])
    return {
        "command": " ".join(["python", f"benchmarks/{script.name}", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
    }


def write(path: Path, results: dict[str, Any], indent: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent) + "\n")
    print(f"\nwrote {path}")


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of repeated timings."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def paired(values: list[float], base: list[float]) -> dict[str, float]:
    """:func:`stats` of the ratios of runs made in the same repeat (a spread for the ratio)."""
    return stats([a / b for a, b in zip(values, base, strict=True)])


def ratio_text(s: dict[str, Any]) -> str:
    """``median (min-max)`` of a case's ``vs_plain_paired`` ratio; empty for the baseline."""
    p = s.get("vs_plain_paired")
    return "" if p is None else f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})"


def summary(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, min, max and median over seeds."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "median": statistics.median(values),
    }


def print_rate_table(cases: dict[str, dict[str, Any]], what: str = "examples/s") -> None:
    """``| case, variant | median | min | max | paired ratio |`` rows of rate measurements."""
    print(f"\n| loader | {what} median | min | max | x plain (paired median, min-max) |")
    print("|---|---|---|---|---|")
    for case, variants in cases.items():
        for name, s in variants.items():
            print(
                f"| {case}, {name} | {s['median']:,.0f} | {s['min']:,.0f} | "
                f"{s['max']:,.0f} | {ratio_text(s)} |"
            )


def expect_fixed_arms() -> None:
    """Silence the sampler's warning that nothing rewards its batches: a benchmark's fixed
    arms (uniform, proportional, a reference model's run) draw through the same tracked loader
    as its GAR arms, for the same loading cost, and never call ``update()`` by design."""
    warnings.filterwarnings(
        "ignore", message=r"GARSampler delivered \d+ batches .* none of them was rewarded"
    )
