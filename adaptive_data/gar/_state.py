"""GAR's state: its counters, its keys, what a loaded state must agree with, and where each
part's state lives (the schedule's counters, the direction source's reference gradient).

The format is the one GAR has saved since version 1 (a state saved before ``estimator=``
existed has no ``estimator`` key and was saved by the ghost estimator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from ..probe._direction import DirectionSource
from ._schedule import Schedule

__all__: list[str] = []

VERSION = 1
KEYS: tuple[str, ...] = (
    *("mode", "every", "reward", "steps", "augmented", "last_augmented", "rewarded"),
    *("dropped", "skipped_nonfinite", "last_mean", "reference", "reference_refresh"),
    *("reference_gradient", "reference_step", "rows"),
)
ESTIMATOR_KEY = "estimator"  # absent from states saved before estimator= existed


@dataclasses.dataclass
class Counters:
    """What GAR's steps did (``metrics()``): batches rewarded, batches kept but never rewarded
    (no backward, a step skipped for a non-finite ``.grad``, stale, or dropped by ``close()``),
    steps skipped, and the mean reward of the last rewarded batch."""

    rewarded: int = 0
    dropped: int = 0
    skipped_nonfinite: int = 0
    last_mean: float = math.nan


def save(
    settings: Mapping[str, Any],
    schedule: Schedule,
    counters: Counters,
    source: DirectionSource,
    reference: Iterator[Any] | None,
) -> dict[str, Any]:
    """A GAR's ``state_dict()`` from its settings and parts."""
    ref_state = (
        reference.state_dict()
        if reference is not None and hasattr(reference, "state_dict")
        else None
    )
    return {
        "version": VERSION,
        **{k: settings[k] for k in ("mode", "every", "reward")},
        **schedule.state_dict(),
        "rewarded": counters.rewarded,
        "dropped": counters.dropped + len(schedule.pending),
        "skipped_nonfinite": counters.skipped_nonfinite,
        "last_mean": counters.last_mean,
        "reference": ref_state,
        "reference_refresh": settings["reference_refresh"],
        **source.state_dict(),
        "rows": settings["rows"],
        ESTIMATOR_KEY: settings[ESTIMATOR_KEY],
    }


def load(
    state: Mapping[str, Any],
    settings: Mapping[str, Any],
    schedule: Schedule,
    counters: Counters,
    source: DirectionSource,
    reference: Iterator[Any] | None,
) -> None:
    """Check ``state`` against the settings and parts (raising, naming the key), then apply
    it to them."""
    if not isinstance(state, Mapping) or state.get("version") != VERSION:
        raise ValueError(
            f"state should be a GAR.state_dict() of version {VERSION}, but got "
            + (
                f"version={state.get('version')!r}"
                if isinstance(state, Mapping)
                else type(state).__name__
            )
        )
    missing = sorted(set(KEYS) - set(state))
    if missing:
        raise ValueError(f"GAR state is missing the key(s) {missing}")
    for key in ("mode", "every", "reward", "reference_refresh", "rows", ESTIMATOR_KEY):
        theirs = state.get(key, "ghost") if key == ESTIMATOR_KEY else state[key]
        if theirs != settings[key]:
            raise ValueError(
                f"state has {key}={theirs!r}, but this GAR has {key}={settings[key]!r}"
            )
    ref_grad = source.check_state(state["reference_gradient"])  # checked first
    if state["reference"] is not None and reference is not None:
        if not hasattr(reference, "load_state_dict"):
            raise ValueError(
                "state holds the reference stream's position, but this GAR's reference "
                f"iterator ({type(reference).__name__}) has no load_state_dict()"
            )
        reference.load_state_dict(state["reference"])
    schedule.load_state_dict(dict(state))
    counters.rewarded = int(state["rewarded"])
    counters.dropped = int(state["dropped"])
    counters.skipped_nonfinite = int(state["skipped_nonfinite"])
    counters.last_mean = float(state["last_mean"])
    source.load(ref_grad, int(state["reference_step"]))
