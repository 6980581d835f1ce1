"""The benchmark scripts run end to end in their --quick mode (no figures are written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_probe_cost_quick() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/probe_cost.py", "--quick", "--methods", "ghost,jvp,head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| resnet_bn | ghost |" in done.stdout
