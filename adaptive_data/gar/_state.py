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
from ._budget import DEFAULT_BUDGET, NEXT_BATCH_BUDGET
from ._schedule import Schedule
from ._watch import REASONS

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
DROPPED_BY_KEY = "dropped_by"  # absent from states saved before the reasons were counted


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
    # The dropped batches by reason (the keys of _watch.REASONS); states saved before the
    # reasons were counted hold their drops in none of them.
    dropped_by: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(REASONS, 0)
    )

    def drop(self, reason: str, count: int = 1) -> None:
        """``count`` kept batches brought no reward, for ``reason``."""
        self.dropped += count
        self.dropped_by[reason] += count


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
        DROPPED_BY_KEY: {
            **counters.dropped_by,
            "closed": counters.dropped_by["closed"] + len(schedule.pending),
        },
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


def load(state: Mapping[str, Any], parts: Parts, apply: bool = True) -> None:
    """Check the whole of ``state`` against the settings and parts (raising, naming the key,
    with nothing applied), then apply it to them (unless not ``apply``)."""
    settings, schedule, counters, clock, source, reference = parts
    if (
        not isinstance(state, Mapping)
        or isinstance(state.get("version"), bool)
        or state.get("version") != VERSION
    ):
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
            hint = _budget_hint(state, theirs, settings) if key == BUDGET_KEY else ""
            raise ValueError(
                f"state has {key}={theirs!r}, but this GAR has {key}={settings[key]!r}{hint}"
            )
    for key in ("steps", "augmented", "rewarded", "dropped", "skipped_nonfinite"):
        _check_count(state, key)
    if state["last_augmented"] is not None:
        _check_count(state, "last_augmented")
    if state["augmented"] > 0 and state["last_augmented"] is None:
        raise ValueError(
            f"state's last_augmented is None, but augmented={state['augmented']}: the state "
            "is inconsistent"
        )
    if state["skipped_nonfinite"] > state["steps"]:
        raise ValueError(
            f"state has skipped_nonfinite={state['skipped_nonfinite']!r} steps skipped, more "
            f"than its steps={state['steps']!r}"
        )
    last_mean = state["last_mean"]
    if not _is_number(last_mean) or math.isinf(last_mean):
        raise ValueError(
            f"state's last_mean should be a finite number (NaN before a reward), but got "
            f"{last_mean!r}"
        )
    dropped_by = _checked_dropped_by(state)
    clock_state = _checked_clock(state)
    reference_step = state["reference_step"]
    if not _is_int(reference_step) or not 0 <= reference_step <= state["steps"]:
        raise ValueError(
            f"state's reference_step should be an int in [0, steps={state['steps']!r}], but "
            f"got {reference_step!r}"
        )
    ref_grad = source.check_state(state["reference_gradient"])
    if state.get("budget_state") is not None or state.get(BUDGET_KEY) is not None:
        # absent from states saved before budget= (by an exact GAR) only
        schedule.budget.check_state(state.get("budget_state"))
    ref_state = state["reference"]
    if ref_state is None and hasattr(reference, "load_state_dict"):
        raise ValueError(
            "state's reference is None (saved with a reference iterator without state_dict()), "
            f"but this GAR's reference ({type(reference).__name__}) has a position to resume: "
            "it would restart where the state cannot say"
        )
    if ref_state is not None and reference is not None:
        if not hasattr(reference, "load_state_dict"):
            raise ValueError(
                "state holds the reference stream's position, but this GAR's reference "
                f"iterator ({type(reference).__name__}) has no load_state_dict()"
            )
        if not isinstance(ref_state, Mapping):
            raise ValueError(
                "state's reference should be the reference iterator's state_dict() (a dict) "
                f"or None, but got {type(ref_state).__name__}"
            )
        # The first part applied: it checks its own state whole before applying it, and
        # everything after it was checked above.
        check = getattr(reference, "check_state", None)
        try:
            if check is not None:
                check(ref_state)
            if apply:
                reference.load_state_dict(ref_state)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"state's reference (the reference iterator's position) was refused: {error}"
            ) from error
    if not apply:
        return
    schedule.load_state_dict(dict(state))
    counters.rewarded = state["rewarded"]
    counters.dropped = state["dropped"]
    counters.dropped_by = dropped_by
    counters.skipped_nonfinite = state["skipped_nonfinite"]
    counters.last_mean = float(last_mean)
    in_step, span, generic = clock_state
    clock.first, clock.in_step, clock.last = None, 0.0, 0.0
    clock.saved = (in_step, span)
    counters.generic_calls = generic
    source.load(ref_grad, reference_step)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_count(state: Mapping[str, Any], key: str) -> None:
    value = state[key]
    if not _is_int(value) or value < 0:
        raise ValueError(f"state's {key} should be a non-negative int, but got {value!r}")


def _checked_dropped_by(state: Mapping[str, Any]) -> dict[str, int]:
    """The dropped batches by reason (zeros for a state saved before they were counted)."""
    if DROPPED_BY_KEY not in state:
        return dict.fromkeys(REASONS, 0)
    saved = state[DROPPED_BY_KEY]
    if not isinstance(saved, Mapping) or set(saved) != set(REASONS):
        raise ValueError(
            f"state's {DROPPED_BY_KEY} should map each of {sorted(REASONS)} to a count, but got "
            + (str(sorted(saved)) if isinstance(saved, Mapping) else type(saved).__name__)
        )
    for reason, n in saved.items():
        if not _is_int(n) or n < 0:
            raise ValueError(
                f"state's {DROPPED_BY_KEY}[{reason!r}] should be a non-negative int, but got {n!r}"
            )
    if sum(saved.values()) > state["dropped"]:
        raise ValueError(
            f"state's {DROPPED_BY_KEY} counts {sum(saved.values())} dropped batches, more than "
            f"its dropped={state['dropped']!r}"
        )
    return dict(saved)


def _checked_clock(state: Mapping[str, Any]) -> tuple[float, float, int]:
    """``(seconds in step(), seconds of the loop, generic calls)`` (zeros before they were
    saved)."""
    saved = state.get(CLOCK_KEY, (0.0, 0.0, 0.0))
    ok = (
        isinstance(saved, list | tuple)
        and len(saved) == 3
        and all(_is_number(v) and math.isfinite(v) and v >= 0 for v in saved)
        and float(saved[2]).is_integer()
    )
    if not ok:
        raise ValueError(
            f"state's {CLOCK_KEY} should be [seconds in step(), seconds of the loop, generic "
            f"calls], three finite non-negative numbers, but got {saved!r}"
        )
    return float(saved[0]), float(saved[1]), int(saved[2])


def _budget_hint(state: Mapping[str, Any], theirs: Any, settings: Mapping[str, Any]) -> str:
    """Why a saved budget may differ from this GAR's, and what to pass to resume: a state
    saved before ``budget=`` existed (by an exact GAR), or a next-batch state saved when
    ``budget="auto"`` stood for 0.1 there too."""
    if BUDGET_KEY not in state:
        return " (a state saved before budget= existed, by an exact GAR: pass budget=None)"
    if (
        settings["mode"] == "next batch"
        and settings[BUDGET_KEY] == NEXT_BATCH_BUDGET
        and theirs == DEFAULT_BUDGET
    ):
        return (
            f' (budget="auto" stood for {DEFAULT_BUDGET} with the next batch before it stood '
            f"for {NEXT_BATCH_BUDGET}: pass budget={DEFAULT_BUDGET} to resume this run)"
        )
    return ""
