"""The header every benchmark result starts with: the command, the commit it ran at (short
hash, and whether tracked files had uncommitted changes) and the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    from _common import git_commit, header
finally:
    sys.path.pop(0)


def _git(where: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=where,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_the_header_records_this_checkouts_commit() -> None:
    try:
        want = _git(ROOT, "rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the tests run outside a git checkout")
    got = header()
    assert got["commit"]["hash"] == want
    assert isinstance(got["commit"]["dirty"], bool)
    assert set(got) == {"command", "commit", "machine"}


def test_the_commit_says_whether_tracked_files_changed(tmp_path: Path) -> None:
    try:
        _git(tmp_path, "init", "-q")
    except OSError:
        pytest.skip("git is not installed")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = git_commit(tmp_path)
    assert clean == {"hash": _git(tmp_path, "rev-parse", "--short", "HEAD"), "dirty": False}
    (tmp_path / "results.json").write_text("{}\n")  # an untracked result: not a change
    assert git_commit(tmp_path) == clean
    (tmp_path / "a.txt").write_text("two\n")
    assert git_commit(tmp_path) == {**clean, "dirty": True}


def test_the_commit_is_none_outside_a_checkout_or_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on the path
    assert git_commit(ROOT) is None
