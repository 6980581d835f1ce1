"""The batches a GARSampler drew: their keys, sources, augmentation decisions and flags.

A :class:`Record` is what the reward window keeps per batch, and what a state saves of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..augment._policy import NO_AUGMENTATION
from ._mixture_dataset import Decision, KeyBatch

__all__ = ["Decisions", "Record", "RewardWindow"]


@dataclass
class Decisions:
    """Augmentation decisions of one batch, one entry per example."""

    ops: list[int]  # op ids; NO_AUGMENTATION throughout in a reference batch
    bins: list[int]
    negate: list[bool]
    seeds: list[int]  # for torch's default generator while the example is fetched


@dataclass
class Record:
    id: int
    epoch: int
    position: int  # 1-based position of the batch in its epoch
    keys: list[int]  # [B] keys of sampler.dataset
    sources: list[int]  # [B] source ids
    rewarded: bool = False
    aug: Decisions | None = None  # when the sampler has a transform
    # Drawn but never delivered: the loop left its epoch before the batch arrived.
    lost: bool = False
    # Restored without keys (a rewarded or lost batch holds only its place in the window).
    was_reference: bool = False
    # The sources' cursors and rounds just before this batch was drawn: a pass that ends
    # before the batch reaches the loop rewinds the sampler to them.
    before: tuple[list[int], list[int]] | None = None

    @property
    def reference(self) -> bool:
        return self.was_reference or (self.aug is not None and self.aug.ops[0] == NO_AUGMENTATION)

    def spent_row(self, lost: bool) -> list[int]:
        """A rewarded or lost batch in a state: what keeps its place in the reward window."""
        return [self.id, self.epoch, self.position, self.rewarded, lost, self.reference]

    @classmethod
    def from_spent_row(cls, row: Sequence[int]) -> Record:
        i, epoch, position, rewarded, lost, reference = (int(v) for v in row)
        rec = cls(i, epoch, position, [], [], rewarded=bool(rewarded), lost=bool(lost))
        rec.was_reference = bool(reference)
        return rec

    def batch(self, sources: bool = True) -> list[Any]:
        """What the DataLoader gets: the keys (as a :class:`KeyBatch` with ``sources``), or
        one decision tuple per example."""
        a = self.aug
        if a is None:
            return KeyBatch(self.keys, self.sources) if sources else list(self.keys)
        return list(
            map(Decision._make, zip(self.keys, a.ops, a.bins, a.negate, a.seeds, strict=True))
        )

    def to_state(self) -> dict[str, Any]:
        d = {
            "id": self.id,
            "epoch": self.epoch,
            "position": self.position,
            "keys": torch.tensor(self.keys, dtype=torch.long),
            "sources": torch.tensor(self.sources, dtype=torch.long),
        }
        if self.aug is not None:
            d["ops"] = torch.tensor(self.aug.ops, dtype=torch.long)
            d["bins"] = torch.tensor(self.aug.bins, dtype=torch.long)
            d["negate"] = torch.tensor(self.aug.negate, dtype=torch.bool)
            d["seeds"] = torch.tensor(self.aug.seeds, dtype=torch.long)
        if self.before is not None:
            d["cursors_before"] = torch.tensor(self.before[0], dtype=torch.long)
            d["rounds_before"] = torch.tensor(self.before[1], dtype=torch.long)
        return d

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> Record:
        rec = cls(
            int(d["id"]),
            int(d["epoch"]),
            int(d["position"]),
            torch.as_tensor(d["keys"], dtype=torch.long).tolist(),
            torch.as_tensor(d["sources"], dtype=torch.long).tolist(),
        )
        if "ops" in d:
            rec.aug = Decisions(
                *(torch.as_tensor(d[k]).tolist() for k in ("ops", "bins", "negate", "seeds"))
            )
        if "cursors_before" in d:
            rec.before = (
                torch.as_tensor(d["cursors_before"]).tolist(),
                torch.as_tensor(d["rounds_before"]).tolist(),
            )
        return rec


class RewardWindow:
    """The last ``size`` batches drawn, by id, oldest first: the ones ``update(batch=)`` can
    still find. A batch that leaves it unrewarded is counted (:attr:`dropped_unrewarded`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._records: OrderedDict[int, Record] = OrderedDict()
        self.dropped_unrewarded = 0
        self._left_rewarded = False  # a rewarded batch has left the window

    def add(self, rec: Record) -> None:
        self._records[rec.id] = rec
        while len(self._records) > self.size:
            _, old = self._records.popitem(last=False)
            if not old.rewarded:
                self.dropped_unrewarded += 1
            else:
                self._left_rewarded = True

    def never_rewarded(self) -> bool:
        """Whether no batch this window has held was ever rewarded (``O(size)``)."""
        return not self._left_rewarded and not any(r.rewarded for r in self._records.values())

    def keep_at_least(self, size: int) -> None:
        """Hold at least the last ``size`` batches from now on (a loader that reads further
        ahead than ``reward_window`` allows)."""
        self.size = max(self.size, size)

    def get(self, batch: int) -> Record | None:
        return self._records.get(batch)

    def __getitem__(self, batch: int) -> Record:
        return self._records[batch]

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records.values())

    def forget_from(self, first: int) -> None:
        """Drop the batches with ids ``>= first`` (drawn again after a rewind)."""
        for i in [i for i in self._records if i >= first]:
            del self._records[i]

    def restore(self, records: Iterable[Record], dropped_unrewarded: int) -> None:
        """The window of a saved state (any order; kept by id)."""
        self._records = OrderedDict((r.id, r) for r in sorted(records, key=lambda r: r.id))
        self.dropped_unrewarded = dropped_unrewarded
