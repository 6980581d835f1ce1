"""What every benchmark records: the command that reproduces it and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
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
