"""ReferenceBatches: an endless stream of batches from a target split, for the probe's reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import default_collate

from .._check import check_int
from .._mix import mix
from ._streams import is_stream

__all__ = ["ReferenceBatches"]

_STATE_VERSION = 1


class ReferenceBatches:
    """Endless iterator of batches drawn from one map-style dataset (the target split).

    ``next(ref)`` returns ``collate_fn`` of ``batch_size`` examples. Examples are drawn
    without replacement in a shuffled order, reshuffled (a new permutation seeded from
    ``(seed, pass)``) each time the dataset is used up; a batch can straddle two passes. All
    randomness comes from that seeding: no global RNG is read or advanced, so training is
    unaffected. Uses the dataset's ``__getitems__`` where it has one. Cost: one fetch of
    ``batch_size`` examples and one collate per call, in the calling process.

    Typical use, with a dataset of ``(x, y)`` pairs or of Hugging Face style dicts::

        ref = ReferenceBatches(val_set, batch_size=128, seed=0)
        r = probe(x, y, reference=next(ref))

    Args:
        dataset: map-style dataset (``__getitem__`` and ``__len__``), not empty.
        batch_size: examples per batch (>= 1); may exceed ``len(dataset)``.
        seed: seeds the shuffling.
        collate_fn: turns a list of examples into a batch (default: ``default_collate``:
            a dataset of pairs gives ``[x, y]``, a dataset of dicts a dict of batched values,
            e.g. ``{"input_ids": ..., "labels": ...}``). The probe and ``GAR`` split a dict
            batch with :func:`split_batch` (target under ``"labels"``); for other key names,
            map the stream through ``split_batch(b, target_key=...)``.
        device: if given, every tensor of the batch is moved there (``non_blocking``).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if is_stream(dataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise TypeError(
                "dataset should be map-style (__getitem__ and __len__), "
                f"but got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("dataset is empty (len 0)")
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed)
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn should be callable, but got {type(collate_fn).__name__}")
        if collate_fn is None:
            _check_collatable(dataset[0])
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.device = torch.device(device) if device is not None else None
        self._n = len(dataset)
        self._pass = 0
        self._cursor = 0
        self._perm: torch.Tensor | None = None

    def __iter__(self) -> ReferenceBatches:
        return self

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(mix(self.seed, 3, self._pass))
            self._perm = torch.randperm(self._n, generator=g)
        return self._perm

    def next_indices(self) -> list[int]:
        """The dataset indices of the next batch (advances the stream like ``next``)."""
        out: list[int] = []
        need = self.batch_size
        while need:
            perm = self._order()
            take = perm[self._cursor : self._cursor + need].tolist()
            out += take
            need -= len(take)
            self._cursor += len(take)
            if self._cursor == self._n:
                self._pass += 1
                self._cursor = 0
                self._perm = None
        return out

    def __next__(self) -> Any:
        idx = self.next_indices()
        getitems = getattr(self.dataset, "__getitems__", None)
        examples = getitems(idx) if getitems else [self.dataset[i] for i in idx]
        batch = self.collate_fn(examples)
        if self.device is not None:
            batch = _to(batch, self.device)
        return batch

    @property
    def passes(self) -> float:
        """How many times the dataset has been gone through (fractional)."""
        return self._pass + self._cursor / self._n

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "seed", "size", "pass", "cursor"}``: resumes the exact stream."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "size": self._n,
            "pass": self._pass,
            "cursor": self._cursor,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises, naming the key, if it was made for another
        dataset size or seed or holds a position outside the stream (nothing is applied)."""
        self.check_state(state)
        self._pass, self._cursor, self._perm = state["pass"], state["cursor"], None

    def check_state(self, state: Any) -> None:
        """Raise, naming the key, unless :meth:`load_state_dict` would take ``state``; changes
        nothing."""
        version = state.get("version") if isinstance(state, Mapping) else None
        if isinstance(version, bool) or version != _STATE_VERSION:
            raise ValueError(f"not a ReferenceBatches state of version {_STATE_VERSION}: {state!r}")
        missing = [k for k in ("seed", "size", "pass", "cursor") if k not in state]
        if missing:
            raise ValueError(f"ReferenceBatches state lacks the key(s) {missing}")
        for key in ("seed", "size", "pass", "cursor"):
            check_int(f"state's {key}", state[key])
        if state["size"] != self._n or state["seed"] != self.seed:
            raise ValueError(
                f"state was saved for size={state['size']}, seed={state['seed']}, but this stream "
                f"has size={self._n}, seed={self.seed}"
            )
        cursor, passes = state["cursor"], state["pass"]
        if not 0 <= cursor < self._n or passes < 0:
            raise ValueError(
                f"state holds an invalid position: pass={passes}, cursor={cursor} (cursor "
                f"should be in [0, {self._n}) and pass >= 0)"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(len(dataset)={self._n}, batch_size={self.batch_size}, "
            f"seed={self.seed}, passes={self.passes:.2f})"
        )


def _check_collatable(example: Any) -> None:
    """Refuse rows that ``default_collate`` would batch into something other than tensors: a
    dict row holding Python lists (a Hugging Face split without ``with_format("torch")``) is
    batched position by position into a list of tensors, which no model takes."""
    if not isinstance(example, Mapping):
        return
    lists = [k for k, v in example.items() if isinstance(v, list)]
    if lists:
        raise TypeError(
            f"ReferenceBatches' dataset gives rows whose {lists[0]!r} is a Python list, which "
            "default_collate batches position by position instead of into one tensor: a "
            "Hugging Face split needs .with_format('torch', columns=[...]) first (or pass a "
            "collate_fn that builds the tensors)"
        )


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch
