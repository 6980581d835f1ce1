"""A GARSampler's checkpoints: the state's keys, its checks, and which loaded state resumes.

A sampler's state is a flat dict (torch tensors and Python values) assembled from its parts'
states: the drawer's (generator, shard positions, next id, the policy lag), the reward
window's (:func:`window_state`), the policy's, the transform's and the sampler's own counters.
A loaded state is held (:class:`LoadedStates`) until the next pass starts, which resumes from
the one that fits the loader's position (:meth:`LoadedStates.choose`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._check import check_keys
from ._lag import check_lag
from ._records import Record

__all__ = ["STATE_VERSION", "LoadedStates", "check_state", "window_records", "window_state"]

STATE_VERSION = 2  # 2: the history as float64 tensors

# Keys of GARSampler.state_dict() (constants, as torchdata does).
VERSION = "version"
NAMES = "names"
SIZES = "sizes"
BATCH_SIZE = "batch_size"
NUM_BATCHES = "num_batches"
SEED = "seed"
POLICY = "policy"
NEXT_EPOCH = "next_epoch"
EPOCH = "epoch"
POSITION = "position"  # batches of the epoch the loop received
YIELDED = "yielded"  # batches of the epoch the sampler yielded
CHOICE_GEN = "choice_generator"
ROUNDS = "rounds"
CURSORS = "cursors"
NEXT_ID = "next_id"
WINDOW = "window"  # drawn, not delivered: yielded again first on resume
UNREWARDED = "unrewarded"  # delivered, waiting for rewards
SPENT = "spent"  # rewarded or lost: their places in the reward window
HISTORY = "history"
REWARD_MEANS = "reward_means"
COUNTERS = "counters"
TRANSFORM = "transform"
RANK = "rank"
WORLD_SIZE = "world_size"
REFERENCE_EVERY = "reference_every"
STREAM_FIRST = "stream_first_batch"  # per source: id of the first batch that drew it, or -1
LAG = "lag"  # the drawing policies and the updates waiting for their fixed point

_REQUIRED = (
    NAMES,
    SIZES,
    BATCH_SIZE,
    NUM_BATCHES,
    SEED,
    POLICY,
    NEXT_EPOCH,
    EPOCH,
    POSITION,
    YIELDED,
    CHOICE_GEN,
    ROUNDS,
    CURSORS,
    NEXT_ID,
    WINDOW,
    UNREWARDED,
    SPENT,
    HISTORY,
    REWARD_MEANS,
    COUNTERS,
    REFERENCE_EVERY,
)  # rank, world_size (default 0, 1), transform (None: none), lag (saved before the lag) and,
# without stream sources, stream_first_batch (saved before streams were supported) may be absent


def check_state(
    state: Any,
    settings: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    transform: Any,
    lag: int | None,
    streams: bool,
) -> None:
    """Raise if ``state`` is not a sampler state this sampler can resume from: another
    version, missing keys, other ``settings`` (names, sizes, batch size, batch count, seed,
    reference_every), rank, world size, lag, or a transform where there is none (or the
    reverse, or another op table)."""
    if not isinstance(state, Mapping) or state.get(VERSION) != STATE_VERSION:
        raise ValueError(
            f"state should be a GARSampler.state_dict() of version {STATE_VERSION}, but got "
            + (
                f"version={state.get(VERSION)!r}"
                if isinstance(state, Mapping)
                else type(state).__name__
            )
        )
    check_keys(
        state, (*_REQUIRED, *((STREAM_FIRST,) if streams else ())), "GARSampler.state_dict()"
    )
    for name, mine in ((RANK, rank), (WORLD_SIZE, world_size)):
        if state.get(name, 0 if name == RANK else 1) != mine:
            raise ValueError(
                f"state has {name}={state.get(name)!r}, but this sampler has {name}={mine!r}: "
                "resume each rank from its own state, with the same world size"
            )
    if (state.get(TRANSFORM) is None) != (transform is None):
        raise ValueError(
            "state was saved by a sampler "
            + ("without" if state.get(TRANSFORM) is None else "with")
            + " a transform, but this sampler has "
            + ("one" if transform is not None else "none")
        )
    if transform is not None:
        transform.policy.check_state(state[TRANSFORM])
    for key, value in settings.items():
        theirs = list(state[key]) if isinstance(value, list) else state.get(key)
        if theirs != value:
            raise ValueError(
                f"state has {key}={state[key]!r}, but this sampler has {key}={value!r}"
            )
    if state.get(LAG) is not None:  # absent from states saved before the lag
        check_lag(state[LAG], lag)


def window_state(
    records: Iterable[Record], cut: int, lost: set[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor]:
    """The reward window in a state: the batches from id ``cut`` on (drawn, not delivered),
    the delivered ones still waiting for rewards, and the rewarded or ``lost`` ones as rows
    that keep their places (ids, not epoch numbers, tell them apart: an epoch number can
    repeat after ``set_epoch``)."""
    window, unrewarded, spent = [], [], []
    for r in records:
        if r.id >= cut:
            window.append(r.to_state())
        elif r.rewarded or r.lost or r.id in lost:
            spent.append(r.spent_row(r.lost or r.id in lost))
        else:
            unrewarded.append(r.to_state())
    return window, unrewarded, torch.tensor(spent, dtype=torch.long).reshape(len(spent), 6)


def window_records(state: Mapping[str, Any]) -> list[Record]:
    """The reward window of :func:`window_state`, as records (the spent ones without keys)."""
    records = [Record.from_state(r) for r in (*state[UNREWARDED], *state[WINDOW])]
    return records + [Record.from_spent_row(row) for row in state[SPENT].tolist()]


def undelivered(state: Mapping[str, Any]) -> list[Record]:
    """The batches a state's sampler drew but never delivered, oldest first: the resumed
    sampler yields them again, as drawn."""
    return [Record.from_state(r) for r in state[WINDOW]]


class LoadedStates:
    """States loaded into a sampler and not yet resumed from (the next pass picks one).

    :attr:`live` is the one the sampler holds now: a change made before the pass starts (a
    delayed ``update()``, ``set_epoch()``) replaces it (:meth:`replace_live`), so that
    resuming keeps the change and ``state_dict()`` returns it.
    """

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []
        self.live: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.states)

    def add(self, state: dict[str, Any]) -> None:
        self.states.append(state)
        self.live = state

    def replace_live(self, fresh: dict[str, Any]) -> None:
        self.states = [fresh if s is self.live else s for s in self.states]
        self.live = fresh

    def clear(self) -> None:
        self.states, self.live = [], None

    def choose(self, target: Any) -> dict[str, Any]:
        """The loaded state to resume from, for the iterator's ``target`` (``None``,
        ``"fresh"``, or ``("at", epoch, position)`` from a StatefulDataLoader).

        A StatefulDataLoader with workers snapshots the sampler when it *draws* a batch, not
        when the loop receives it, so its copy misses later policy updates. If the user also
        loaded ``sampler.state_dict()`` from the same moment, that newer state covers the
        loader's position too and wins.
        """
        if not isinstance(target, tuple):
            return self.states[-1]
        _, epoch, pos = target
        fits = [s for s in self.states if s[EPOCH] == epoch and s[POSITION] <= pos <= s[YIELDED]]
        if not fits:
            raise RuntimeError(
                f"no loaded GARSampler state covers the loader's position (epoch {epoch}, batch "
                f"{pos}); load the sampler state saved with the loader's"
            )
        state = max(fits, key=lambda s: (s[POLICY]["counters"][0], s[POSITION]))
        ahead = [s for s in self.states if s[EPOCH] == epoch and s[POSITION] > pos]
        if state[POSITION] < pos and ahead:
            warnings.warn(
                f"the StatefulDataLoader's state is at batch {pos} of epoch {epoch}, behind the "
                f"GARSampler state loaded beside it (batch {ahead[0][POSITION]}): a loader with "
                "snapshot_every_n_steps > 1 stores its position only every n batches, so the "
                "resume is not exact (it continues from the loader's older copy of the sampler). "
                "Use snapshot_every_n_steps=1 to resume exactly",
                stacklevel=4,
            )
        elif state[POSITION] < pos:
            warnings.warn(
                f"resuming from the sampler state the StatefulDataLoader stored when it drew batch "
                f"{pos}; policy updates made after that are not in it. Save sampler.state_dict() "
                "beside loader.state_dict() and load both for an exact resume",
                stacklevel=4,
            )
        return state
