"""The benchmark scripts run end to end in their --quick mode (no figures are written)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_data as ad

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# Scripts that need no data: (script and arguments, a line their --quick output must hold).
NO_DATA = {
    "probe_cost": (["--methods", "ghost,jvp,head"], "| resnet_bn | ghost |"),
    "loader_cost": ([], "num_workers=2, GARSampler"),
    "augment_cost": ([], "num_workers=2, GARSampler+GARTransform"),
    "gar_cost": ([], "| resnet_bn | gar_every4 |"),
    "dist_cost": (["--what", "sampler"], "weights identical on both ranks: True"),
    "reference_choice": ([], "| next_batch | "),
    "short_horizon": ([], "| 8 | r32_rows4 | "),
    "lm_cost": ([], "| llama | d64L2 |"),
}


@pytest.mark.parametrize("script", list(NO_DATA))
def test_quick_run(script: str) -> None:
    args, expected = NO_DATA[script]
    done = _run(f"benchmarks/{script}.py", "--quick", *args)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_dist_cost_quick_times_gar_on_fsdp2() -> None:
    """The FSDP2 section (two gloo processes, a sharded byte-level LM): the plain step, GAR's
    budget after its exact phase and GAR with every batch, each rank ending with the same
    weights."""
    done = _run("benchmarks/dist_cost.py", "--quick", "--what", "fsdp")
    assert done.returncode == 0, done.stderr
    for arm in ("plain", "budget", "exact"):
        assert f"| {arm} | " in done.stdout
    assert "FSDP2: weights identical on both ranks: True" in done.stdout


def test_gar_cost_profile_reports_where_the_time_goes() -> None:
    done = _run(
        "benchmarks/gar_cost.py",
        "--quick",
        "--mode",
        "heldout",
        "--models",
        "mlp",
        "--variants",
        "heldout_r8_rows32",
        "--profile",
    )
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("mlp heldout_r8_rows32:"))
    assert "rewards of the kept rows" in line
    assert "capture hooks of the covered layers" in line


def test_gar_cost_quick_in_the_held_out_mode() -> None:
    done = _run("benchmarks/gar_cost.py", "--quick", "--mode", "heldout", "--models", "mlp")
    assert done.returncode == 0, done.stderr
    for variant in ("heldout", "heldout_r8", "heldout_r8_rows32", "heldout_every4_r8"):
        assert f"| mlp | {variant} |" in done.stdout


def test_mixture_quality_quick() -> None:
    data = ROOT.parent / "shared" / "data" / "fashion-mnist"
    if not data.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {data}")
    done = _run("benchmarks/mixture_quality.py", "--quick")
    assert done.returncode == 0, done.stderr
    assert "| oracle |" in done.stdout


def test_mixture_quality_says_what_to_pass_without_data(tmp_path: Path) -> None:
    done = _run("benchmarks/mixture_quality.py", str(tmp_path), "--quick")
    assert done.returncode != 0
    assert "Fashion-MNIST not found" in done.stderr


def test_lm_mixture_quick() -> None:
    data = ROOT.parent / "shared" / "data" / "text"
    if not data.is_dir():
        pytest.skip(f"text domains not found at {data}")
    done = _run("benchmarks/lm_mixture.py", "--quick")
    assert done.returncode == 0, done.stderr
    for arm in ("uniform", "odm_exp3", "doremi", "doge", "gar", "gar_every4"):
        assert f"| {arm} | " in done.stdout


def test_reference_staleness_quick() -> None:
    if not (ROOT.parent / "shared" / "data" / "fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not found beside the repository")
    done = _run("benchmarks/reference_staleness.py", "--quick")
    assert done.returncode == 0, done.stderr
    for row in ("| another fresh batch |", "| 1 steps old |", "| 3 steps old |"):
        assert row in done.stdout


def test_lm_mixture_says_what_to_pass_without_data(tmp_path: Path) -> None:
    done = _run("benchmarks/lm_mixture.py", str(tmp_path), "--quick")
    assert done.returncode != 0
    assert "text domains not found" in done.stderr


def test_lm_mixture_quick_reads_sharded_streams_through_a_worker() -> None:
    data = ROOT.parent / "shared" / "data" / "text"
    if not data.is_dir():
        pytest.skip(f"text domains not found at {data}")
    done = _run(
        "benchmarks/lm_mixture.py",
        "--quick",
        "--stream",
        "--workers",
        "1",
        "--methods",
        "uniform,proportional,gar",
    )
    assert done.returncode == 0, done.stderr
    for arm in ("uniform", "proportional", "gar"):
        assert f"| {arm} | " in done.stdout
    # proportional draws from the sizes given (a stream has no len()): random_bytes is largest
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("proportional "))
    weights = dict(kv.split("=") for kv in line.split(None, 1)[1].split(", "))
    assert max(weights, key=lambda n: float(weights[n])) == "random_bytes"


@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoded-array cache of its own (a fresh machine has none), shared by the CIFAR runs."""
    if not (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 not found in {ROOT.parent / 'shared' / 'data'}")
    return tmp_path_factory.mktemp("cifar_cache")


def test_augment_quality_quick(cifar_cache: Path) -> None:
    done = _run("benchmarks/augment_quality.py", "--quick", "--cache", str(cifar_cache))
    assert done.returncode == 0, done.stderr
    assert "| 1 | gar_clean_ref |" in done.stdout
    # the equal-compute column: the fastest arm's whole run is its own value, and an arm not
    # evaluated by then (no --eval-every) says n/a instead of a number it never reached
    rows = [ln.split("|") for ln in done.stdout.splitlines() if ln.startswith("| 1 | ")]
    same = [r[8].strip() for r in rows]
    assert "accuracy at the fastest arm's wall time" in done.stdout
    assert sum(v != "n/a" for v in same) >= 1
    for r in rows:
        if r[8].strip() != "n/a":
            assert r[8].strip().startswith(r[3].strip())  # the mean of its final accuracy


def test_augment_quality_says_what_to_pass_without_data(tmp_path: Path) -> None:
    done = _run("benchmarks/augment_quality.py", str(tmp_path), "--quick", "--cache", str(tmp_path))
    assert done.returncode != 0
    assert "CIFAR-10 not found" in done.stderr


@pytest.mark.parametrize("reference", ["train", "heldout"])
def test_augment_signal_quick(cifar_cache: Path, reference: str) -> None:
    done = _run(
        "benchmarks/augment_signal.py",
        "--quick",
        "--cache",
        str(cifar_cache),
        "--reference",
        reference,
    )
    assert done.returncode == 0, done.stderr
    assert "examples per op to see the best" in done.stdout


def test_augment_signal_compares_committed_runs() -> None:
    """--compare reads result files (no data needed): one column per file, Identity's row 0."""
    results = ROOT / "benchmarks" / "results"
    files = [results / "augment_signal_bin3.json", results / "augment_signal_bin27.json"]
    done = _run("benchmarks/augment_signal.py", "--compare", *map(str, files))
    assert done.returncode == 0, done.stderr
    assert "| op | cosine bin 3 ref train | cosine bin 27 ref train |" in done.stdout
    # One table per checkpoint; Identity minus itself is 0 against every reference batch.
    assert done.stdout.count("| Identity | +0.0000 ± 0.0000 | +0.0000 ± 0.0000 |") == 3


def test_augment_gpu_runs_in_pieces_that_resume_into_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU study's command on CPU in its --quick setting (random stand-in images: this
    checks the mechanics, not a result): stopped after every epoch and called again, it ends
    with the results of one uninterrupted call, bit for bit."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import augment_gpu

    g = np.random.default_rng(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    arrays = {}
    for split, n in (("train", 300), ("test", 100)):
        arrays[f"x_{split}"] = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        arrays[f"y_{split}"] = np.arange(n) % 10
        arrays[f"i_{split}"] = np.arange(n) // 10
    np.savez(cache / "cifar10-jpeg.npz", **arrays)
    common = [str(tmp_path / "no_data"), "--quick", "--cache", str(cache)]
    common += ["--arms", "gar,trivial_augment", "--test-every", "2"]

    threads = torch.get_num_threads()  # --quick runs on one thread
    try:
        assert augment_gpu.main([*common, "--out", str(tmp_path / "whole")]) == 0
        pieces = [*common, "--out", str(tmp_path / "pieces"), "--epochs-per-call", "1"]
        codes = [augment_gpu.main(pieces) for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert codes == [augment_gpu.MORE_TO_DO] * 3 + [0]  # 2 runs of 2 epochs, one per call

    def read(name: str) -> dict:
        runs = json.loads((tmp_path / name / "results.json").read_text())["runs"]
        for r in runs.values():
            r.pop("wall_s")
            r.pop("probe_s")
        return runs

    whole, pieces = read("whole"), read("pieces")
    assert set(whole) == {"gar/seed0", "trivial_augment/seed0"}
    assert pieces == whole
    assert len(whole["gar/seed0"]["train_loss"]) == 2
    assert whole["gar/seed0"]["op_weights"] != ad.GARTransform().policy.op_weights  # it learned


def test_augment_gpu_reads_cifar100_from_torchvisions_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dataset cifar100 reads torchvision's cifar-100-python pickles (a small stand-in here)
    and trains a 100-class model; a folder without them exits naming what is missing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import augment_gpu

    g = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", 400), ("test", 100)):
        d = {
            b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": (np.arange(n) % 100).tolist(),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f)
    arrays = augment_gpu.load_cifar100(tmp_path / "data")
    assert arrays["x_train"].shape == (400, 32, 32, 3)
    assert arrays["i_train"].tolist()[:101] == [0] * 100 + [1]  # index within its class
    out = tmp_path / "runs"
    threads = torch.get_num_threads()
    try:
        argv = [str(tmp_path / "data"), "--quick", "--dataset", "cifar100"]
        assert augment_gpu.main([*argv, "--arms", "trivial_augment", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "cifar100"
    assert "trivial_augment/seed0" in results["runs"]
    with pytest.raises(SystemExit, match=r"CIFAR-100 not found: .* lacks train, test"):
        augment_gpu.load_cifar100(tmp_path / "nothing")


def test_augment_study_quick_on_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arm of the augmentation study runs on the embedded digits (no data files)."""
    import sklearn  # noqa: F401 (the test needs it installed)

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import augment_study

    assert len(augment_study.ARMS) == 10
    done = _run("benchmarks/augment_study.py", "--quick", "--datasets", "digits")
    assert done.returncode == 0, done.stderr
    for arm in augment_study.ARMS:
        assert f"| digits | {arm} |" in done.stdout
    assert "| gar_baseline | " in done.stdout  # the decision table


def test_augment_study_runs_its_one_line_gar_arms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arms that learn through GAR (not in the default set) run on digits."""
    import sklearn  # noqa: F401 (the test needs it installed)

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import augment_study

    arms = ["frozen", *augment_study.LINE_ARMS]
    done = _run(
        "benchmarks/augment_study.py", "--quick", "--datasets", "digits", "--arms", ",".join(arms)
    )
    assert done.returncode == 0, done.stderr
    for arm in arms:
        assert f"| digits | {arm} |" in done.stdout


def test_augment_study_says_what_to_pass_without_data(tmp_path: Path) -> None:
    done = _run(
        "benchmarks/augment_study.py", "--quick", "--datasets", "fmnist", "--data", str(tmp_path)
    )
    assert done.returncode != 0
    assert "Fashion-MNIST not found" in done.stderr
