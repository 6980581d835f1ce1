"""A GARSampler's checkpoints: the state's keys, its checks, and which loaded state resumes.

A sampler's state is a flat dict (torch tensors and Python values) assembled from its parts'
states: the drawer's (generator, shard positions, next id, the policy lag), the reward
window's (:func:`window_state`), the policy's, the transform's and the sampler's own counters.
A loaded state is held (:class:`LoadedStates`) until the next pass starts, which resumes from
the one that fits the loader's position (:meth:`LoadedStates.choose`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._check import check_keys
from ..augment._policy import NO_AUGMENTATION
from ..policy import _fields as f
from ._records import Record

# The GARSampler the checks read (its parts' parse methods): not imported, since _sampler
# imports this module (no import circle, type-checking ones included).
Sampler = Any

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
HISTORY_EVERY = "history_every"  # the history holds the rows of updates every, 2 * every, ...
HISTORY_LIMIT = "history_limit"  # GARSampler(history_limit=)
# Each update's mean reward per source (thinned with the history), and per source the finite
# rewards counted and the update that last carried one; absent from states saved before them.
REWARDS = "rewards"
REWARD_COUNTS = "reward_counts"
REWARD_LAST = "reward_last"
REWARD_WINDOW = "reward_window"  # GARSampler(reward_window=), before it grew for a loader

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
)  # rank, world_size (default 0, 1), transform (None: none), lag (saved before the lag),
# history_every, history_limit and reward_window (saved before them) and, without stream
# sources, stream_first_batch (saved before streams were supported) may be absent


def check_state(state: Any, sampler: Sampler) -> None:
    """Raise ``ValueError`` naming the field unless ``state`` is a sampler state ``sampler``
    can resume from: this version, every key, the same settings (names, sizes, batch size,
    batch count, seed, reference_every, reward_window, history_limit, the policy's and the
    transform's, lag, rank and world size), and every field of the right type, shape and
    range, consistent with the others. Changes nothing."""
    if not isinstance(state, Mapping) or state.get(VERSION) != STATE_VERSION:
        raise ValueError(
            f"state should be a GARSampler.state_dict() of version {STATE_VERSION}, but got "
            + (
                f"version={state.get(VERSION)!r}"
                if isinstance(state, Mapping)
                else type(state).__name__
            )
        )
    streams = bool(sampler._stream_ids)
    check_keys(
        state, (*_REQUIRED, *((STREAM_FIRST,) if streams else ())), "GARSampler.state_dict()"
    )
    for name, mine in ((RANK, sampler.rank), (WORLD_SIZE, sampler.world_size)):
        if state.get(name, 0 if name == RANK else 1) != mine:
            raise ValueError(
                f"state has {name}={state.get(name)!r}, but this sampler has {name}={mine!r}: "
                "resume each rank from its own state, with the same world size"
            )
    transform = sampler.transform
    if (state.get(TRANSFORM) is None) != (transform is None):
        raise ValueError(
            "state was saved by a sampler "
            + ("without" if state.get(TRANSFORM) is None else "with")
            + " a transform, but this sampler has "
            + ("one" if transform is not None else "none")
            + " (state['transform'])"
        )
    settings = sampler._settings()
    for key, value in settings.items():
        raw = state[key]
        theirs = list(raw) if isinstance(value, list) and _listlike(raw) else raw
        same = type(theirs) is type(value) and (
            [type(v) for v in theirs] == [type(v) for v in value]
            if isinstance(value, list)
            else True
        )
        if not same or theirs != value:
            raise ValueError(
                f"state has {key}={f.describe(raw)}, but this sampler has {key}={value!r}"
            )
    optional = {
        REWARD_WINDOW: sampler._reward_window_setting,
        HISTORY_LIMIT: sampler._learner.history.limit,
    }
    for key, value in optional.items():
        if key in state and (state[key] != value or type(state[key]) is not type(value)):
            raise ValueError(
                f"state has {key}={f.describe(state[key])}, but this sampler has {key}={value!r}: "
                "a resumed run keeps the settings it was built with (docs/howto-resume.md)"
            )
    sampler._policy.check_state(state[POLICY], "state['policy']", "this sampler")
    if transform is not None:
        transform.policy.check_state(state[TRANSFORM], "state['transform']")
    _check_position(state, sampler)
    next_id = state[NEXT_ID]
    if state.get(LAG) is not None:  # absent from states saved before the lag
        sampler._drawer.lagged.parse(state[LAG], "state['lag']", next_id)
    _check_records(state, sampler)
    k = len(sampler.names)
    rewarded = state[COUNTERS][1]
    every = state.get(HISTORY_EVERY)
    if every is not None:
        every = f.integer(f"state[{HISTORY_EVERY!r}]", every, lo=1)
        if every & (every - 1):
            raise ValueError(f"state[{HISTORY_EVERY!r}] should be a power of two, but got {every}")
    rows, _ = sampler._learner.history.parse(
        state[HISTORY], "state['history']", rewarded, every, "state['counters'][1]"
    )
    if len(rows):
        ids = rows[:, 0]
        if not bool(((ids == ids.round()) & (ids >= 0) & (ids < next_id)).all()):
            raise ValueError(
                f"state['history'] should start each row with the id of a batch drawn (an int "
                f"in [0, next_id={next_id})), but holds {ids.tolist()[:8]}..."
            )
        probs = rows[:, 1:]
        if not bool(((probs >= 0) & (probs <= 1)).all()) or not bool(
            ((probs.sum(1) - 1).abs() <= 1e-6).all()
        ):
            raise ValueError("state['history'] should hold weights that sum to 1 in every row")
    # NaN before a source's first finite reward; +-inf after rewards that overflow float64.
    f.reals(f"state[{REWARD_MEANS!r}]", state[REWARD_MEANS], k, nan_ok=True, inf_ok=True)
    _check_rewards(state, sampler, rewarded, every)
    if STREAM_FIRST in state:
        first = f.integers(f"state[{STREAM_FIRST!r}]", state[STREAM_FIRST], k, lo=-1)
        for s, v in enumerate(first):
            if (s not in sampler._stream_ids and v != -1) or v >= next_id:
                raise ValueError(
                    f"state[{STREAM_FIRST!r}] should hold, per source, -1 or (for a stream) "
                    f"the id of a batch drawn (< next_id={next_id}), but holds {first}"
                )


def _check_rewards(
    state: Mapping[str, Any], sampler: Sampler, rewarded: int, every: int | None
) -> None:
    """The per-update rewards (one row per history row) and each source's count and last
    update, all or none of them (a state saved before them)."""
    keys = (REWARDS, REWARD_COUNTS, REWARD_LAST)
    present = [key in state for key in keys]
    if not any(present):
        return
    if not all(present):
        missing = [key for key, p in zip(keys, present, strict=True) if not p]
        raise ValueError(f"state holds some of {list(keys)} but lacks the key(s) {missing}")
    rows, _ = sampler._learner.rewards.parse(
        state[REWARDS], f"state[{REWARDS!r}]", rewarded, every, "state['counters'][1]"
    )
    if bool(torch.isinf(rows).any()):
        raise ValueError(f"state[{REWARDS!r}] should hold finite mean rewards or NaN")
    k = len(sampler.names)
    f.integers(f"state[{REWARD_COUNTS!r}]", state[REWARD_COUNTS], k, lo=0)
    f.integers(f"state[{REWARD_LAST!r}]", state[REWARD_LAST], k, lo=0, hi=rewarded)


def _listlike(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _check_position(state: Mapping[str, Any], sampler: Sampler) -> None:
    """The epoch counters, the generator, the sources' places, the ids and the counters."""
    n = sampler.num_batches
    f.integer(f"state[{NEXT_EPOCH!r}]", state[NEXT_EPOCH], lo=0)
    epoch = state[EPOCH]
    if epoch is not None:
        f.integer(f"state[{EPOCH!r}]", epoch, lo=0)
    position = f.integer(f"state[{POSITION!r}]", state[POSITION], lo=0, hi=n)
    yielded = f.integer(f"state[{YIELDED!r}]", state[YIELDED], lo=position, hi=n)
    if epoch is None and (position or yielded):
        raise ValueError(
            f"state has epoch=None (no epoch begun) but position={position}, "
            f"yielded={yielded} (state['position'], state['yielded'])"
        )
    gen = f.tensor(
        f"state[{CHOICE_GEN!r}]", state[CHOICE_GEN], torch.uint8, tuple(_GENERATOR_STATE.shape)
    )
    try:
        torch.Generator().set_state(gen)
    except RuntimeError as e:
        raise ValueError(f"state[{CHOICE_GEN!r}] is not a generator state: {e}") from None
    _check_place(
        state[CURSORS], state[ROUNDS], f"state[{CURSORS!r}]", f"state[{ROUNDS!r}]", sampler
    )
    next_id = f.integer(f"state[{NEXT_ID!r}]", state[NEXT_ID], lo=0)
    drawn, rewarded, dropped = f.integers(f"state[{COUNTERS!r}]", state[COUNTERS], 3, lo=0)
    if drawn != next_id or rewarded > drawn or dropped > drawn:
        raise ValueError(
            f"state[{COUNTERS!r}] counts {drawn} batches drawn, {rewarded} rewarded and "
            f"{dropped} dropped, but state['next_id'] says {next_id} were drawn"
        )


_GENERATOR_STATE = torch.Generator().get_state()


def _check_place(cursors: Any, rounds: Any, cpath: str, rpath: str, sampler: Sampler) -> None:
    """Each source's cursor (in ``[0, shard size)``; 0 for a stream) and round (>= 0)."""
    shards = sampler._drawer.shards.shard_sizes
    k = len(shards)
    f.integers(rpath, rounds, k, lo=0)
    at = f.integers(cpath, cursors, k, lo=0)
    for s, (c, size) in enumerate(zip(at, shards, strict=True)):
        if (s in sampler._stream_ids and c != 0) or (s not in sampler._stream_ids and c >= size):
            raise ValueError(
                f"{cpath} should hold each source's place in its shard of this rank (< "
                f"{shards}, 0 for a stream), but holds {at}"
            )


def _check_records(state: Mapping[str, Any], sampler: Sampler) -> None:
    """The reward window: the batches drawn and not delivered, those waiting for rewards, and
    the places of the others."""
    next_id, epoch, position = state[NEXT_ID], state[EPOCH], state[POSITION]
    seen: list[int] = []
    places: dict[int, tuple[int, int, str]] = {}  # id -> (epoch, position, where)
    for key in (UNREWARDED, WINDOW):
        records = state[key]
        if not isinstance(records, list | tuple):
            raise f.refuse(f"state[{key!r}]", "a list of batch records", records)
        for i, d in enumerate(records):
            rid, rec_epoch, rec_position = _check_record(
                f"state[{key!r}][{i}]", d, sampler, next_id
            )
            if key == WINDOW and (rec_epoch != epoch or rec_position <= position):
                raise ValueError(
                    f"state[{key!r}][{i}] is a batch of epoch {rec_epoch} at position "
                    f"{rec_position}, but the batches not yet delivered follow position "
                    f"{position} of epoch {epoch} (state['epoch'], state['position'])"
                )
            seen.append(rid)
            places[rid] = (rec_epoch, rec_position, f"state[{key!r}][{i}]['position']")
    window_ids = seen[len(state[UNREWARDED]) :]
    if window_ids != sorted(window_ids):
        raise ValueError(
            f"state[{WINDOW!r}] should hold its batches in order, but has ids {window_ids}"
        )
    spent = f.tensor(f"state[{SPENT!r}]", state[SPENT], torch.long, (None, 6))
    if len(spent):
        n, has_tf = sampler.num_batches, sampler.transform is not None
        ids, epochs, positions, flags = spent[:, 0], spent[:, 1], spent[:, 2], spent[:, 3:]
        ok = (
            (ids >= 0)
            & (ids < next_id)
            & (epochs >= 0)
            & (positions >= 1)
            & (positions <= n)
            & ((flags == 0) | (flags == 1)).all(1)
            & ((spent[:, 3] == 1) | (spent[:, 4] == 1))
            & ((spent[:, 5] == 0) | has_tf)
        )
        if not bool(ok.all()):
            bad = spent[~ok][0].tolist()
            raise ValueError(
                f"state[{SPENT!r}] should hold rows [id < next_id={next_id}, epoch >= 0, position "
                f"in [1, {n}], rewarded, lost, reference] (flags 0 or 1, rewarded or lost, "
                f"reference only with a transform), but holds {bad}"
            )
        seen += ids.tolist()
        for j, (rid, e, pos) in enumerate(spent[:, :3].tolist()):
            places[rid] = (e, pos, f"state[{SPENT!r}][{j}] (its position)")
    if len(set(seen)) != len(seen):
        raise ValueError(
            "state['unrewarded'], state['window'] and state['spent'] should hold each batch id "
            f"once, but repeat {sorted(i for i in set(seen) if seen.count(i) > 1)[:8]}"
        )
    if seen and sorted(seen) != list(range(next_id - len(seen), next_id)):
        raise ValueError(
            "state['unrewarded'], state['window'] and state['spent'] should hold the last "
            f"{len(seen)} batches drawn, ids {next_id - len(seen)}..{next_id - 1} "
            f"(state['next_id']={next_id}), but hold ids {sorted(seen)[:8]}..."
        )
    # Batches are drawn in order: the next batch is the next position of the same epoch, or
    # the first of a later one.
    order = sorted(places)
    for a, b in itertools.pairwise(order):
        (ea, pa, _), (eb, pb, where) = places[a], places[b]
        if not ((eb == ea and pb == pa + 1) or (eb >= ea and pb == 1)):
            raise ValueError(
                f"{where} is {pb} in epoch {eb} for batch {b}, but batch {a} was at position "
                f"{pa} of epoch {ea}: batch {b} should be at position {pa + 1} of the same "
                "epoch or the first of a later one"
            )
    window = set(window_ids)
    delivered = [i for i in seen if i not in window]
    if window_ids and delivered and max(delivered) > window_ids[0]:
        raise ValueError(
            "state['window'] should hold the batches drawn after every delivered one, but "
            f"starts at id {window_ids[0]}, before {max(delivered)}"
        )


def _check_record(path: str, d: Any, sampler: Sampler, next_id: int) -> tuple[int, int, int]:
    """One batch record (:meth:`Record.to_state`); returns its id, epoch and position."""
    d = f.mapping(path, d)
    for key in ("id", "epoch", "position", "keys", "sources"):
        f.field(d, key, path)
    rid = f.integer(f"{path}['id']", d["id"], lo=0, hi=next_id - 1)
    rec_epoch = f.integer(f"{path}['epoch']", d["epoch"], lo=0)
    rec_position = f.integer(f"{path}['position']", d["position"], lo=1, hi=sampler.num_batches)
    b = sampler.batch_size
    k = len(sampler.names)
    sources = f.tensor(f"{path}['sources']", d["sources"], torch.long, (b,))
    keys = f.tensor(f"{path}['keys']", d["keys"], torch.long, (b,))
    if bool(((sources < 0) | (sources >= k)).any()):
        raise ValueError(
            f"{path}['sources'] should hold source ids in [0, {k}), but holds {sources.tolist()}"
        )
    offsets = torch.tensor(sampler.dataset.offsets, dtype=torch.long)
    low = offsets[sources]
    stream = torch.tensor([s in sampler._stream_ids for s in range(k)])[sources]
    high = torch.where(stream, low + 1, offsets[sources + 1])
    if bool(((keys < low) | (keys >= high)).any()):
        raise ValueError(
            f"{path}['keys'] should hold keys of the sources in {path}['sources'], but holds "
            f"{keys.tolist()}"
        )
    tf = sampler.transform
    aug_keys = ("ops", "bins", "negate", "seeds")
    present = [key in d for key in aug_keys]
    if any(present) != (tf is not None) or (any(present) and not all(present)):
        raise ValueError(
            f"{path} should "
            + ("hold" if tf is not None else "not hold")
            + f" the augmentation decisions {list(aug_keys)}"
            + (" (this sampler has a transform)" if tf is not None else " (no transform here)")
        )
    if tf is not None:
        policy = tf.policy
        ops = f.tensor(f"{path}['ops']", d["ops"], torch.long, (b,))
        bins = f.tensor(f"{path}['bins']", d["bins"], torch.long, (b,))
        f.tensor(f"{path}['negate']", d["negate"], torch.bool, (b,))
        seeds = f.tensor(f"{path}['seeds']", d["seeds"], torch.long, (b,))
        n_ops = len(policy.op_names)
        reference = bool((ops == NO_AUGMENTATION).all())
        every = sampler.reference_every
        if reference != bool(every and rec_position % every == 0):
            raise ValueError(
                f"{path}['ops'] should be -1 throughout exactly in the reference batches "
                f"(positions divisible by reference_every={every}), but the batch at position "
                f"{rec_position} holds {ops.tolist()}"
            )
        if not reference and bool(((ops < 0) | (ops >= n_ops)).any()):
            raise ValueError(
                f"{path}['ops'] should hold op ids in [0, {n_ops}) (or -1 throughout, a "
                f"reference batch), but holds {ops.tolist()}"
            )
        sizes = torch.tensor(
            [len(m) if m is not None else 1 for m, _ in policy.table.values()], dtype=torch.long
        )
        limit = torch.ones_like(bins) if reference else sizes[ops]
        if bool(((bins < 0) | (bins >= limit)).any()):
            raise ValueError(
                f"{path}['bins'] should hold a bin of each op, but holds {bins.tolist()}"
            )
        if bool((seeds < 0).any()):
            raise ValueError(f"{path}['seeds'] should hold seeds >= 0, but holds {seeds.tolist()}")
    before = ("cursors_before" in d, "rounds_before" in d)
    if before[0] != before[1]:
        raise ValueError(f"{path} should hold both cursors_before and rounds_before, or neither")
    if before[0]:
        _check_place(
            d["cursors_before"],
            d["rounds_before"],
            f"{path}['cursors_before']",
            f"{path}['rounds_before']",
            sampler,
        )
    return rid, rec_epoch, rec_position


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
