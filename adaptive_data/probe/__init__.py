"""The reward engine and its probe.

* ``rules/``: one :class:`GhostRule` per layer family (the dot, the norms, the rows);
* ``_plan``, ``_layout``: which module covers which parameter, and where each holds the batch;
* ``_calls``, ``_capture``: one call of a covered module, and the hooks that capture calls;
* ``_direction``, ``_precondition``: where ``D`` comes from (:class:`DirectionSource`);
* ``_estimators``: how a probe computes a batch's rewards (ghost, jvp, per_sample, fd, head);
* ``_keepers``, ``_fd``: the estimators' side of a training loop (``GAR``), and the one
  central difference;
* ``_probe``: :class:`GradientProbe`, the front door for a batch at hand.
"""

from ._probe import ESTIMATORS, REWARDS, GradientProbe

__all__ = ["ESTIMATORS", "REWARDS", "GradientProbe"]
