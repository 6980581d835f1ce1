"""GAR's state: its counters, its keys, what a loaded state must agree with, and where each
part's state lives (the schedule's counters, the direction source's reference gradient).

The format is the one GAR has saved since version 1 (a state saved before ``estimator=``
existed has no ``estimator`` key and was saved by the ghost estimator).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from ..probe._direction import DirectionSource
from ..probe._keepers import SlowCalls
from ._schedule import Schedule

__all__: list[str] = []

VERSION = 1
KEYS: tuple[str, ...] = (
    *("mode", "every", "reward", "steps", "augmented", "last_augmented", "rewarded"),
    *("dropped", "skipped_nonfinite", "last_mean", "reference", "reference_refresh"),
    *("reference_gradient", "reference_step", "rows"),
)
ESTIMATOR_KEY = "estimator"  # absent from states saved before estimator= existed
CLOCK_KEY = "seconds"  # (in step(), of the loop) and the generic calls; absent before them
BUDGET_KEY = "budget"  # absent from states saved before budget= existed (saved without one)


@dataclasses.dataclass
class Counters:
    """What GAR's steps did (``metrics()``): batches rewarded, batches kept but never rewarded
    (no backward, a step skipped for a non-finite ``.grad``, stale, or dropped by ``close()``),
    steps skipped, and the mean reward of the last rewarded batch."""

    rewarded: int = 0
    dropped: int = 0
    skipped_nonfinite: int = 0
    last_mean: float = math.nan
    generic_calls: int = 0  # module calls rewarded by the generic path


@dataclasses.dataclass
class Clock:
    """Wall time of ``gar.step()`` against the loop's, since the first step began (for
    ``metrics()`` and messages only: nothing GAR decides depends on it). A resumed run
    carries the seconds counted before its checkpoint (``saved``: in ``step()``, in all)."""

    first: float | None = None
    in_step: float = 0.0
    last: float = 0.0
    saved: tuple[float, float] = (0.0, 0.0)

    def add(self, start: float, end: float) -> None:
        """One ``step()`` from ``start`` to ``end`` (``time.perf_counter()``)."""
        if self.first is None:
            self.first = start
        self.in_step += end - start
        self.last = end

    def seconds(self) -> tuple[float, float]:
        """``(seconds in step(), seconds of the loop)``, the checkpoint's included."""
        span = 0.0 if self.first is None else self.last - self.first
        return self.saved[0] + self.in_step, self.saved[1] + span

    def share(self) -> float:
        """The share of the loop's wall time spent in ``step()`` (NaN before a step)."""
        in_step, span = self.seconds()
        return in_step / span if span > 0 else math.nan


def report_generic(
    slow: Mapping[str, SlowCalls], reported: set[str], fallback: str, seconds: float
) -> None:
    """Say once per module (``reported``: the ones already said) that its share took the
    generic path and what it cost at this step (``seconds`` so far in ``step()``); with
    ``fallback="raise"``, refuse it instead."""
    for name, calls in slow.items():
        if name in reported:
            continue
        reported.add(name)
        what = f"GAR rewards module {name!r} ({calls.kind}) by its generic path ({calls.why})"
        if fallback == "raise":
            raise RuntimeError(
                f"{what}, which fallback='raise' refuses; register a rule for it "
                "(adaptive_data.register_ghost_rule) or pass fallback='jvp'"
            )
        warnings.warn(
            f"{what}: its forward again and, for the cosine, one backward per example. At "
            f"this step it took {1e3 * calls.seconds:.1f} ms of gar.step()'s "
            f"{1e3 * seconds:.1f} ms; gar.timing()['time_share'] follows gar.step()'s share "
            "of the loop's time. Register a rule for its type (adaptive_data.register_ghost_rule), "
            "or pass fallback='raise' to refuse it",
            UserWarning,
            stacklevel=5,
        )


class Parts(NamedTuple):
    """What a GAR's state is made of: the settings it must be loaded with, and its parts."""

    settings: Mapping[str, Any]
    schedule: Schedule
    counters: Counters
    clock: Clock
    source: DirectionSource
    reference: Iterator[Any] | None


def save(parts: Parts) -> dict[str, Any]:
    """A GAR's ``state_dict()`` from its settings and parts."""
    settings, schedule, counters, clock, source, reference = parts
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
        BUDGET_KEY: settings[BUDGET_KEY],
        CLOCK_KEY: [*clock.seconds(), float(counters.generic_calls)],
    }


_ABSENT = {ESTIMATOR_KEY: "ghost", BUDGET_KEY: None}  # what a state without the key had


def load(state: Mapping[str, Any], parts: Parts) -> None:
    """Check ``state`` against the settings and parts (raising, naming the key), then apply
    it to them."""
    settings, schedule, counters, clock, source, reference = parts
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
    keys = ("mode", BUDGET_KEY, "every", "reward", "reference_refresh", "rows", ESTIMATOR_KEY)
    for key in keys:
        theirs = state.get(key, _ABSENT.get(key))
        if theirs != settings[key]:
            old = (
                " (a state saved before budget= existed, by an exact GAR: pass budget=None)"
                if key == BUDGET_KEY and BUDGET_KEY not in state
                else ""
            )
            raise ValueError(
                f"state has {key}={theirs!r}, but this GAR has {key}={settings[key]!r}{old}"
            )
    ref_grad = source.check_state(state["reference_gradient"])  # checked first
    if state.get("budget_state") is not None:  # absent from states saved before budget=
        schedule.budget.check_state(state["budget_state"])
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
    in_step, span, generic = state.get(CLOCK_KEY, (0.0, 0.0, 0.0))
    clock.first, clock.in_step, clock.last = None, 0.0, 0.0
    clock.saved = (float(in_step), float(span))
    counters.generic_calls = int(generic)
    source.load(ref_grad, int(state["reference_step"]))
