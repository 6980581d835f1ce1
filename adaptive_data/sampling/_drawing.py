"""Drawer: how a GARSampler draws its batches, one :class:`Record` at a time.

A batch is ``batch_size`` source choices from the drawing policy (the policy lag's copy,
:class:`LaggedPolicies`), then each chosen source's next examples in this rank's shard
(:class:`ShardOrder`), and, with a transform, one augmentation decision per example (none in
the un-augmented reference batches). Every random number comes from one generator, seeded
per epoch from ``(seed, epoch[, rank])``; ids count batches drawn since construction. A batch
drawn but never delivered is drawn again with the same id after :meth:`rewind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._mix import mix
from ..augment._policy import NO_AUGMENTATION
from ._lag import LaggedPolicies
from ._records import Decisions, Record
from ._shards import ShardOrder

if TYPE_CHECKING:
    from ..augment._policy import AugmentPolicy
    from ..policy._categorical import CategoricalPolicy

__all__ = ["Drawer"]


class Drawer:
    """Draws batches: the choice generator, the sources' shard positions, the drawing policies
    and the id of the next batch. Its state is part of the sampler's (:meth:`state_dict`)."""

    def __init__(
        self,
        shards: ShardOrder,
        lagged: LaggedPolicies,
        batch_size: int,
        reference_every: int | None,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.shards = shards
        self.lagged = lagged
        self.batch_size = batch_size
        self.reference_every = reference_every
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator()
        self.next_id = 0  # the id the next new batch gets
        self.drawn = 0  # batches drawn (a rewind gives them back)

    def new_epoch(
        self, epoch: int, policy: CategoricalPolicy, augment: AugmentPolicy | None
    ) -> None:
        """Seed the generator for ``epoch``; draw from the live policies (every update so far)."""
        self.lagged.sync(policy, augment)
        if self.world_size == 1:
            self.generator.manual_seed(mix(self.seed, 2, epoch))
        else:
            self.generator.manual_seed(mix(self.seed, 2, epoch, self.rank))

    def draw(self, epoch: int, position: int) -> Record:
        """Batch ``next_id``, at 1-based ``position`` of ``epoch`` (not yet counted: see
        :meth:`taken`).

        Source s's slots get its next examples in slot order. Cost: one multinomial, K list
        slices and one pass over the batch (about 10 us for B=64, K=3).
        """
        lagged, g, n = self.lagged, self.generator, self.batch_size
        lagged.catch_up(self.next_id)
        before = self.shards.position()
        src = lagged.policy.sample(n, g).tolist()
        take = self.shards.take
        chunks: list[Any] = [None] * len(self.shards.sizes)
        for s in set(src):
            chunks[s] = iter(take(s, src.count(s)))
        keys = list(map(next, map(chunks.__getitem__, src)))  # slot by slot, at C speed
        rec = Record(self.next_id, epoch, position, keys, src, before=before)
        if lagged.augment is not None:
            ops, bins, negate = lagged.augment.draw(n, g)
            seeds = torch.randint(0, 1 << 62, (n,), generator=g).tolist()
            if self.reference_every and position % self.reference_every == 0:
                rec.aug = Decisions([NO_AUGMENTATION] * n, [0] * n, [False] * n, seeds)
            else:
                rec.aug = Decisions(ops.tolist(), bins.tolist(), negate.tolist(), seeds)
        return rec

    def taken(self, rec: Record) -> None:
        """``rec`` was handed out: a new batch (not one drawn again) moves the ids on."""
        if rec.id >= self.next_id:
            self.next_id = rec.id + 1
            self.drawn += 1

    def rewind(self, rec: Record) -> bool:
        """Go back to just before ``rec`` was drawn (its id, the sources' positions, the
        count); ``False`` when it cannot (not drawn, or restored without its snapshot)."""
        if rec.before is None or rec.id >= self.next_id:
            return False
        self.shards.restore(*rec.before)
        self.drawn -= self.next_id - rec.id
        self.next_id = rec.id
        return True

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Under the sampler's state keys (its format predates this class)."""
        cursors, rounds = self.shards.position()
        return {
            "choice_generator": self.generator.get_state(),
            "rounds": rounds,
            "cursors": cursors,
            "next_id": self.next_id,
            "lag": self.lagged.state_dict(),
        }

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        drawn: int,
        policy: CategoricalPolicy,
        augment: AugmentPolicy | None,
    ) -> None:
        """Load :meth:`state_dict`'s keys of a sampler state; ``policy``/``augment`` are the
        live policies, already loaded (a state saved before the lag drew from them)."""
        self.generator.set_state(state["choice_generator"].clone())
        self.shards.restore(state["cursors"], state["rounds"])
        self.next_id = int(state["next_id"])
        self.drawn = drawn
        lagged = state.get("lag")
        if lagged is None:
            self.lagged.sync(policy, augment)
        else:
            self.lagged.load_state_dict(lagged, self.next_id)
