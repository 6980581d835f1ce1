"""A GARSampler's passes: its iterators, the epoch they draw, and what reached the loop.

Each ``iter(sampler)`` is a :class:`SamplerIterator`; only the newest one that started may
draw. A tracked loader (``sampler.track``) opens a :class:`Pass` at its own ``iter()``; the
sampler iterator that yields first afterwards is bound to it, and each batch the loader hands
to the loop is counted there (:meth:`Passes.deliver`). From the two counts :class:`Passes`
tells which batch the loop holds, which batches were prefetched but never delivered, and where
an epoch stands for a checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from ._lag import WRAPPER_READ_AHEAD, LaggedPolicies, fitted_lag, lag_needed
from ._records import Record, RewardWindow

__all__ = ["DeliveryLog", "Pass", "Passes", "SamplerIterator"]


class DeliveryLog:
    """The ids of the batches tracked loaders handed to the training loop, in order: how many
    in all (:attr:`count`), the last one, and the ids of the last ``keep``."""

    def __init__(self, keep: int) -> None:
        self._ids: deque[int] = deque(maxlen=keep)
        self.count = 0
        self.last: int | None = None

    def keep_at_least(self, keep: int) -> None:
        """Keep the ids of at least the last ``keep`` deliveries from now on."""
        if keep > cast(int, self._ids.maxlen):
            self._ids = deque(self._ids, maxlen=keep)

    def add(self, batch: int) -> None:
        self._ids.append(batch)
        self.count += 1
        self.last = batch

    def __getitem__(self, i: int) -> int:
        """Id of the ``i``-th delivery (0-based, counted since construction)."""
        first = self.count - len(self._ids)
        if isinstance(i, bool) or not isinstance(i, int) or not first <= i < self.count:
            raise IndexError(
                f"delivery should be an int in [{first}, {self.count}), but got i={i!r}"
            )
        return self._ids[i - first]


class SamplerIterator:
    """What ``iter(sampler)`` returns: yields lists of keys, one batch per ``next()``.

    Stateful (torchdata): its state is its position in the epoch, which StatefulDataLoader
    stores beside the sampler's own state. When a tracked pass is open as it yields its first
    batch, it is bound to that pass, whose count says how many of its batches reached the loop.
    """

    def __init__(self, passes: Passes, next_batch: Callable[[SamplerIterator], list[Any]]) -> None:
        self._passes = passes
        self._next_batch = next_batch
        self.started = False
        self.exhausted = False
        self.first_id = 0
        self.returned = 0  # batches handed out by __next__
        self.tracker: Pass | None = None
        self.target: Any = None  # from load_state_dict: None, "fresh" or an epoch position

    def __iter__(self) -> SamplerIterator:
        return self

    def __next__(self) -> list[Any]:
        return self._next_batch(self)

    def state_dict(self) -> dict[str, Any]:
        """Its place in the epoch while it is the iteration that draws (``started``, the
        ``epoch`` and the ``position`` in it), else ``{"started": False}``."""
        passes = self._passes
        if self.started and passes.active is self:
            return {"started": True, "epoch": passes.epoch, "position": passes.pos}
        return {"started": False}

    def end_unstarted(self) -> None:
        """Yield nothing: a restored iterator that had finished its epoch."""
        self.started = self.exhausted = True

    def took(self) -> None:
        """One more batch handed out by ``__next__``."""
        self.returned += 1

    def cut(self, kept: int) -> None:
        """Only the first ``kept`` of the batches it handed out count (the rest are drawn
        again): the others never reached the loop."""
        self.returned = kept

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "started" not in state:
            raise ValueError(f"not a GARSampler iterator state: {state!r}")
        if self.started:
            raise RuntimeError("load_state_dict on an iterator that has already yielded batches")
        self.target = (
            ("at", int(state["epoch"]), int(state["position"])) if state["started"] else "fresh"
        )


class Pass:
    """One ``iter()`` of a tracked iterable: the sampler iteration it reads, and its count."""

    __slots__ = ("delivered", "ended", "it", "skip", "workers")

    def __init__(self, skip: int, workers: int) -> None:
        self.it: SamplerIterator | None = None  # bound when the sampler yields its first batch
        self.skip = skip  # batches a wrapper drops before the first delivery
        self.workers = workers  # the loader's num_workers (0: batches stay in this process)
        self.delivered = 0  # batches handed to the loop
        self.ended = False


class Passes:
    """The sampler's iterations and where its epochs stand.

    ``epoch`` is the one being drawn (``None`` before the first), ``pos`` the batches of it
    yielded so far, ``next_epoch`` the number the next one gets; ``replay`` holds batches
    drawn before a checkpoint or a rewind, yielded again before new ones are drawn.
    """

    def __init__(self, lagged: LaggedPolicies, records: RewardWindow) -> None:
        self.lagged = lagged  # the policy lag (fitted to each tracked pass's loader, or fixed)
        self.records = records  # the reward window (grown to fit a deep loader)
        self.reward_delay: int | None = None
        self.next_epoch = 0
        self.epoch: int | None = None
        self.counted_epoch: int | None = None  # next_epoch as the last new epoch set it
        self.pos = 0
        self.replay: deque[Record] = deque()
        self.iters: deque[SamplerIterator] = deque(maxlen=8)  # started ones, oldest first
        self.active: SamplerIterator | None = None
        self.open: Pass | None = None  # the tracked pass the next iteration belongs to
        self.deliveries = DeliveryLog(records.size)  # ids handed to the loop

    def resume(self, epoch: int | None, pos: int, replay: Iterable[Record]) -> None:
        """Stand at batch ``pos`` of ``epoch`` (a checkpoint's position), with ``replay`` to
        yield again before new batches are drawn."""
        self.epoch, self.pos, self.replay = epoch, pos, deque(replay)

    def set_next_epoch(self, epoch: int) -> None:
        """Number the next epoch ``epoch``."""
        self.next_epoch = epoch

    def reuse_epoch(self) -> None:
        """The pass that began the present epoch delivered nothing: the next one reuses its
        number."""
        self.next_epoch = cast(int, self.epoch)

    def forget_replay(self) -> None:
        """The batches waiting to be yielded again are drawn anew instead (a rewind)."""
        self.replay = deque()

    def forget_iterations(self) -> None:
        """A state was applied: the earlier iterations no longer count for lost batches."""
        self.iters.clear()

    def deactivate(self) -> None:
        """A state was loaded: the iteration that drew so far draws no more."""
        self.active = None

    def took(self, it: SamplerIterator, position: int) -> None:
        """``it`` handed out the batch at ``position`` of the epoch."""
        self.pos = position
        it.took()

    def new_epoch(self) -> int:
        """Begin the next epoch; returns its number."""
        self.epoch = self.next_epoch
        self.next_epoch += 1
        self.counted_epoch = self.next_epoch  # set_epoch() since changes it
        self.pos = 0
        self.replay = deque()
        return self.epoch

    def activate(self, it: SamplerIterator, first_id: int) -> None:
        """``it`` yields its first batch, of id ``first_id``: the iterations before it draw no
        more."""
        it.started = True
        it.first_id = first_id
        if self.active is not None and self.active is not it:
            self.active.exhausted = True
        self.active = it
        self.iters.append(it)

    def bind(self, it: SamplerIterator) -> None:
        """Bind ``it`` to the tracked pass opened before it yielded, if any."""
        if it.tracker is None and self.open is not None and self.open.it is None:
            it.tracker, self.open.it = self.open, it

    # ------------------------------------------------------------------ deliveries

    def open_pass(self, skip: int, workers: int, depth: int) -> Pass:
        """A tracked iterable starts a pass with a loader that prefetches ``depth`` batches
        (``num_workers * prefetch_factor``): the next sampler iteration to yield is its own.

        A fitted lag takes what the loader needs (:func:`fitted_lag`); a fixed lag too small
        for it is refused here, before anything is drawn, when the reward delay is known. The
        reward window grows to hold every batch drawn and not yet rewarded."""
        delay, lagged = self.reward_delay, self.lagged
        if lagged.fitted:
            lagged.fit(fitted_lag(depth, delay))
        elif delay is not None and lag_needed(depth, delay) > lagged.lag:
            raise ValueError(self._too_small(depth, delay, "prefetches"))
        room = depth + WRAPPER_READ_AHEAD + 2  # + the batch delivered and one reward delay
        self.records.keep_at_least(room)
        self.deliveries.keep_at_least(room)
        p = Pass(skip, workers)
        self.open = p
        return p

    def _too_small(self, ahead: int, delay: int, verb: str) -> str:
        return (
            f"lag={self.lagged.lag} is too small for this loader: it {verb} {ahead} batch(es) "
            f"beyond the one it delivers (num_workers * prefetch_factor, plus any wrapper "
            f"that reads ahead), and rewards arrive {delay} batch(es) after their own, so "
            f"batches would be drawn before the rewards they depend on. Pass "
            f"GARSampler(lag={lag_needed(ahead, delay)}) or more, lag=None (fitted to the "
            "loader), or a loader with fewer workers or a smaller prefetch_factor "
            "(docs/howto-mixture.md, 'The policy lag')"
        )

    def deliver(self, p: Pass) -> None:
        """A tracked iterable handed one more batch to the loop; a loader that reads too far
        ahead for the lag (given the reward delay) is refused here, at its first batch."""
        it = p.it
        if it is None:
            raise RuntimeError(
                "the tracked iterable delivered a batch, but this GARSampler drew none in this "
                "pass: track the loader whose batch_sampler is this sampler"
            )
        n = p.skip + p.delivered + 1
        if n > it.returned:
            raise RuntimeError(
                f"the tracked iterable delivered its batch {n} of this pass, but the sampler has "
                f"yielded only {it.returned}: its batches are not this sampler's, in order"
            )
        p.delivered += 1
        delay, ahead, lagged = self.reward_delay, it.returned - n, self.lagged
        if delay is not None and lag_needed(ahead, delay) > lagged.lag:
            if not lagged.fitted:
                raise ValueError(self._too_small(ahead, delay, "had drawn"))
            # A wrapper reads further ahead than its settings said: a fitted lag grows (it
            # only postpones the waiting updates' fixed points).
            lagged.fit(lag_needed(ahead, delay))
        self.deliveries.add(it.first_id + n - 1)

    def delivered(self, it: SamplerIterator) -> int:
        """How many of ``it``'s batches went past the loop: delivered to it, or dropped by a
        skipping wrapper on the way. Without tracking, every batch yielded counts (the state
        a StatefulDataLoader snapshots when it draws a batch is then exact)."""
        p = it.tracker
        if p is None:
            return it.returned
        return min(p.skip + p.delivered, it.returned)

    def lost_ids(self) -> set[int]:
        """Ids of batches that were drawn but never delivered: skipped by a wrapper, or left
        behind by an iteration that ended early."""
        lost: set[int] = set()
        for it in self.iters:
            p = it.tracker
            if p is not None and p.skip:
                lost.update(range(it.first_id, it.first_id + min(p.skip, it.returned)))
            if it is self.active:
                continue
            lost.update(range(it.first_id + self.delivered(it), it.first_id + it.returned))
        return lost

    def last_delivered(self) -> int:
        """Id of the batch the loop received last; raises when that cannot be told."""
        it = self.active
        if it is not None and it.tracker is None and it.returned:
            raise RuntimeError(
                "GARSampler cannot tell which batch the training loop holds: its batches are "
                "not iterated through sampler.track(). Wrap the iterable the loop consumes, "
                "loader = sampler.track(loader), or pass update(r, batch=id)"
            )
        bid = self.deliveries.last
        if bid is None:
            raise RuntimeError(
                "update() was called before any batch was received through sampler.track(loader)"
            )
        return bid

    def check_delivered(self, batch: int, lost: bool) -> None:
        """Raise unless batch ``batch`` reached the loop (not replayed, ``lost`` by a pass
        that ended before it arrived, skipped or still prefetched)."""
        if any(r.id == batch for r in self.replay):
            raise ValueError(
                f"batch={batch} was drawn before the checkpoint but not yet delivered: the "
                "resumed loop hands it out again first"
            )
        if lost:
            raise ValueError(
                f"batch={batch} was prefetched but never delivered: the training loop left its "
                "epoch before it arrived"
            )
        for it in self.iters:
            if it.first_id <= batch < it.first_id + it.returned:
                p = it.tracker
                if p is not None and batch < it.first_id + p.skip:
                    raise ValueError(
                        f"batch={batch} was skipped by a wrapper of the loader (skip_batches="
                        f"{p.skip}) and never delivered"
                    )
                d = self.delivered(it)
                if batch >= it.first_id + d:
                    state = (
                        "is still prefetched"
                        if it is self.active and not it.exhausted
                        else "was prefetched but never delivered"
                    )
                    raise ValueError(
                        f"batch={batch} {state}: the training loop has received batches up to "
                        f"{it.first_id + d - 1} of this epoch"
                    )

    def checkpoint_position(self, next_id: int) -> tuple[int, int]:
        """``(batches of the epoch the loop received, id of the first batch drawn but not
        delivered)``: where a state saved now resumes."""
        it = self.active
        if it is not None and self.epoch is not None:
            d = self.delivered(it)
            return self.pos - it.returned + d, it.first_id + d
        return self.pos, self.replay[0].id if self.replay else next_id
