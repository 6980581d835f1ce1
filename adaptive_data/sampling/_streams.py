"""Stream sources for GARSampler: each process reads its own shard of every stream.

A stream is an iterable-style source: a Hugging Face ``datasets.IterableDataset`` or a torch
``IterableDataset``. The sampler's key for a stream slot means "the next example of stream s";
whichever process fetches the batch (a DataLoader worker, or the main process with
``num_workers=0``) reads it from its own iterator over its own shard of the stream:

* Hugging Face streams are split across ranks with ``datasets.distributed.split_dataset_by_node``
  and across DataLoader workers by the library itself (a worker iterating an ``IterableDataset``
  reads the shards ``worker_id, worker_id + num_workers, ...``). Each process iterates a copy of
  its own, made when it starts a pass, so that no state is shared between processes.
* A torch ``IterableDataset`` is iterated as a DataLoader would iterate it: it gives each worker
  its own part through ``torch.utils.data.get_worker_info()`` and each rank its own part through
  its rank, as any IterableDataset under a DataLoader must.

The place of a process in each stream (pass number, examples taken in the pass, and a Hugging
Face stream's own ``state_dict()``) is the state of that process's copy of the dataset, which
torchdata's ``StatefulDataLoader`` collects from every worker and restores into it. A process
that would start a stream afresh although it was read before the process started (new workers
every epoch, a resume without the workers' states) raises instead of repeating examples.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

__all__: list[str] = []

ON_STREAM_END = ("restart", "raise")

# Keys of one process's stream state (MixtureDataset.state_dict() with stream sources).
_STREAMS = "streams"
_BEFORE = "read_before_start"
_READERS = "readers"
_PASS = "pass"
_TAKEN = "taken"
_STATE = "state"


def is_stream(source: Any) -> bool:
    """Whether ``source`` is iterable-style: a torch or a Hugging Face ``IterableDataset``."""
    if isinstance(source, IterableDataset):
        return True
    return _is_hf_stream(source)


def _is_hf_stream(source: Any) -> bool:
    hf = sys.modules.get("datasets")  # only present if the user already imported it
    return hf is not None and isinstance(source, getattr(hf, "IterableDataset", ()))


def _where() -> str:
    info = get_worker_info()
    if info is None:
        return "the main process"
    return f"DataLoader worker {info.id} of {info.num_workers}"


class _Reader:
    """One process's iterator over its shard of one stream, in pass ``pass_``."""

    __slots__ = ("hf", "it", "pass_", "taken")

    def __init__(self) -> None:
        self.pass_ = 0
        self.taken = 0  # examples taken in this pass
        self.hf: Any = None  # this pass's copy of a Hugging Face stream
        self.it: Iterator[Any] | None = None


class StreamReaders:
    """The stream sources of a mixture, read in whichever process fetches a batch.

    ``sources`` holds the mixture's sources (``None`` at the map-style ones); ``rank`` and
    ``world_size`` split Hugging Face streams across ranks. ``started`` (set by the sampler, in
    the process that built it) holds the streams drawn so far: a DataLoader worker started later
    must not begin them afresh, nor may the main process begin one drawn in an earlier epoch
    (``iteration_started``). Readers are per process (found anew after a fork or a pickle).
    """

    def __init__(
        self,
        names: Sequence[str],
        sources: Sequence[Any],
        rank: int,
        world_size: int,
        on_end: str,
    ) -> None:
        self.names = list(names)
        self.sources = list(sources)
        self.ids = [s for s, src in enumerate(self.sources) if src is not None]
        self.rank, self.world_size, self.on_end = rank, world_size, on_end
        self.started: frozenset[int] = frozenset()
        self.iteration_started: frozenset[int] = frozenset()  # ``started`` as the epoch began
        self._home = os.getpid()
        self._home_before: frozenset[int] = frozenset()
        self._pid: int | None = None
        self._readers: dict[int, _Reader] = {}
        self._saved: dict[int, Mapping[str, Any]] = {}  # loaded, not yet read
        self._before: frozenset[int] = frozenset()
        self._loaded = False  # this process's place was restored by load_state_dict

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()  # live iterators stay in their process
        d["_pid"], d["_readers"], d["_saved"] = None, {}, {}
        return d

    def _here(self) -> None:
        """Start afresh in a new process: a worker started now finds the streams drawn so far
        (``started``, as it was when the worker started) already read by others."""
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._readers, self._saved, self._loaded = {}, {}, False
        self._before = self._home_before if pid == self._home else self.started

    def drawn(self, s: int) -> None:
        """Stream ``s`` was drawn by a batch (in the process that built the sampler)."""
        if s not in self.started:
            self.started = self.started | {s}

    def start_iteration(self) -> None:
        """An epoch's iteration begins: the main process may not start afresh a stream drawn
        before it."""
        self.iteration_started = self.started

    def resumed(self, before: frozenset[int]) -> None:
        """The sampler resumed from a state in which the streams ``before`` had been read: no
        process may start them afresh unless a loader restores its place in them
        (:meth:`load_state_dict`, before or after this call)."""
        self._home_before = before
        self.started = before
        if self._pid == self._home and not self._loaded and not self._readers:
            self._before = before

    # ------------------------------------------------------------------ reading

    def next(self, s: int) -> Any:
        """The next example of stream ``s`` in this process."""
        if self._pid != os.getpid():
            self._here()
        r = self._readers.get(s)
        if r is None:
            r = self._open(s)
        try:
            x = next(r.it)  # type: ignore[arg-type]
        except StopIteration:
            x = self._end(s, r)
        r.taken += 1
        return x

    def _open(self, s: int) -> _Reader:
        saved = self._saved.pop(s, None)
        home = self._pid == self._home and not self._loaded
        if saved is None and (s in self._before or (home and s in self.iteration_started)):
            where = _where()
            raise RuntimeError(
                f"stream {self.names[s]!r} was read elsewhere before {where} began reading it "
                f"(by other DataLoader workers, or before a checkpoint), and {where} has no "
                "record of its place in it: reading it afresh would repeat examples. Keep the "
                "DataLoader's workers for the whole run (persistent_workers=True, one loader per "
                "sampler) and resume with torchdata's StatefulDataLoader, which restores each "
                "worker's place in every stream"
            )
        r = _Reader()
        if saved is None:
            self._start_pass(s, r, 0, None, 0)
        else:
            self._start_pass(s, r, int(saved[_PASS]), saved[_STATE], int(saved[_TAKEN]))
        self._readers[s] = r
        return r

    def _start_pass(self, s: int, r: _Reader, p: int, state: Any, taken: int) -> None:
        """Begin pass ``p`` of stream ``s`` in this process, at ``taken`` examples in (from a
        Hugging Face ``state`` when given, else by reading past them)."""
        src = self.sources[s]
        r.pass_, r.taken = p, 0
        if _is_hf_stream(src):
            from datasets.distributed import split_dataset_by_node

            # A copy per process and pass: its epoch and resume state are its own.
            ds = split_dataset_by_node(src, rank=self.rank, world_size=self.world_size)
            info = get_worker_info()
            if info is not None and ds.num_shards < info.num_workers:
                raise ValueError(
                    f"stream {self.names[s]!r} has {ds.num_shards} shard(s)"
                    + (f" on rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
                    + f", fewer than the DataLoader's {info.num_workers} workers: each worker "
                    "reads its own shards, so some would have none. Use at most "
                    f"{ds.num_shards} workers, or a stream with more shards (ds.reshard(), "
                    "to_iterable_dataset(num_shards=...))"
                )
            if state is not None:
                ds.load_state_dict(state)
            r.hf, r.it, r.taken = ds, iter(ds), taken
            return
        r.hf, r.it = None, iter(src)
        for _ in range(taken):  # no state of its own: read past the examples taken
            try:
                next(r.it)
            except StopIteration:
                raise RuntimeError(
                    f"stream {self.names[s]!r} ended after {r.taken} examples in {_where()}, "
                    f"while resuming at example {taken} of its pass {p}: it does not yield the "
                    "same examples on every iteration"
                ) from None
            r.taken += 1

    def _end(self, s: int, r: _Reader) -> Any:
        """Stream ``s`` ended in this process: restart it (a new pass) or raise."""
        name, where = self.names[s], _where()
        if r.taken == 0:
            raise ValueError(
                f"stream {name!r} yielded no example in {where} (pass {r.pass_}): a stream "
                "source must yield examples in every process that reads it"
            )
        if self.on_end == "raise":
            raise RuntimeError(
                f"stream {name!r} ended after {r.taken} examples in {where} (pass {r.pass_}) "
                "and on_stream_end='raise'. Pass on_stream_end='restart' to read it again, or "
                "fewer num_batches"
            )
        taken = r.taken
        self._start_pass(s, r, r.pass_ + 1, None, 0)
        try:
            return next(r.it)  # type: ignore[arg-type]
        except StopIteration:
            raise RuntimeError(
                f"stream {name!r} yielded {taken} examples in {where} in pass {r.pass_ - 1}, "
                f"and none when restarted for pass {r.pass_}"
            ) from None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """This process's place in every stream it read: plain Python values."""
        if self._pid != os.getpid():
            self._here()
        readers: dict[str, Any] = {}
        for s, saved in self._saved.items():
            readers[self.names[s]] = dict(saved)
        for s, r in self._readers.items():
            readers[self.names[s]] = {
                _PASS: r.pass_,
                _TAKEN: r.taken,
                _STATE: None if r.hf is None else r.hf.state_dict(),
            }
        return {
            _STREAMS: [self.names[s] for s in self.ids],
            _BEFORE: [self.names[s] for s in sorted(self._before)],
            _READERS: readers,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this process's place in the streams (from :meth:`state_dict`)."""
        if not isinstance(state, Mapping) or not {_STREAMS, _BEFORE, _READERS} <= set(state):
            raise ValueError(
                f"state should be a stream state with keys {[_STREAMS, _BEFORE, _READERS]}, "
                f"but got {state!r}"
            )
        mine = [self.names[s] for s in self.ids]
        if list(state[_STREAMS]) != mine:
            raise ValueError(
                f"state holds the streams {list(state[_STREAMS])}, but this dataset's streams "
                f"are {mine}"
            )
        index = {self.names[s]: s for s in self.ids}
        self._here()
        self._readers, self._loaded = {}, True
        self._before = frozenset(index[n] for n in state[_BEFORE])
        self._saved = {index[n]: v for n, v in state[_READERS].items()}
