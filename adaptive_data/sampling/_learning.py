"""Learner: the live policies of a GARSampler and how one batch's rewards update them.

A batch's rewards become sufficient statistics (per source and, with a transform, per op and
magnitude bin), summed over the ranks with one all-reduce, and applied to the live policies
at once; the same statistics go to the policy lag's queue (the sampler's :class:`Drawer`),
which applies them to the drawing copies at their fixed point. The learner also keeps what
is read back: the weights' history, each source's running mean reward, and (for metrics and
plots) each update's mean reward per source with each source's reward count and age.
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

__all__ = ["Learner", "RewardTrack"]


class RewardTrack:
    """Each update's mean raw reward per source (NaN for a source without a finite reward in
    it), and per source the count of finite rewards and the update that last carried one.

    What :meth:`GARSampler.metrics` reports as ``reward_count/`` and ``reward_age/`` and what
    :attr:`GARSampler.history` holds as ``rewards``, so a running mean that has not moved for
    many updates (a source rarely drawn) is not read as current. Kept in memory, not in the
    sampler's state: it starts at the update a state was loaded at (``start``)."""

    def __init__(self, num_sources: int, start: int) -> None:
        self.start = start  # updates (history rows) before the first one tracked
        self.rows = History(num_sources)
        self.counts = [0] * num_sources
        self.last: list[int | None] = [None] * num_sources  # update number, 1-based

    def add(self, update: int, sums: Sequence[float], counts: Sequence[float]) -> None:
        means = []
        for src, (total, count) in enumerate(zip(sums, counts, strict=True)):
            means.append(total / count if count else math.nan)
            if count:
                self.counts[src] += int(count)
                self.last[src] = update
        self.rows.append(means)

    def ages(self, updates: int) -> list[float]:
        """Updates since each source's last finite reward (0: the latest update carried
        one); NaN for a source without one since the track started."""
        return [math.nan if u is None else float(updates - u) for u in self.last]


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
        self._track = RewardTrack(k, 0)
        self._track_means = self.reward_means  # the list a load replaces (see track)

    @property
    def track(self) -> RewardTrack:
        """The reward track since this learner was built or its state was loaded. A load
        replaces the history and the ``reward_means`` list: a track begun before it no longer
        lines up with the history's rows, so a new one starts at the loaded history's end."""
        if self.reward_means is not self._track_means or len(self.history) != (
            self._track.start + len(self._track.rows)
        ):
            self._track = RewardTrack(self.policy.num_choices, len(self.history))
            self._track_means = self.reward_means
        return self._track

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
        track = self.track  # checked against the history before a row is added to either
        self.rewarded += 1
        self._fold_reward_means(own.sums, own.counts)
        self.history.append([rec.id, *self.policy.probs_list()])
        track.add(len(self.history), own.sums, own.counts)
        return update

    def _fold_reward_means(self, sums: Sequence[float], counts: Sequence[float]) -> None:
        """Running mean (momentum 0.9) of each source's finite raw rewards, for metrics()."""
        for src, (total, count) in enumerate(zip(sums, counts, strict=True)):
            if count:
                mean = total / count
                old = self.reward_means[src]
                self.reward_means[src] = mean if math.isnan(old) else 0.9 * old + 0.1 * mean

    def reward_ages(self) -> list[float]:
        """Per source, the updates since its last finite reward (NaN: none since the
        learner was built or loaded)."""
        return self.track.ages(len(self.history))

    def reward_counts(self) -> list[int]:
        """Per source, the finite rewards received since the learner was built or loaded."""
        return list(self.track.counts)

    def history_entries(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """:attr:`GARSampler.history`: ``{"batch", "weights", "rewards"}`` per entry, where
        ``rewards`` holds the update's mean raw reward per source (NaN where the update had
        none of that source, and for the updates before the track began: the initial
        entry, and those restored from a state)."""
        track = self.track
        missing = dict.fromkeys(names, math.nan)
        out: list[dict[str, Any]] = [
            {
                "batch": None,
                "weights": dict(zip(names, self.initial_weights, strict=True)),
                "rewards": dict(missing),
            }
        ]
        rewards = [dict(missing) for _ in range(track.start)]
        rewards += [dict(zip(names, r, strict=True)) for r in track.rows.rows()]
        out += [
            {"batch": int(b), "weights": dict(zip(names, p, strict=True)), "rewards": r}
            for (b, *p), r in zip(self.history.rows(), rewards, strict=True)
        ]
        return out
