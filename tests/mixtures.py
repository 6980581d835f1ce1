"""Checks shared by the integration tests of the mixture."""

from __future__ import annotations

import pytest

import adaptive_data as ad


def assert_fd_follows_exact(fd: ad.GARSampler, exact: ad.GARSampler, gar_fd: ad.GAR) -> None:
    """A run rewarded by ``GAR(estimator="fd", rows=4)`` moved its mixture as the run rewarded
    by the exact dot rewards of the same rows did: the same batches, update for update, and
    both learnt the clean source (12 steps of 2 micro-batches)."""
    assert gar_fd.estimator == "fd"
    assert gar_fd.rows == 4
    assert [h["batch"] for h in fd.history] == [h["batch"] for h in exact.history]
    assert len(fd.history) == 25  # 12 steps x 2 micro-batches, and the initial weights
    assert fd.weights["clean"] > 0.9, fd.weights
    for a, b in zip(fd.history[1:], exact.history[1:], strict=True):
        assert a["weights"]["clean"] == pytest.approx(b["weights"]["clean"], abs=1e-3)
