"""What became of GAR's kept batches, and one warning when most of them bring no reward.

A loop can stop feeding the mixture without an error: every backward skipped, every
gradient non-finite (a NaN loss), every reward non-finite. GAR counts each kept batch's fate
by its reason (``metrics()["batches_dropped/<reason>"]``) and, when more than
:data:`DROP_SHARE` of the last :data:`WINDOW` kept batches brought no reward, warns once,
naming the reasons and the counters to read.
"""

from __future__ import annotations

import collections
import warnings

__all__: list[str] = []

WINDOW = 20  # kept batches looked at
DROP_SHARE = 0.5  # warn when more than this share of them brought no reward

# Why a kept batch brought no reward, by its counter's name: what each means for the user.
REASONS: dict[str, str] = {
    "no_backward": "no backward reached its training forward (a forward whose loss was "
    "never backpropagated, or a loop without loss.backward() before gar.step())",
    "nonfinite_grad": "the step's .grad held NaN or inf (a NaN loss, or a step a GradScaler "
    "skips), so the step was skipped",
    "nonfinite_rewards": "every reward was NaN or inf (finite gradients whose norms or "
    "products overflow, or a non-finite reference direction)",
    "stale": "it waited longer than the sampler's reference_every steps for a reference batch",
    "closed": "the GAR was closed, or a checkpoint was taken, before its step",
}


class DropWatch:
    """The fate of the last :data:`WINDOW` kept batches, and the warning (once per GAR)."""

    def __init__(self) -> None:
        self.recent: collections.deque[str] = collections.deque(maxlen=WINDOW)
        self.warned = False

    def rewarded(self) -> None:
        self.recent.append("rewarded")

    def dropped(self, reason: str, count: int = 1) -> None:
        """``count`` kept batches brought no reward, for ``reason`` (a key of REASONS)."""
        for _ in range(min(count, WINDOW)):
            self.recent.append(reason)
        self._check()

    def _check(self) -> None:
        if self.warned or len(self.recent) < WINDOW:
            return
        reasons = collections.Counter(r for r in self.recent if r != "rewarded")
        dropped = sum(reasons.values())
        if dropped <= DROP_SHARE * WINDOW:
            return
        self.warned = True
        why = "; ".join(
            f"{n} because {REASONS[reason]} (metrics()['batches_dropped/{reason}'])"
            for reason, n in reasons.most_common()
        )
        warnings.warn(
            f"{dropped} of the last {WINDOW} batches GAR kept brought no reward, so the "
            f"mixture does not learn from them: {why}. docs/howto-gar.md, 'When GAR learns "
            "nothing', lists the loop patterns behind each",
            UserWarning,
            stacklevel=5,  # the loop line that called gar.step()
        )
