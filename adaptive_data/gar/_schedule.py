"""Which training batches GAR keeps for a reward, which of their rows, and when each is due.

Held-out references reward a kept batch at its own step. Next-batch references reward it at
the next step, against the next batch's gradient; with a transform's un-augmented reference
batches (``reference_every``), kept augmented batches wait for the next reference batch and
every ``every``-th *augmented* batch is kept (counting steps would line the kept steps up
with the reference batches in every other epoch of odd length, and nothing would be
rewarded in those epochs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._mix import mix
from ..probe._keepers import KeptBatch
from ._budget import Budget

if TYPE_CHECKING:
    from ..sampling import GARSampler

__all__: list[str] = []


class Schedule:
    """The steps, the kept batches waiting for their reward, and the counters that decide
    which batches are kept (saved in GAR's state).

    Args:
        sampler: the sampler whose batches are kept (its ``reference_every`` and seed).
        budget: which batches are kept and how many of their rows are rewarded (an explicit
            ``every`` and ``rows``, or the cost budget's choices).
        next_batch: the reference is the next batch (else held-out batches).
    """

    def __init__(self, sampler: GARSampler, budget: Budget, next_batch: bool) -> None:
        self.sampler = sampler
        self.budget = budget
        self.next_batch = next_batch
        self.steps = 0  # step() calls made
        self.augmented = 0  # augmented batches seen (with reference batches)
        self.last_augmented: int | None = None
        self.pending: list[KeptBatch] = []  # kept batches whose rewards are not yet computed

    def keep(self, batch: int) -> KeptBatch | None:
        """A training forward of ``batch`` starts: a new :class:`KeptBatch` if its rewards are
        wanted. It replaces an earlier forward of the same batch before the same step (held
        as its ``earlier``, for when no backward reaches the new one) and is charged to the
        budget once."""
        again = any(k.batch == batch and k.step == self.steps for k in self.pending)
        if self.next_batch and self.sampler.reference_every:
            if self.sampler.is_reference(batch):
                return None  # the next-batch reference of the augmented batches before it
            if batch != self.last_augmented:
                self.last_augmented = batch
                self.augmented += 1
            count = self.augmented - 1
        else:
            count = self.steps
        weight = 1.0
        if not again:
            if not self.budget.wants(count):
                return None
            weight = self.budget.keep_weight(count)
            self.budget.charge_keep(self.sampler.batch_size)
        kept = KeptBatch(batch, self.steps)
        replaced = [k for k in self.pending if k.batch == batch]
        if replaced:
            kept.earlier = replaced[-1]
            weight = replaced[-1].weight
        kept.weight = weight
        self.pending = [k for k in self.pending if k.batch != batch]
        self.pending.append(kept)
        return kept

    def choose_rows(self, batch: int, n: int) -> Tensor | None:
        """The rows of batch ``batch`` (of ``n`` examples) that ``rows=`` or the budget
        rewards (None: all):
        a uniformly random subset of ``rows`` positions, sorted, drawn from ``(sampler seed,
        batch id, rank)``: the same in a resumed run, and every row equally likely."""
        rows = self.budget.chosen_rows(n)
        if rows is None:
            return None
        g = torch.Generator().manual_seed(mix(self.sampler.seed, 4, batch, self.sampler.rank))
        return torch.randperm(n, generator=g)[:rows].sort().values

    def due(self, last_batches: list[int]) -> tuple[list[KeptBatch], int]:
        """Take the kept batches whose reference is known at this step: held-out, those kept
        up to now; next-batch, those kept before this step (which waited for this step's
        gradient), unless this step's batch is augmented and they wait for a reference batch.
        Returns them and how many stale ones were dropped (they waited longer than
        ``reference_every`` steps: an epoch shorter than that has no reference batch)."""
        if not self.next_batch:
            return self._take(lambda k: k.step <= self.steps), 0
        dropped = 0
        wait = self.sampler.reference_every
        if wait:
            dropped = len(self.release(self._take(lambda k: self.steps - k.step > wait)))
            if last_batches and not self.sampler.is_reference(last_batches[-1]):
                return [], dropped  # this step's gradient is an augmented batch's
        return self._take(lambda k: k.step < self.steps), dropped

    def advance(self) -> None:
        """The step is over: count it, and give the budget its share."""
        self.steps += 1
        self.budget.tick()

    def drop_trained(self) -> int:
        """A step skipped for a non-finite ``.grad``: drop the batches trained at this step
        (batches kept earlier wait for the next step's gradient); returns how many."""
        return len(self.release(self._take(lambda k: k.step >= self.steps)))

    @staticmethod
    def release(kept: list[KeptBatch]) -> list[KeptBatch]:
        """Let go of what ``kept`` hold (rewarded or dropped); returns them."""
        for k in kept:
            k.release()
        return kept

    def _take(self, due: Any) -> list[KeptBatch]:
        taken = [k for k in self.pending if due(k)]
        self.pending = [k for k in self.pending if not due(k)]
        return taken

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "augmented": self.augmented,
            "last_augmented": self.last_augmented,
            "budget_state": self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.augmented = int(state["augmented"])
        last = state["last_augmented"]
        self.last_augmented = None if last is None else int(last)
        if state.get("budget_state") is not None:  # absent from states saved before budget=
            self.budget.load_state_dict(state["budget_state"])
        self.pending = []
