"""A process killed with SIGKILL at a drawn step and resumed from its last checkpoint (model,
optimizer, sampler, GAR, and the loader's state with a StatefulDataLoader) continues as an
uninterrupted run: the same batches, the same examples, the same weights at every step, and
the same parameters at the end (tests/crash_worker.py is the run)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # 2.4 epochs of 10 batches; checkpoints every 5 steps


def run(out: Path, *options: str) -> int:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash_worker.py"), "--out", str(out), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def steps(out: Path) -> dict[int, dict]:
    """Each step's last logged line (a resumed run logs the steps after its checkpoint
    again)."""
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {entry["step"]: entry for entry in lines}


def check_crash_and_resume(tmp: Path, loader: str, workers: int, resume_workers: int, kill_at: int):
    common = ("--steps", str(STEPS), "--loader", loader)
    run(tmp / "whole", *common, "--workers", str(workers))
    crashed = tmp / "crashed"
    code = run(crashed, *common, "--workers", str(workers), "--kill-at", str(kill_at))
    assert code == -signal.SIGKILL
    assert not (crashed / "params.pt").exists()
    assert run(crashed, *common, "--workers", str(resume_workers)) == 0
    whole, resumed = steps(tmp / "whole"), steps(crashed)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step] == whole[step], step
    a = torch.load(tmp / "whole" / "params.pt")
    b = torch.load(crashed / "params.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_killed_at_a_drawn_step_resumes_exactly(tmp_path):
    """The quick case: a DataLoader without workers, killed at a step drawn from a fixed seed
    (between two checkpoints, mid-epoch)."""
    kill_at = random.Random(0).randrange(5, STEPS - 1)
    check_crash_and_resume(tmp_path, "DataLoader", 0, 0, kill_at)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["DataLoader", "StatefulDataLoader"])
@pytest.mark.parametrize(("workers", "resume_workers"), [(0, 0), (2, 2), (2, 0)])
@pytest.mark.parametrize("kill_at", [3, 9, 10, 19])
def test_crash_and_resume_across_loaders_and_workers(
    tmp_path, loader, workers, resume_workers, kill_at
):
    """Mid-epoch and at an epoch's end (step 9 is the last batch of the first epoch), with
    and without workers, resumed with fewer workers; a StatefulDataLoader's state is saved
    and loaded with the sampler's."""
    if loader == "StatefulDataLoader" and workers != resume_workers:
        pytest.skip("torchdata refuses a loader state saved with another num_workers")
    check_crash_and_resume(tmp_path, loader, workers, resume_workers, kill_at)
