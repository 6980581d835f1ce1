"""Learner: the live policies of a GARSampler and how one batch's rewards update them.

A batch's rewards become sufficient statistics (per source and, with a transform, per op and
magnitude bin), summed over the ranks with one all-reduce, and applied to the live policies
at once; the same statistics go to the policy lag's queue (the sampler's :class:`Drawer`),
which applies them to the drawing copies at their fixed point. The learner also keeps what
is read back: the weights' history, each source's running mean reward, and (for metrics and
plots) each update's mean reward per source (thinned with the history), each source's count
of finite rewards and the update that last carried one (its age). All of it is in the
sampler's state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

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
        # Per update (thinned with the history): the mean raw reward per source (NaN for a
        # source without a finite reward in it); per source the finite rewards counted and
        # the update (1-based) that last carried one (0: none).
        self.rewards = History(k, limit=history_limit)
        self.reward_counts = [0] * k
        self.reward_last = [0] * k

    def load(
        self,
        history: Any,
        every: int | None,
        reward_means: Sequence[float],
        rewarded: int,
        rewards: Any = None,
        counts: Sequence[int] | None = None,
        last: Sequence[int] | None = None,
    ) -> None:
        """Restore what a state saved (checked before): the history (a row kept every
        ``every`` updates; ``None``: saved before the bound, every row), the running mean
        rewards, the count, and the per-update rewards with each source's count and last
        update (``None``: saved before they were; NaN rows, zeros)."""
        self.history.load(history, rewarded, every)
        self.reward_means = [float(v) for v in reward_means]
        self.rewarded = rewarded
        k = len(self.reward_means)
        if rewards is None:
            nan = torch.full((len(self.history), k), math.nan, dtype=torch.float64)
            rewards = [nan]
        self.rewards.load(rewards, rewarded, self.history.every)
        self.reward_counts = [0] * k if counts is None else [int(v) for v in counts]
        self.reward_last = [0] * k if last is None else [int(v) for v in last]

    def learn(
        self, rec: Record, rewards: list[float], rows: list[int] | None, weight: float = 1.0
    ) -> UpdateStatistics:
        """Update the live policies from batch ``rec``'s ``rewards`` (of its ``rows``, or of
        every example), summed over the ranks, the step scaled by ``weight``; returns the
        summed statistics (with the weight, for the drawing copies). Collective under
        ``torch.distributed``: raises when the ranks reward different batches."""
        sources = rec.sources if rows is None else [rec.sources[i] for i in rows]
        own = self.policy.statistics_of(sources, rewards)  # this rank's, for the means
        augment = None
        tf = self.transform
        if tf is not None and rec.aug is not None:
            ops, bins = rec.aug.ops, rec.aug.bins
            if rows is not None:
                ops, bins = [ops[i] for i in rows], [bins[i] for i in rows]
            augment = tf.policy.statistics_of(ops, bins, rewards)
        update = UpdateStatistics(own, augment, weight)
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
        self.policy.apply(update.sources, weight)
        if tf is not None and update.augment is not None:
            tf.policy.apply(update.augment, weight)
        self.rewarded += 1
        self._fold_reward_means(own.sums, own.counts)
        self.history.append([rec.id, *self.policy.probs_list()])
        means = []
        for src, (total, count) in enumerate(zip(own.sums, own.counts, strict=True)):
            means.append(total / count if count else math.nan)
            if count:
                self.reward_counts[src] += int(count)
                self.reward_last[src] = self.rewarded
        self.rewards.append(means)
        return update

    def _fold_reward_means(self, sums: Sequence[float], counts: Sequence[float]) -> None:
        """Running mean (momentum 0.9) of each source's finite raw rewards, for metrics()."""
        for src, (total, count) in enumerate(zip(sums, counts, strict=True)):
            if count:
                mean = total / count
                old = self.reward_means[src]
                self.reward_means[src] = mean if math.isnan(old) else 0.9 * old + 0.1 * mean

    def reward_ages(self) -> list[float]:
        """Per source, the updates since its last finite reward (0: the latest update carried
        one; NaN: none yet)."""
        return [math.nan if u == 0 else float(self.rewarded - u) for u in self.reward_last]

    def history_entries(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """:attr:`GARSampler.history`: ``{"batch", "weights", "rewards"}`` per entry, where
        ``rewards`` holds the update's mean raw reward per source (NaN where the update had
        none of that source, in the initial entry, and in the entries of a state saved before
        the rewards were)."""
        out: list[dict[str, Any]] = [
            {
                "batch": None,
                "weights": dict(zip(names, self.initial_weights, strict=True)),
                "rewards": dict.fromkeys(names, math.nan),
            }
        ]
        out += [
            {
                "batch": int(b),
                "weights": dict(zip(names, p, strict=True)),
                "rewards": dict(zip(names, r, strict=True)),
            }
            for (b, *p), r in zip(self.history.rows(), self.rewards.rows(), strict=True)
        ]
        return out
