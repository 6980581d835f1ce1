"""Learner: the live policies of a GARSampler and how one batch's rewards update them.

A batch's rewards become sufficient statistics (per source and, with a transform, per op and
magnitude bin), summed over the ranks with one all-reduce, and applied to the live policies
at once; the same statistics go to the policy lag's queue (the sampler's :class:`Drawer`),
which applies them to the drawing copies at their fixed point. The learner also keeps what
is read back: the weights' history and each source's running mean reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._distributed import Group
from ..policy._categorical import CategoricalPolicy
from ..policy._history import History
from ._lag import UpdateStatistics
from ._records import Record

if TYPE_CHECKING:
    from ..augment._transform import GARTransform

__all__ = ["Learner"]


class Learner:
    """The source policy (and the transform's), updated from rewards; its history and the
    sources' running mean rewards."""

    def __init__(
        self,
        policy: CategoricalPolicy,
        transform: GARTransform | None,
        group: Group,
        history_limit: int | None = None,
    ) -> None:
        self.policy = policy
        self.transform = transform
        self.group = group
        self.initial_weights = policy.probs_list()
        k = policy.num_choices
        # One row per update recorded (at most history_limit): [batch id, weights...].
        self.history = History(1 + k, limit=history_limit)
        self.reward_means = [math.nan] * k
        self.rewarded = 0  # batches rewarded

    def load(
        self, history: Any, every: int | None, reward_means: Sequence[float], rewarded: int
    ) -> None:
        """Restore what a state saved: the history (a row kept every ``every`` updates;
        ``None``: saved before the bound, every row), the running mean rewards, the count."""
        self.history.load(history, rewarded, every)
        self.reward_means = [float(v) for v in reward_means]
        self.rewarded = rewarded

    def learn(self, rec: Record, rewards: list[float], rows: list[int] | None) -> UpdateStatistics:
        """Update the live policies from batch ``rec``'s ``rewards`` (of its ``rows``, or of
        every example), summed over the ranks; returns the summed statistics. Collective
        under ``torch.distributed``: raises when the ranks reward different batches."""
        sources = rec.sources if rows is None else [rec.sources[i] for i in rows]
        own = self.policy.statistics_of(sources, rewards)  # this rank's, for the means
        augment = None
        tf = self.transform
        if tf is not None and rec.aug is not None:
            ops, bins = rec.aug.ops, rec.aug.bins
            if rows is not None:
                ops, bins = [ops[i] for i in rows], [bins[i] for i in rows]
            augment = tf.policy.statistics_of(ops, bins, rewards)
        update = UpdateStatistics(own, augment)
        group = self.group
        if group.active:
            # The batch ids ride along: all ranks must reward the same batch (all equal iff
            # W * sum(id^2) == sum(id)^2), else an update was skipped on some rank.
            summed = group.all_reduce_sum(
                [*update.flat(), float(rec.id), float(rec.id) ** 2], "GARSampler.update()"
            )
            total, total_sq = summed[-2], summed[-1]
            update = update.like(summed[:-2], None if tf is None else tf.policy)
            if group.world_size * total_sq != total * total:
                raise RuntimeError(
                    f"ranks disagree on which batch GARSampler.update() rewards: rank "
                    f"{group.rank} rewards batch {rec.id}, the ranks' mean is "
                    f"{total / group.world_size:g}. Every rank must update after the same "
                    "batches (skip an update on all ranks or on none)"
                )
        self.policy.apply(update.sources)
        if tf is not None and update.augment is not None:
            tf.policy.apply(update.augment)
        self.rewarded += 1
        self._fold_reward_means(own.sums, own.counts)
        self.history.append([rec.id, *self.policy.probs_list()])
        return update

    def _fold_reward_means(self, sums: Sequence[float], counts: Sequence[float]) -> None:
        """Running mean (momentum 0.9) of each source's finite raw rewards, for metrics()."""
        for src, (total, count) in enumerate(zip(sums, counts, strict=True)):
            if count:
                mean = total / count
                old = self.reward_means[src]
                self.reward_means[src] = mean if math.isnan(old) else 0.9 * old + 0.1 * mean

    def history_entries(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """:attr:`GARSampler.history`."""
        out: list[dict[str, Any]] = [
            {"batch": None, "weights": dict(zip(names, self.initial_weights, strict=True))}
        ]
        out += [
            {"batch": int(b), "weights": dict(zip(names, p, strict=True))}
            for b, *p in self.history.rows()
        ]
        return out
