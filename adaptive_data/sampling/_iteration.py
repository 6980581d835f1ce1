"""How a GARSampler's iterations draw: the start of each (resume a loaded state, or begin an
epoch after drawing again what an earlier pass left undelivered) and its next batch.

The iterations share one position (:class:`Passes`): only the newest one that started draws.
A batch is replayed from a checkpoint or a rewind first, else drawn by the :class:`Drawer`;
every batch drawn goes to the reward window (:class:`RewardWindow`) to be matched by
``update()``. With stream sources, the first batch that drew each stream is remembered: a
process started later (a DataLoader worker, a resumed run) must not read it afresh.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from . import _checkpoint as ckpt
from ._drawing import Drawer
from ._passes import Passes, SamplerIterator
from ._records import Record, RewardWindow
from ._streams import StreamReaders

__all__: list[str] = []


class Iterations:
    """The drawing side of a sampler's ``__iter__`` (see the module docstring).

    Args:
        passes, drawer, records, loaded: the sampler's parts.
        num_batches: batches per epoch.
        policies: the live source policy and transform policy (or None), from which a new
            epoch's drawing copies start.
        apply: applies a loaded state to the sampler (the chosen one, at the first batch).
        streams: which sources are streams; ``readers`` reads them (None: no stream).
    """

    def __init__(
        self,
        passes: Passes,
        drawer: Drawer,
        records: RewardWindow,
        loaded: ckpt.LoadedStates,
        num_batches: int,
        policies: tuple[Any, Any],
        apply: Callable[[Mapping[str, Any]], None],
        streams: Sequence[bool],
        readers: StreamReaders | None,
    ) -> None:
        self._passes = passes
        self._drawer = drawer
        self._records = records
        self._loaded = loaded
        self.num_batches = num_batches
        self._policies = policies
        self._apply = apply
        self._is_stream = list(streams)
        self._readers = readers
        self.stream_first = [-1] * len(streams)  # id of the first batch that drew each stream

    def load_stream_first(self, first: Sequence[int] | None, cut: int) -> None:
        """Restore which batch first drew each stream; the streams drawn before batch ``cut``
        (the first batch the loop had not received at the checkpoint) were read before it,
        and no process may start them afresh unless a loader restores its place in them."""
        self.stream_first = (
            [-1] * len(self._is_stream) if first is None else [int(v) for v in first]
        )
        if self._readers is not None:
            ids = [s for s, st in enumerate(self._is_stream) if st]
            self._readers.resumed(frozenset(s for s in ids if 0 <= self.stream_first[s] < cut))

    def _note_streams(self, rec: Record) -> None:
        """Remember which streams were drawn, and from which batch on: a DataLoader worker
        started later finds them already read by others (``StreamReaders.started``)."""
        first, readers = self.stream_first, cast(StreamReaders, self._readers)
        for s in set(rec.sources):
            if self._is_stream[s]:
                if first[s] < 0 or rec.id < first[s]:
                    first[s] = rec.id
                readers.drawn(s)

    def start(self, it: SamplerIterator) -> None:
        """First ``next()`` of an iterator: resume a loaded state or begin a new epoch."""
        target = it.target
        if self._loaded:
            state = self._loaded.choose(target)
            replay = ckpt.undelivered(state)
            if state is not self._loaded.live:  # else the sampler holds it, with later updates
                self._apply(state)
            self._loaded.clear()
            if isinstance(target, tuple) and target[2] >= self.num_batches:
                # A StatefulDataLoader restoring an iterator that had finished its epoch builds
                # it (its workers prefetch from it) only to drop it for a new one: this
                # iterator yields nothing, and the next one starts the next epoch.
                it.end_unstarted()
                return
            in_progress = state[ckpt.EPOCH] is not None and state[ckpt.POSITION] < self.num_batches
            if target == "fresh" or not in_progress:
                if replay:  # drawn before the checkpoint, never delivered: drawn again
                    self.rewind(replay[0].id)
                self.new_epoch()
            else:
                start = state[ckpt.POSITION] if not isinstance(target, tuple) else target[2]
                self._passes.resume(
                    state[ckpt.EPOCH], start, (r for r in replay if r.position > start)
                )
        else:
            if isinstance(target, tuple):
                raise RuntimeError(
                    "a StatefulDataLoader restored its position, but the GARSampler's state "
                    "was not loaded with it"
                )
            old = self._passes.active
            if old is not None and old.tracker is not None and old.returned:
                # A pass left early: the batches its loader read ahead never reached the
                # loop. Draw them again, so that what follows is the same with any loader.
                kept = self._passes.delivered(old)
                if kept < old.returned:
                    self.rewind(old.first_id + kept)
                    old.cut(kept)
                if kept == 0 and self._passes.next_epoch == self._passes.counted_epoch:
                    # Nothing reached the loop: the pass never happened for it (a loader
                    # without workers would not even have started it). Reuse its epoch.
                    self._passes.reuse_epoch()
            elif self._passes.replay:
                self.rewind(self._passes.replay[0].id)
            self.new_epoch()
        waiting = self._passes.replay
        if self._readers is not None:  # the main process may not start afresh what was read
            self._readers.start_iteration()
        self._passes.activate(it, waiting[0].id if waiting else self._drawer.next_id)

    def rewind(self, first: int) -> None:
        """Forget the batches from id ``first`` on (drawn, never delivered): the sources'
        cursors, the ids and the counters go back to just before ``first`` was drawn."""
        rec = self._records.get(first)
        if rec is None or not self._drawer.rewind(rec):
            return  # nothing drawn from there, or a state saved without the snapshots
        self._records.forget_from(first)
        self._passes.forget_replay()

    def new_epoch(self) -> None:
        epoch = self._passes.new_epoch()
        self._drawer.new_epoch(epoch, *self._policies)

    def next_batch(self, it: SamplerIterator) -> list[int]:
        if it.exhausted:
            raise StopIteration
        if not it.started:
            self.start(it)
            if it.exhausted:
                raise StopIteration
        elif self._passes.active is not it:
            raise RuntimeError(
                "this iteration over the GARSampler was superseded by a newer one (another "
                "iter(loader)); only the newest iteration may draw batches"
            )
        if self._passes.pos >= self.num_batches:
            it.exhausted = True
            raise StopIteration
        self._passes.bind(it)
        rec = (
            self._passes.replay.popleft()
            if self._passes.replay
            else self._drawer.draw(cast(int, self._passes.epoch), self._passes.pos + 1)
        )
        self._drawer.taken(rec)
        if self._readers is not None:
            self._note_streams(rec)
        dropped = self._records.dropped_unrewarded
        self._records.add(rec)
        if (
            dropped == 0
            and self._records.dropped_unrewarded
            and it.tracker is not None
            and self._records.never_rewarded()
        ):
            warnings.warn(
                f"GARSampler delivered {self._records.size + 1} batches through its tracked "
                "loader and none of them was rewarded: nothing calls update(), so the mixture "
                "stays where it started. Call gar.step() after each backward (or pass "
                "GARCallback to the Lightning Trainer's callbacks=, or use GARTrainer)",
                UserWarning,
                stacklevel=2,
            )
        self._passes.took(it, rec.position)
        # In-process loaders get the source ids along (no search in the dataset); for worker
        # processes (or a loader not tracked) a plain list pickles faster.
        return rec.batch(sources=it.tracker is not None and not it.tracker.workers)
