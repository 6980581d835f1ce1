"""The policy lag of a GARSampler: batch ``t`` is drawn from the updates of batches ``<= t - lag``.

A DataLoader with workers draws batches ahead of the loop (``num_workers * prefetch_factor``
of them), so "the policy as it is when the batch is drawn" would depend on the worker count and
on timing. :class:`LaggedPolicies` keeps the copies of the sampler's policies that batches are
drawn from and applies each batch's update to them at a fixed point, just before batch
``id + lag`` is drawn, in batch order: the same seed then draws the same batches with any
loader that delivers each batch's rewards before its fixed point, and an update that arrives
later is refused (:meth:`check_on_time`) instead of being applied at a point that depends on
the loader.

The live policies (``sampler.weights``, ``transform.policy.op_weights``) take every update as soon
as it arrives; the copies here catch up with them at the fixed points. At the start of every
pass (epoch) the copies are set to the live policies, so a pass left early (a ``break``, whose
prefetched batches the loop never received) leaves nothing that depends on the worker count.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._check import check_int
from ..policy import _fields as f
from ..policy._categorical import (
    STATS_HEAD,
    CategoricalPolicy,
    ChoiceStatistics,
    parse_policy_state,
)

if TYPE_CHECKING:
    from ..augment._policy import AugmentPolicy, AugmentStatistics

__all__ = ["DEFAULT_LAG", "LaggedPolicies", "UpdateStatistics", "fitted_lag", "lag_needed"]

DEFAULT_LAG = 8
"""The smallest lag ``GARSampler(lag=None)`` (the default) uses: it covers a loader that reads up
to 6 batches ahead of the loop when rewards come one batch late (next-batch references), 7 when
they come at once (a held-out reference): e.g. 2 workers at the default prefetch factor behind
accelerate's one-batch read-ahead (5). Measured to cost nothing beyond the seeds' spread
(docs/howto-mixture.md). A loader that reads further ahead gets the lag it needs
(:func:`fitted_lag`)."""

WRAPPER_READ_AHEAD = 1
"""Batches a wrapper around the DataLoader may read ahead beyond its prefetch, which the fitted
lag leaves room for (accelerate's prepared loaders read one)."""


def lag_needed(read_ahead: int, reward_delay: int) -> int:
    """The smallest lag for a loader ``read_ahead`` batches ahead of the loop whose rewards
    arrive ``reward_delay`` deliveries after their batch: the draw of batch ``t + read_ahead +
    reward_delay`` happens before batch ``t``'s rewards, so the lag must exceed that."""
    return read_ahead + reward_delay + 1


def fitted_lag(depth: int, reward_delay: int | None) -> int:
    """The lag ``GARSampler(lag=None)`` takes for a pass of a loader whose public settings
    prefetch ``depth`` batches (``num_workers * prefetch_factor``): room for that depth, one
    wrapper's read-ahead and the reward delay (1 while no rewarder announced it), and never
    less than :data:`DEFAULT_LAG`."""
    delay = 1 if reward_delay is None else reward_delay
    return max(DEFAULT_LAG, lag_needed(depth + WRAPPER_READ_AHEAD, delay))


@dataclass(frozen=True)
class UpdateStatistics:
    """One update's sufficient statistics: the source policy's and (with a transform) the
    augmentation policy's, as their ``statistics()`` methods return them."""

    sources: ChoiceStatistics
    augment: AugmentStatistics | None = None
    weight: float = 1.0  # the updates it stands for (GARSampler.update's weight)

    def flat(self) -> list[float]:
        """One list (what an all-reduce takes)."""
        return self.sources.flat() + ([] if self.augment is None else self.augment.flat())

    def like(
        self, flat: list[float], augment_policy: AugmentPolicy | None = None
    ) -> UpdateStatistics:
        """Statistics of the same shape as these, read from ``flat`` (an all-reduced
        :meth:`flat`); ``augment_policy`` reads the augmentation part."""
        k = self.sources.num_choices
        width = len(self.sources.flat())
        sources = ChoiceStatistics.from_flat(flat[:width], k)
        if self.augment is None:
            return UpdateStatistics(sources, weight=self.weight)
        if augment_policy is None:
            raise ValueError("statistics with an augmentation part need augment_policy")
        augment = augment_policy.statistics_from_flat(flat[width:])
        return UpdateStatistics(sources, augment, self.weight)


def check_lag(state: Mapping[str, Any], lag: int | None) -> None:
    """Raise if a :meth:`LaggedPolicies.state_dict` was saved with another lag (``None``: a
    lag fitted to the loader, which takes the saved one)."""
    if lag is not None and state["lag"] != lag:
        raise ValueError(
            f"state has lag={int(state['lag'])}, but this sampler has lag={lag}: the "
            "batches drawn after the checkpoint depend on it"
        )


class LaggedPolicies:
    """The policies a :class:`GARSampler` draws from, and the updates waiting for their fixed
    point (``batch id + lag``). Holds copies: the live policies are the sampler's and the
    transform's own.

    ``lag=None`` fits the lag to the loader (:attr:`fitted`): :meth:`fit` raises it at the
    start of a tracked pass whose loader needs more, and an update that comes later than the
    lag allows raises it instead of being refused (raising it only postpones the updates
    still waiting, so no draw is ever made from an update it should not see)."""

    def __init__(
        self, lag: int | None, policy: CategoricalPolicy, augment: AugmentPolicy | None = None
    ) -> None:
        self.fitted = lag is None
        if lag is not None:
            check_int("lag", lag, minimum=1, what="None or an int >= 1")
        self.lag = DEFAULT_LAG if lag is None else lag
        self.policy = copy.deepcopy(policy)
        self.augment = None if augment is None else copy.deepcopy(augment)
        self._queued: dict[int, UpdateStatistics] = {}  # batch id -> its update, not yet applied
        # The live policies, and how often they were loaded when last seen: one loaded from
        # outside the sampler (a user setting the weights) is copied at the next draw.
        self._live = (policy, augment)
        self._loads = self._live_loads()

    def _live_loads(self) -> tuple[int, int]:
        policy, augment = self._live
        return policy.loads, 0 if augment is None else augment.loads

    def __len__(self) -> int:
        """Updates waiting for their fixed point."""
        return len(self._queued)

    @property
    def setting(self) -> int | None:
        """The ``lag=`` it was made with: ``None`` when fitted to the loader, else the lag."""
        return None if self.fitted else self.lag

    def fit(self, lag: int) -> None:
        """A loader (when its pass starts, or at a delivery) or a late update needs ``lag``: a
        fitted lag grows to it, at points that do not depend on timing; a fixed one is left
        as it is. It never shrinks, so a pass resumed from a state continues with the lag the
        state was drawn with."""
        if self.fitted:
            self.lag = max(self.lag, lag)

    def check_on_time(self, batch: int, next_id: int) -> None:
        """Raise if the update of ``batch`` comes too late: batch ``batch + lag`` (the first one
        drawn from it) was already drawn, ``next_id`` being the id the sampler draws next. A
        fitted lag grows to ``next_id - batch`` instead."""
        self.fit(next_id - batch)  # a fitted lag grows; a fixed one is checked
        if batch + self.lag < next_id:
            raise RuntimeError(
                f"the rewards of batch {batch} arrived after batch {batch + self.lag} was "
                f"drawn: with lag={self.lag} batch {batch + self.lag} is drawn from the updates "
                f"of batches up to {batch}, so these rewards would change draws that depend on "
                "how far the loader reads ahead. The sampler had drawn up to batch "
                f"{next_id - 1}: pass GARSampler(lag={next_id - batch}) or more, lag=None (fitted "
                "to the loader), or reward batches sooner (docs/howto-mixture.md, 'The policy "
                "lag')"
            )

    def queue(self, batch: int, stats: UpdateStatistics) -> None:
        """Hold the update of ``batch`` until batch ``batch + lag`` is drawn."""
        self._queued[batch] = stats

    def catch_up(self, next_id: int) -> None:
        """Before batch ``next_id`` is drawn: apply the waiting updates of batches
        ``<= next_id - lag``, in batch order; a live policy loaded from outside since the last
        draw replaces the copy (with every update received so far)."""
        if self._live_loads() != self._loads:
            self.sync(*self._live)
        for b in self._due(next_id):
            stats = self._queued.pop(b)
            self.policy.apply(stats.sources, stats.weight)
            if self.augment is not None and stats.augment is not None:
                self.augment.apply(stats.augment, stats.weight)

    def peek(self, next_id: int) -> list[float]:
        """The source probabilities batch ``next_id`` will be drawn from, if no other update
        arrives before it; changes nothing."""
        if self._live_loads() != self._loads:  # the next draw copies the live policy
            return self._live[0].probs_list()
        policy = copy.deepcopy(self.policy)
        for b in self._due(next_id):
            policy.apply(self._queued[b].sources, self._queued[b].weight)
        return policy.probs_list()

    def _due(self, next_id: int) -> list[int]:
        """The waiting updates to apply before batch ``next_id`` is drawn, in batch order."""
        return sorted(b for b in self._queued if b <= next_id - self.lag)

    def sync(self, policy: CategoricalPolicy, augment: AugmentPolicy | None) -> None:
        """A new pass: draw from the live policies (every update received so far)."""
        self.policy.load_state_dict(policy.state_dict())
        if self.augment is not None and augment is not None:
            self.augment.load_state_dict(augment.state_dict())
        self._queued.clear()
        self._loads = self._live_loads()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The drawing policies and the waiting updates (torch tensors and Python values)."""
        ids = sorted(self._queued)
        return {
            "lag": self.lag,
            "policy": self.policy.state_dict(),
            "augment": None if self.augment is None else self.augment.state_dict(),
            "queued_ids": torch.tensor(ids, dtype=torch.long),
            "queued_sources": torch.tensor(
                [self._queued[b].sources.flat() for b in ids], dtype=torch.float64
            ),
            "queued_augment": [
                None
                if (aug := self._queued[b].augment) is None
                else torch.tensor(aug.flat(), dtype=torch.float64)
                for b in ids
            ],
            "queued_weights": torch.tensor(
                [self._queued[b].weight for b in ids], dtype=torch.float64
            ),
        }

    def parse(
        self, state: Any, path: str = "state", next_id: int | None = None
    ) -> tuple[int, Any, Any, dict[int, UpdateStatistics]]:
        """Check a :meth:`state_dict` for these policies (the batches drawn so far counted by
        ``next_id``, if known): every field, the lag against a fixed one, the policies'
        settings. Returns what :meth:`load_state_dict` sets; changes nothing."""
        state = f.mapping(path, state)
        for key in ("lag", "policy", "augment", "queued_ids", "queued_sources", "queued_augment"):
            f.field(state, key, path)
        lag = f.integer(f"{path}['lag']", state["lag"], lo=1)
        if not self.fitted:
            check_lag(state, self.lag)
        policy = parse_policy_state(
            state["policy"], f"{path}['policy']", self.policy, "this sampler"
        )
        augment = None
        if (state["augment"] is None) != (self.augment is None):
            raise ValueError(
                f"{path}['augment'] is "
                + ("None" if state["augment"] is None else "an augmentation policy's state")
                + ", but this sampler has "
                + ("one" if self.augment is not None else "none")
            )
        if self.augment is not None:
            self.augment.check_state(state["augment"], f"{path}['augment']")
            augment = state["augment"]
        hi = None if next_id is None else next_id - 1
        ids = f.integers(f"{path}['queued_ids']", state["queued_ids"], lo=0, hi=hi)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}['queued_ids'] should be distinct, but got {ids}")
        k = self.policy.num_choices
        raw = state["queued_sources"]
        if not ids and isinstance(raw, torch.Tensor) and raw.shape == (0,):
            raw = raw.reshape(0, STATS_HEAD + 2 * k)  # none queued, as state_dict() saves it
        sources = f.tensor(
            f"{path}['queued_sources']", raw, torch.float64, (len(ids), STATS_HEAD + 2 * k)
        )
        weights = [1.0] * len(ids)  # absent from states saved before update(weight=)
        if "queued_weights" in state:
            weights = f.tensor(
                f"{path}['queued_weights']", state["queued_weights"], torch.float64, (len(ids),)
            ).tolist()
            bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
            if bad:
                raise ValueError(
                    f"{path}['queued_weights'] should hold finite numbers > 0, but got {bad[0]!r}"
                )
        queued_augment = state["queued_augment"]
        if not isinstance(queued_augment, list | tuple) or len(queued_augment) != len(ids):
            raise f.refuse(
                f"{path}['queued_augment']", f"a list of {len(ids)} entries", queued_augment
            )
        queued = {}
        for i, (b, aug) in enumerate(zip(ids, queued_augment, strict=True)):
            where = f"{path}['queued_sources'][{i}]"
            stats = check_statistics(where, sources[i].tolist(), k)
            part = None
            if (aug is None) != (self.augment is None):
                raise ValueError(
                    f"{path}['queued_augment'][{i}] should be "
                    + (
                        "None: this sampler has no transform"
                        if self.augment is None
                        else "a Tensor"
                    )
                    + f", but got {f.describe(aug)}"
                )
            if self.augment is not None:
                width = self.augment.statistics_width
                flat = f.tensor(
                    f"{path}['queued_augment'][{i}]", aug, torch.float64, (width,)
                ).tolist()
                part = self.augment.statistics_from_flat(flat)
                for j, one in enumerate((part.ops, *part.magnitudes)):
                    check_statistics(
                        f"{path}['queued_augment'][{i}] (part {j})", one.flat(), one.num_choices
                    )
            queued[b] = UpdateStatistics(stats, part, weights[i])
        return lag, policy, augment, queued

    def load_state_dict(self, state: Mapping[str, Any], next_id: int | None = None) -> None:
        """Restore a :meth:`state_dict`; the whole state is checked first (:meth:`parse`), so
        a refused one changes nothing."""
        lag, policy, augment, queued = self.parse(state, "state", next_id)
        if self.fitted:
            self.lag = lag  # the pass resumes with its lag; the next pass refits
        self.policy._load_parsed(*policy)
        if self.augment is not None:
            self.augment.load_state_dict(augment)
        self._queued = queued
        self._loads = self._live_loads()  # the sampler loaded the live policies just before


def check_statistics(path: str, flat: list[float], k: int) -> ChoiceStatistics:
    """A :meth:`ChoiceStatistics.flat` list of ``k`` choices read back, with its counts
    (non-finite rewards, finite ones, per choice) whole, non-negative and adding up. The sums
    may be infinite or NaN: finite rewards near float64's limit overflow them."""
    counts = [flat[0], flat[1], *flat[STATS_HEAD + k :]]
    if any(not (math.isfinite(c) and c >= 0 and c == int(c)) for c in counts) or (
        math.fsum(flat[STATS_HEAD + k :]) != flat[1]
    ):
        raise ValueError(
            f"{path} should hold whole, non-negative counts (entries 0, 1 and the last {k}), "
            f"the per-choice counts adding up to entry 1, but holds {flat}"
        )
    return ChoiceStatistics.from_flat(flat, k)
