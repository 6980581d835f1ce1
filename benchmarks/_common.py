"""What every benchmark records: the command that reproduces it and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def header() -> dict[str, Any]:
    """``{"command": ..., "machine": {...}}`` for the running script."""
    script = Path(sys.argv[0])
    return {
        "command": " ".join(["python", f"benchmarks/{script.name}", *sys.argv[1:]]),
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
            ratio = ""
            if "vs_plain_paired" in s:
                p = s["vs_plain_paired"]
                ratio = f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})"
            print(
                f"| {case}, {name} | {s['median']:,.0f} | {s['min']:,.0f} | "
                f"{s['max']:,.0f} | {ratio} |"
            )
