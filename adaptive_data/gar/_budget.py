"""GAR's cost budget: which batches, how many of their rows and how fresh a reference gradient
the rewards get, for a counted share of the training step's work.

A :class:`Budget` runs in two phases, and an explicit ``every``, ``rows`` or
``reference_refresh`` replaces its choice of that setting in both:

* **While the evidence is thin** (the first :data:`WARMUP` rewarded batches): every batch,
  every row, a fresh reference gradient, the exact GAR, so a short run or a small reference
  batch learns what every-step rewards learn. This phase is outside the budget (it costs
  what the exact GAR costs for those steps).
* **Then, within the budget**: a quarter of each rewarded batch's rows (at least
  :data:`MIN_ROWS`); the reference gradient reused for as many steps as keep its share of
  the cost at half the budget (``2 R / (B budget)`` steps for ``R`` reference rows and
  batches of ``B``, at most :data:`MAX_REFRESH`); and the batches to reward chosen by a
  token bucket: every ``step()`` adds ``budget`` training steps' worth of credit, a training
  forward is kept when the credit is not negative, and its estimated cost is charged at
  once (a fresh reference gradient when it is computed). Over the run the estimated cost of
  this phase stays within ``budget`` per step, plus the one batch charged ahead.

The costs are estimates from counted work (rows, batch sizes), never from wall-clock time,
so a run's choices are a function of its seed, its data and its counts: the same with any
worker count, and the same after a resume (the state is in GAR's ``state_dict()``). The
estimates are in units of one training step (the forward and backward of one batch):
:data:`KEEP_COSTS` holds, per estimator and reward, the cost of keeping a batch (hooks that
store its activations and output gradients) and of rewarding all of its rows; a fresh
reference gradient of ``R`` rows costs ``R / B`` (its own forward and backward).

What the budget measures is reported in ``gar.metrics()``, not acted on: the per-row contrast
between the sources' mean rewards (a one-way analysis of variance of each rewarded batch) and
the cosine between successive fresh reference gradients. Both were tried as signals: ending
the exact phase once the summed contrast was clear let one obviously bad source end it after a
few batches, and more short runs then missed the clean source than with exact rewards
(``short_horizon.py``); the cosine is dominated by the reference batch's sampling noise (far
from 1 tens of steps apart on the Fashion-MNIST mixture, where reusing the gradient for 32
steps loses nothing), so it cannot tell when reuse is safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._check import check_number
from ..probe._sharding import Shards

__all__: list[str] = []

AUTO = "auto"
"""``GAR(budget=)``'s default: :data:`DEFAULT_BUDGET` with a held-out reference,
:data:`NEXT_BATCH_BUDGET` with the next batch as the reference (:func:`resolve_budget`)."""

DEFAULT_BUDGET = 0.1
"""``budget="auto"`` with a held-out reference (a mixture): the rewards' estimated work is at
most a tenth of the training step's, half of it on the reference gradient
(docs/howto-gar.md, "The cost budget", has what it gives on the benchmarks)."""

NEXT_BATCH_BUDGET = 0.02
"""``budget="auto"`` with the next batch as the reference (an augmentation policy over one
source): its rewards teach a policy whose learning gained no more than the seeds' spread over
its frozen control in ``benchmarks/augment_study.py`` (docs/howto-augment.md), so they get a
smaller share (on digits it kept +0.59 points of exact rewards' +0.89 over that control, for
1.06x the control's wall time against 1.22x: ``augment_study_line.json``). With what GAR
does at every step, kept or not (1.01x the 7 ms step of ``gar_cost.py``'s MLP), the whole
stays within 1.05x a plain step there (``gar_cost_defaults_mlp.json``, beside 0.03, 0.05
and 0.1)."""

KEEP_COSTS: Mapping[tuple[str, str], tuple[float, float]] = {
    ("ghost", "cosine"): (0.25, 0.75),
    ("ghost", "dot"): (0.25, 0.5),
    ("fd", "dot"): (0.05, 0.67),
}
"""``(keep, all rows)``: the estimated cost of keeping a batch for a reward, and of rewarding
all of its rows (``r`` of ``B`` rows cost ``r / B`` of it), in training steps. Set from
``benchmarks/gar_cost.py`` and ``benchmarks/lm_cost.py`` (the ghost estimator's cosine: the
capture, then a dot product and a norm per example, about as much work as a backward of the
covered layers; the fd estimator: two forwards of the rewarded rows)."""

WARMUP = 16
"""Rewarded batches of the first, exact phase."""

ROWS_SHARE = 4
"""The budget rewards ``B // ROWS_SHARE`` rows of a batch of ``B`` (at least :data:`MIN_ROWS`)."""

MIN_ROWS = 32
"""The fewest rows the budget rewards in a batch (a batch of fewer rows is rewarded whole). A
weighted update of few rows lets the one or two rows of a rarely drawn source swing the
mixture: with 16 of 32 rows the demo's seed 1 ended on its pixel-noise source (clean 0.02,
``adaptive-data demo --seed 1`` at commit 94f3904), with 32 on the clean one (0.98), and the
Fashion-MNIST mixture (batches of 64) gave the same accuracy with 16 or 32
(docs/benchmark-log.md, "The cost budget")."""

REFERENCE_SHARE = 0.5
"""The share of the budget the reference gradient's refreshes may take."""

MAX_REFRESH = 64
"""The longest the budget reuses a reference gradient, in steps."""

MAX_WEIGHT = 8
"""The most updates one kept batch's rewards stand for in the second phase (see
:meth:`Budget.keep_weight`)."""

SMOOTHING = 0.2
"""Weight of each rewarded batch in the smoothed per-row contrast (``gar.metrics()``)."""


def check_budget(budget: Any, prefix: str = "") -> None:
    """Raise unless ``budget`` is ``"auto"``, None or a finite number > 0 (a share of a
    training step)."""
    if budget is not None and not (isinstance(budget, str) and budget == AUTO):
        check_number(f"{prefix}budget", budget, positive=True, what="'auto', None or a number > 0")


def resolve_budget(budget: float | str | None, next_batch: bool) -> float | None:
    """The budget a (checked) ``budget=`` stands for: ``"auto"`` is :data:`NEXT_BATCH_BUDGET`
    with the next batch as the reference, else :data:`DEFAULT_BUDGET`."""
    if isinstance(budget, str):
        return NEXT_BATCH_BUDGET if next_batch else DEFAULT_BUDGET
    return None if budget is None else float(budget)


class Budget:
    """The choices of ``GAR(budget=)`` and what they cost (see the module's docstring).

    Args:
        budget: the rewards' share of a training step's work (> 0), or ``None``: no budget
            (every batch, every row, a fresh reference, unless set explicitly).
        batch_size: the sampler's batch size ``B``.
        costs: ``(keep, all rows)`` of :data:`KEEP_COSTS` for the estimator and reward.
        every, rows, refresh: the explicit settings (``None``: the budget chooses; without a
            budget, 1, all rows and 1).
    """

    def __init__(
        self,
        budget: float | None,
        batch_size: int,
        costs: tuple[float, float],
        *,
        every: int | None,
        rows: int | None,
        refresh: int | None,
    ) -> None:
        self.budget = None if budget is None else float(budget)
        self.batch_size = batch_size
        self.keep_cost, self.rows_cost = costs
        self.fixed_every = every if every is not None or budget is not None else 1
        self.fixed_rows = rows
        self.fixed_refresh = refresh if refresh is not None or budget is not None else 1
        # What the budget counted and measured (saved in the state).
        self.credit = 0.0  # training steps' worth of work not yet spent (second phase)
        self.charged = 0.0  # estimated work of the rewards so far, in training steps
        self.kept = 0  # batches kept
        self.warm = budget is not None  # the first phase: exact while the evidence is thin
        self.evidence = 0.0  # summed squared contrast of the rewarded batches (reported)
        self.contrast = math.nan  # smoothed per-row squared contrast (NaN: none measured)
        self.reference_rows = batch_size  # R, from the last fresh reference gradient
        self.drift = math.nan  # the cosine of the last two fresh reference gradients
        self.last_kept: int | None = None  # the count of the last kept batch
        self.stride = 1  # counts between the last two kept counts

    # ------------------------------------------------------------------ choices

    def wants(self, count: int) -> bool:
        """Keep the batch of this ``count`` (steps, or augmented batches)? With an explicit
        ``every``, every ``every``-th one; in the first phase, all; then when the bucket's
        credit is not negative."""
        if self.fixed_every is not None:
            return count % self.fixed_every == 0
        return self.warm or self.credit >= 0.0

    def keep_weight(self, count: int) -> float:
        """A batch is kept at ``count``: how many updates its rewards stand for. 1 while every
        batch is kept (the first phase, an explicit ``every``, no budget); in the second
        phase, the counts since the previous kept one (the same for every batch kept at one
        count, as under gradient accumulation), at most :data:`MAX_WEIGHT`: the bucket keeps
        about one batch in ``cost / budget``, and each update then moves the mixture as far
        as that many would. The cap bounds what one noisy batch can do after a long gap (a
        larger batch cost or a smaller budget): uncapped, one seed of 16 of
        ``short_horizon.py`` with a reference of 16 rows ended below 0.9 where exact
        every-step rewards had none (docs/howto-gar.md, "The cost budget")."""
        if count != self.last_kept:
            self.stride = 1 if self.last_kept is None else max(count - self.last_kept, 1)
            self.last_kept = count
        if self.fixed_every is not None or self.budget is None or self.warm:
            return 1.0
        return float(min(self.stride, MAX_WEIGHT))

    def charge_keep(self, n: int) -> None:
        """A batch of ``n`` rows is kept: charge its capture and the rows it will reward."""
        rows = self.chosen_rows(n)
        self._charge(self.keep_cost + self.rows_cost * (n if rows is None else rows) / max(n, 1))
        self.kept += 1

    def charge_reference(self, rows: int) -> None:
        """A fresh reference gradient of ``rows`` rows was computed."""
        self.reference_rows = rows
        self._charge(rows / self.batch_size)

    def _charge(self, cost: float) -> None:
        self.charged += cost
        if self.fixed_every is None and not self.warm:
            self.credit -= cost

    def tick(self) -> None:
        """One ``step()``: the bucket gains a step's share (second phase)."""
        if self.fixed_every is None and self.budget is not None and not self.warm:
            self.credit += self.budget

    def chosen_rows(self, n: int) -> int | None:
        """How many of a batch's ``n`` rows to reward (None: all)."""
        if self.fixed_rows is not None:
            return None if self.fixed_rows >= n else self.fixed_rows
        if self.budget is None or self.warm:
            return None
        r = max(self.batch_size // ROWS_SHARE, MIN_ROWS)
        return None if r >= n else r

    def reference_refresh(self) -> int:
        """How many steps a reference gradient is reused for, now."""
        if self.fixed_refresh is not None:
            return self.fixed_refresh
        if self.budget is None or self.warm:
            return 1
        share = self.reference_rows / self.batch_size  # one fresh gradient, in training steps
        return min(max(math.ceil(share / (REFERENCE_SHARE * self.budget)), 1), MAX_REFRESH)

    # ------------------------------------------------------------------ evidence

    def observe_contrast(self, phi: float | None, rows: int) -> None:
        """A rewarded batch of ``rows`` rows and its per-row contrast (:func:`per_row_contrast`;
        ``None``: not measurable), summed and smoothed for the metrics; the first phase ends
        after :data:`WARMUP` rewarded batches."""
        if self.budget is None:
            return
        if phi is not None and math.isfinite(phi):
            self.evidence += phi * rows
            self.contrast = (
                phi
                if math.isnan(self.contrast)
                else (1 - SMOOTHING) * self.contrast + SMOOTHING * phi
            )
        if self.warm and self.kept >= WARMUP:
            self.warm = False

    def observe_reference(
        self,
        new: Mapping[str, Tensor],
        old: Mapping[str, Tensor] | None,
        shards: Shards | None = None,
    ) -> None:
        """A fresh reference gradient ``new`` replaces ``old``: their cosine, for
        ``gar.metrics()`` (the gradients are the ranks' average; an FSDP2 model's ``shards``
        sum the dots over the ranks)."""
        if self.budget is None or old is None:
            return
        if shards is not None and shards.active:
            dot, na, nb = shards.dots(new, old)
        else:
            dot = na = nb = 0.0
            for name, t in new.items():  # one pass, no copy: float64 sums of native-dtype dots
                a, o = t.flatten(), old[name].flatten()
                dot += float(torch.dot(a, o))
                na += float(torch.dot(a, a))
                nb += float(torch.dot(o, o))
        self.drift = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0

    # ------------------------------------------------------------------ reading, state

    def metrics(self, steps: int) -> dict[str, float]:
        """What the budget chose and what it estimates."""
        rows = self.chosen_rows(self.batch_size)
        return {
            "budget": math.nan if self.budget is None else self.budget,
            "budget/cost_per_step": self.charged / steps if steps else math.nan,
            "budget/exact_phase": float(self.warm),
            "budget/rows": float(self.batch_size if rows is None else rows),
            "budget/reference_refresh": float(self.reference_refresh()),
            "budget/evidence": self.evidence,
            "budget/contrast": self.contrast,
            "budget/reference_cosine": self.drift,
        }

    _INTS = ("kept", "reference_rows")
    _FLOATS = ("credit", "charged", "evidence")

    def state_dict(self) -> dict[str, Any]:
        return {
            "credit": self.credit,
            "charged": self.charged,
            "kept": self.kept,
            "warm": self.warm,
            "evidence": self.evidence,
            "contrast": self.contrast,
            "reference_rows": self.reference_rows,
            "drift": self.drift,
            "last_kept": self.last_kept,
            "stride": self.stride,
        }

    _SINCE_WEIGHTS = ("last_kept", "stride")  # absent from states saved before the weights

    def check_state(self, state: Any) -> None:
        """Raise, naming the key, if ``state`` is not a :meth:`state_dict` this budget can
        hold (called before anything of a GAR state is applied)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state's budget_state should be a dict, but got {state!r}")
        missing = sorted(set(self.state_dict()) - set(state) - set(self._SINCE_WEIGHTS))
        if missing:
            raise ValueError(f"state's budget_state is missing the key(s) {missing}")
        for key in self._FLOATS:
            value = state[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"state's budget[{key!r}] should be a finite number, but got {value!r}"
                )
        for key in self._INTS:
            value = state[key]
            low = 1 if key == "reference_rows" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"state's budget[{key!r}] should be an int >= {low}, but got {value!r}"
                )
        for key in ("contrast", "drift"):  # NaN: none measured yet
            value = state[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or math.isinf(value)
                or (key == "drift" and not math.isnan(value) and not -1.0 <= value <= 1.0)
            ):
                raise ValueError(
                    f"state's budget[{key!r}] should be "
                    + ("a cosine in [-1, 1]" if key == "drift" else "a finite number")
                    + f" or NaN, but got {value!r}"
                )
        if not isinstance(state["warm"], bool):
            raise ValueError(f"state's budget['warm'] should be a bool, but got {state['warm']!r}")
        last = state.get("last_kept")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(
                f"state's budget['last_kept'] should be None or an int >= 0, but got {last!r}"
            )
        stride = state.get("stride", 1)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"state's budget['stride'] should be an int >= 1, but got {stride!r}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises, naming the key, for a value it cannot hold."""
        self.check_state(state)
        self.credit, self.charged = float(state["credit"]), float(state["charged"])
        self.evidence = float(state["evidence"])
        self.kept, self.reference_rows = int(state["kept"]), int(state["reference_rows"])
        self.warm = state["warm"]
        self.contrast, self.drift = float(state["contrast"]), float(state["drift"])
        self.last_kept, self.stride = state.get("last_kept"), int(state.get("stride", 1))


def per_row_contrast(rewards: Tensor, sources: Sequence[int]) -> float | None:
    """The squared contrast between the sources' mean rewards in one batch, in squared
    standard errors, less what noise alone gives, per row: ``(Q - (k - 1)) / n`` with ``Q``
    the between-source sum of squares over the pooled within-source variance (a one-way
    analysis of variance). ``None`` when it cannot be measured (one source, too few rows,
    no spread)."""
    r = rewards.detach().to("cpu", torch.float64)
    keep = torch.isfinite(r)
    g = torch.as_tensor(list(sources), dtype=torch.long)[keep]
    r = r[keep]
    n = r.numel()
    if n == 0:
        return None
    _, g = g.unique(return_inverse=True)  # groups numbered 0..k-1: one pass per sum, any k
    k = int(g.max()) + 1
    if k < 2 or n - k < 2:
        return None
    counts = torch.bincount(g, minlength=k).double()
    means = torch.zeros(k, dtype=torch.float64).index_add_(0, g, r) / counts
    between = float((counts * (means - r.mean()) ** 2).sum())
    within = float(((r - means[g]) ** 2).sum())
    var = within / (n - k)
    if var <= 0:
        return None
    q = between / var
    return max(q - (k - 1), 0.0) / n
