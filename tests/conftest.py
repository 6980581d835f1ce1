"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# The suite draws the same examples at every run (a failure in CI is reproducible, never a
# new draw); HYPOTHESIS_PROFILE=explore draws new ones, and more, to look for new failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_source_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    """GAR over one source without a learning augmentation policy has nothing to learn, so
    it computes no rewards (tests/test_loop_patterns.py checks that). The modules that use
    such a GAR as a harness for its rewards (against oracles, across loaders, precisions and
    optimizers) turn that rule off: the rewards are computed as for a source that learns."""
    from adaptive_data.gar import _gar

    monkeypatch.setattr(_gar, "_nothing_to_learn", lambda sampler: "")
