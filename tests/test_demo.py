"""The demo (`adaptive-data demo`): its options, its output files and the claims it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_data._cli import main, parser


def test_help_documents_every_option():
    demo = parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    text = demo.format_help()
    for action in demo._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


def test_quick_demo_writes_its_files(tmp_path: Path, capsys):
    main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "| clean |" in out
    assert "| GAR |" in out
    assert "| uniform |" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["gar"]["weights"]) == {"clean", "random_labels", "pixel_noise"}
    assert abs(sum(summary["gar"]["weights"].values()) - 1) < 1e-9
    assert summary["uniform"]["weights"]["clean"] == pytest.approx(1 / 3)
    assert (tmp_path / "weights.png").stat().st_size > 1000


def test_the_default_demo_learns_what_the_readme_says(tmp_path: Path):
    """The default run, as a user types it: GAR drops the randomly labelled source and beats
    the uniform mixture on the clean test digits."""
    done = subprocess.run(
        [sys.executable, "-m", "adaptive_data", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr  # the progress bar
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gar"]["weights"]["random_labels"] < 0.05
    assert summary["gar"]["weights"]["clean"] > 0.5
    assert summary["gar"]["accuracy"] > summary["uniform"]["accuracy"] + 2


def test_bad_options_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match=r"--epochs and --batch-size should be >= 1, got 0"):
        main(["demo", "--epochs", "0", "--out", "unused"])
