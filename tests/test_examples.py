"""The examples users copy from run end to end in their --quick mode."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_datasetdict_mixture_quick():
    done = _run("examples/datasetdict_mixture.py", "--quick")
    assert done.returncode == 0, done.stderr
    assert "epoch 2: weights curated" in done.stdout
    assert "validation accuracy" in done.stdout


def test_transformers_mixture_quick_and_resume(tmp_path):
    import transformers  # noqa: F401 (the test needs it installed)

    done = _run("examples/transformers_mixture.py", "--quick", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "step 30: loss" in done.stdout
    assert "test accuracy" in done.stdout
    resumed = _run(
        "examples/transformers_mixture.py",
        "--steps",
        "40",
        "--resume",
        "--output-dir",
        str(tmp_path),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "step 40: loss" in resumed.stdout


def test_lightning_mixture_quick(tmp_path):
    import lightning  # noqa: F401 (the test needs it installed)

    done = _run("examples/lightning_mixture.py", "--quick", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "epoch 1 (step 22): weights curated" in done.stdout
    assert "test accuracy" in done.stdout


def test_cifar10_augment_quick():
    if not (DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 not found in {DATA}")
    done = _run("examples/cifar10_augment.py", "--data", str(DATA), "--quick")
    assert done.returncode == 0, done.stderr
    assert "epoch 1: train loss" in done.stdout


def test_cifar10_augment_says_what_to_pass_without_data(tmp_path):
    done = _run("examples/cifar10_augment.py", "--data", str(tmp_path), "--quick")
    assert done.returncode != 0
    assert f"CIFAR-10 not found: no {tmp_path / 'cifar10-jpeg.tar.gz'} (--data)" in done.stderr
    assert "ADAPTIVE_DATA_DIR" in done.stderr
    assert "--torchvision-root" in done.stderr


def _cifar10_example():
    spec = importlib.util.spec_from_file_location(
        "cifar10_augment", EXAMPLES / "cifar10_augment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar10_augment_finds_its_data_from_any_working_directory(tmp_path, monkeypatch):
    """--data, then $ADAPTIVE_DATA_DIR, then data/ in the clone or ../shared/data beside it:
    all resolved from the script's own location, never from the working directory."""
    example = _cifar10_example()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "cifar10-jpeg.tar.gz").write_bytes(b"")
    assert example.find_data(tmp_path / "given") == tmp_path / "given" / "cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ADAPTIVE_DATA_DIR", str(tmp_path / "given"))
    assert example.find_data(None) == tmp_path / "given" / "cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ADAPTIVE_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=r"no .*cifar10-jpeg.tar.gz \(\$ADAPTIVE_DATA_DIR\)"):
        example.find_data(None)
    monkeypatch.delenv("ADAPTIVE_DATA_DIR")
    fake_clone = tmp_path / "clone"
    monkeypatch.setattr(example, "CLONE", fake_clone)
    with pytest.raises(SystemExit, match=r"\(inside the clone\); .*\(beside the clone\)"):
        example.find_data(None)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz").write_bytes(b"")
    assert example.find_data(None) == tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz"


def test_cifar10_augment_takes_the_first_images_of_each_class():
    example = _cifar10_example()
    targets = [0, 1, 0, 2, 0, 1, 9]
    assert example.first_per_class(targets, 2) == [0, 1, 2, 3, 5, 6]


def test_probe_digits_rewards_clean_digits_and_penalises_mislabelled_ones():
    done = _run("examples/probe_digits.py", "--steps", "30")
    assert done.returncode == 0, done.stderr
    found = re.search(r"mean reward over the run: clean (\S+), mislabelled (\S+) ", done.stdout)
    assert found, done.stdout
    clean, mislabelled = float(found[1]), float(found[2])
    assert clean > 0 > mislabelled, done.stdout


def test_ddp_mixture_under_torchrun():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port, chosen by the rendezvous
            "--nproc_per_node",
            "2",
            "examples/ddp_mixture.py",
            "--quick",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "2 ranks hold identical weights: True" in done.stdout, done.stderr
    if done.returncode != 0:
        # torch 2.14's gloo sometimes aborts while the interpreter tears down, after the run
        # has finished (a minimal DDP script without adaptive_data does the same, about 1 run
        # in 10); anything else is a failure.
        assert "terminate called without an active exception" in done.stderr, done.stderr


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        # torch 2.14's gloo sometimes aborts in the interpreter's teardown (as above); the
        # callers check that the run finished first.
        assert "terminate called without an active exception" in done.stderr, done.stderr
    return done


def test_fsdp_mixture_under_torchrun_resumes_exactly(tmp_path):
    """The FSDP2 example learns away from the random labels with identical weights on both
    ranks, and a run resumed from its step-40 checkpoint (DCP and per-rank files) ends as the
    uninterrupted run did."""
    ckpt = str(tmp_path / "ckpt")
    whole = _torchrun(
        "examples/fsdp_mixture.py", "--quick", "--checkpoint", ckpt, "--save-every", "20"
    )
    assert "2 ranks hold identical weights: True" in whole.stdout, whole.stderr
    final = re.search(r"final weights: clean (\S+), half_random (\S+), random (\S+)", whole.stdout)
    assert final, whole.stdout
    assert float(final[1]) > 0.5 > float(final[3]), whole.stdout
    (tmp_path / "ckpt" / "step-60" / "done").unlink()  # resume from step 40's save
    resumed = _torchrun("examples/fsdp_mixture.py", "--quick", "--checkpoint", ckpt, "--resume")
    assert "resumed at step 40" in resumed.stdout, resumed.stderr
    tail = whole.stdout[whole.stdout.index("step 60: weights") :]
    assert tail in resumed.stdout, (whole.stdout, resumed.stdout)
