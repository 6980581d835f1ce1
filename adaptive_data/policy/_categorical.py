"""CategoricalPolicy: a learned distribution over K choices (sources, ops, magnitude bins)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._check import check_int, check_keys, check_number, int_list, is_int
from . import _fields as f

__all__ = ["DEFAULT_LR", "NORMALIZATIONS", "RULES", "CategoricalPolicy", "ChoiceStatistics"]

RULES = ("reinforce", "exp_grad")
# Step sizes measured on benchmarks/mixture_quality.py (4 sources, batch 64, cosine rewards):
# exp_grad's step is divided by each choice's probability, hence its smaller rate; 0.3 drops
# the corrupted sources 2-3x sooner than 0.1 at the same accuracy, with a third of the spread.
DEFAULT_LR = {"reinforce": 0.5, "exp_grad": 0.3}
NORMALIZATIONS = ("batch", "running", "none")

# Logits are kept in [-_LOGIT_RANGE, 0] (max-shifted after every step): exp() of them never
# overflows and no probability underflows to exactly 0, whatever the rewards were.
_LOGIT_RANGE = 50.0
_TINY = 1e-12

_STATE_VERSION = 1

# A flat statistics list starts with [non-finite rewards, n, sum r, sum r^2], then the
# per-choice sums and counts.
STATS_HEAD = 4


@dataclass(frozen=True)
class ChoiceStatistics:
    """One batch's sufficient statistics for :meth:`CategoricalPolicy.apply`.

    Over the finite rewards: their count ``n``, sum and sum of squares, and per choice ``k``
    the sum ``sums[k]`` and count ``counts[k]``; ``nonfinite`` counts the NaN/inf rewards
    left out. The statistics of several batches (or ranks) are the sums of theirs: ``a + b``,
    or an all-reduce of :meth:`flat` lists read back with :meth:`from_flat`.
    """

    nonfinite: float
    n: float
    total: float
    total_sq: float
    sums: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def num_choices(self) -> int:
        return len(self.sums)

    def flat(self) -> list[float]:
        """``[nonfinite, n, total, total_sq, sums..., counts...]``: ``4 + 2K`` floats (what an
        all-reduce takes)."""
        return [self.nonfinite, self.n, self.total, self.total_sq, *self.sums, *self.counts]

    @classmethod
    def from_flat(cls, values: Sequence[float], num_choices: int) -> ChoiceStatistics:
        """The inverse of :meth:`flat`, for ``num_choices`` choices; raises on another length."""
        k = num_choices
        if len(values) != STATS_HEAD + 2 * k:
            raise ValueError(
                f"stats should hold 4 + 2K = {STATS_HEAD + 2 * k} numbers, but got {len(values)}"
            )
        v = [float(x) for x in values]
        return cls(v[0], v[1], v[2], v[3], tuple(v[4 : 4 + k]), tuple(v[4 + k :]))

    def __add__(self, other: ChoiceStatistics) -> ChoiceStatistics:
        if not isinstance(other, ChoiceStatistics):
            return NotImplemented
        if other.num_choices != self.num_choices:
            raise ValueError(
                f"cannot add statistics of {self.num_choices} and {other.num_choices} choices"
            )
        return ChoiceStatistics.from_flat(
            [a + b for a, b in zip(self.flat(), other.flat(), strict=True)], self.num_choices
        )


def initial_weights(
    weights: Any,
    num_choices: int,
    names: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
) -> Tensor:
    """Validate user weights and return them normalised as a float64 Tensor ``[K]``.

    ``weights`` is ``None``/``"uniform"``, ``"proportional"`` (needs ``sizes``), a sequence of
    K numbers, or a mapping ``name -> number`` (needs ``names``; names left out get 0).
    Raises on negative, NaN/inf or all-zero weights, on the wrong length and unknown names.
    """
    if weights is None or (isinstance(weights, str) and weights == "uniform"):
        return torch.full((num_choices,), 1.0 / num_choices, dtype=torch.float64)
    if isinstance(weights, str):
        if weights != "proportional":
            raise ValueError(
                "weights should be 'uniform', 'proportional', a sequence or a mapping, "
                f"but got weights={weights!r}"
            )
        if sizes is None:
            raise ValueError("weights='proportional' needs the sizes of the choices")
        w = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    elif isinstance(weights, Mapping):
        if names is None:
            raise TypeError(
                "weights given as a mapping need named choices; pass a sequence instead"
            )
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(
                f"weights names unknown source(s) {unknown}; the sources are {list(names)}"
            )
        w = torch.tensor([float(weights.get(n, 0.0)) for n in names], dtype=torch.float64)
    else:
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"weights should be a sequence of numbers, but got {type(weights).__name__}"
            ) from e
        if w.numel() != num_choices:
            raise ValueError(
                f"weights should have one entry per choice ({num_choices}), "
                f"but got {w.numel()} entries: weights={w.tolist()}"
            )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights should be finite and non-negative, but got weights={w.tolist()}")
    if float(w.sum()) <= 0:
        raise ValueError(f"weights should not all be zero, but got weights={w.tolist()}")
    return w / w.sum()


class CategoricalPolicy:
    """A categorical distribution over K choices, learned from per-example rewards.

    Probabilities are ``p = floor + (1 - K * floor) * softmax(logits)``: every choice keeps at
    least ``floor`` (the exploration floor), so none ever reaches 0. ``update(choices, rewards)``
    takes the choice that produced each example of a batch and that example's reward, drops
    NaN/inf rewards (they are counted in :meth:`metrics`, never applied), normalises the rest
    and moves the logits:

    * ``rule="reinforce"``: REINFORCE with a baseline, the gradient of the expected normalised
      reward ``mean_i z_i (e_{c_i} - softmax(logits))``; with ``normalize="batch"`` the baseline
      is the batch mean.
    * ``rule="exp_grad"``: exponentiated gradient (multiplicative weights, as EXP3) on the
      importance-weighted per-choice reward ``sum_{i: c_i=k} z_i / (N p_k)``.

    Normalisation (``normalize=``): ``"batch"`` z-scores rewards within each batch (the GAR
    authors' choice); ``"running"`` subtracts a running mean and divides by a running standard
    deviation (exponential averages with ``momentum``); ``"none"`` subtracts the running mean
    only. Every step is clipped to ``max_step`` per logit and logits stay within 50 of each
    other, so the distribution stays valid (finite, sums to 1, >= floor) under any rewards,
    1e30 included. State is float64 on the CPU; an update costs O(N + K).

    Args:
        num_choices: K >= 1.
        weights: initial probabilities (see :func:`initial_weights`); choices below the floor
            start at the floor.
        floor: minimum probability of every choice, ``0 <= floor < 1/K``; default ``0.05/K``.
        lr: step size of the logits; default ``DEFAULT_LR[rule]`` (0.5 for reinforce, 0.3 for
            exp_grad); 0 freezes the policy (it still counts its updates).
        rule: ``"exp_grad"`` (default) or ``"reinforce"`` (docs/howto-mixture.md compares
            them).
        normalize: ``"batch"``, ``"running"`` or ``"none"``.
        momentum: of the running mean/scale, in [0, 1).
        max_step: bound on any logit's change in one update.
        names: optional names of the choices (used by :attr:`weights` and error messages).
        sizes: sizes of the choices, for ``weights="proportional"``.
    """

    def __init__(
        self,
        num_choices: int,
        *,
        weights: Any = None,
        floor: float | None = None,
        lr: float | None = None,
        rule: str = "exp_grad",
        normalize: str = "batch",
        momentum: float = 0.99,
        max_step: float = 1.0,
        names: Sequence[str] | None = None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        check_int("num_choices", num_choices, minimum=1)
        k = num_choices
        if names is not None:
            given = list(names)
            names = [str(n) for n in given]
            if len(names) != k:
                raise ValueError(f"names should have {k} entries, but got {len(names)}: {names}")
            check_unique_names(given, "names")
        self.num_choices = k
        self.names = names
        self._configure(floor, lr, rule, normalize, momentum, max_step)

        w = initial_weights(weights, k, names, sizes)
        q = (w - self.floor).clamp_min(0.0)
        q = q / q.sum() if float(q.sum()) > 0 else torch.full_like(q, 1.0 / k)
        # The state is a list of Python floats (float64): for the K and N of a sampler, plain
        # arithmetic is several times cheaper than dispatching tiny tensor ops.
        self._logits: list[float] = q.clamp_min(math.exp(-_LOGIT_RANGE)).log().tolist()
        self._settle()
        # Running statistics (normalize="running"/"none") and counters.
        self._mean = 0.0
        self._var = 1.0
        self.loads = 0  # load_state_dict() calls: a GARSampler's drawing copy re-syncs on them
        self._stats_weight = 0.0  # bias correction of the exponential averages
        self._updates = 0
        self._applied = 0
        self._nonfinite = 0
        self._skipped = 0

    # ------------------------------------------------------------------ distribution

    def _settle(self) -> None:
        top = max(self._logits)
        self._logits = [max(v - top, -_LOGIT_RANGE) for v in self._logits]
        e = [math.exp(v) for v in self._logits]
        total = math.fsum(e)
        self._q = [v / total for v in e]  # softmax(logits)
        mass = 1.0 - self.num_choices * self.floor
        self._p = [self.floor + mass * v for v in self._q]
        self._p_tensor: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        """A copy of the logits, float64 ``[K]`` (max-shifted to 0)."""
        return torch.tensor(self._logits, dtype=torch.float64)

    @property
    def probs(self) -> Tensor:
        """The probabilities with the floor, float64 ``[K]``; finite, >= floor, sum to 1."""
        if self._p_tensor is None:
            self._p_tensor = torch.tensor(self._p, dtype=torch.float64)
        return self._p_tensor.clone()

    def probs_list(self) -> list[float]:
        """:attr:`probs` as a list of floats (no tensor made)."""
        return list(self._p)

    @property
    def weights(self) -> dict[str, float]:
        """``{name: probability}`` (names ``"0", "1", ...`` when the choices are unnamed)."""
        names = self.names or [str(i) for i in range(self.num_choices)]
        return dict(zip(names, self._p, strict=True))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` choices drawn with replacement from :attr:`probs`: int64 Tensor ``[n]``.

        The randomness comes from ``generator`` only (never the global RNG).
        """
        check_int("n", n, minimum=0)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator should be a torch.Generator, but got {type(generator).__name__}"
            )
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        if self._p_tensor is None:
            self._p_tensor = torch.tensor(self._p, dtype=torch.float64)
        return torch.multinomial(self._p_tensor, n, replacement=True, generator=generator)

    def _configure(
        self,
        floor: float | None,
        lr: float | None,
        rule: str,
        normalize: str,
        momentum: float,
        max_step: float,
    ) -> None:
        """Check and set the configuration given to the constructor."""
        config = checked_config(self.num_choices, floor, lr, rule, normalize, momentum, max_step)
        self.floor = config["floor"]
        self.lr = config["lr"]
        self.max_step = config["max_step"]
        self.rule = config["rule"]
        self.normalize = config["normalize"]
        self.momentum = config["momentum"]

    @property
    def config(self) -> dict[str, Any]:
        """The settings a state must share with this policy: ``floor``, ``lr``, ``rule``,
        ``normalize``, ``momentum``, ``max_step``."""
        return {
            "floor": self.floor,
            "lr": self.lr,
            "rule": self.rule,
            "normalize": self.normalize,
            "momentum": self.momentum,
            "max_step": self.max_step,
        }

    # ------------------------------------------------------------------ learning

    def statistics(self, choices: Tensor | list[int], rewards: Tensor) -> ChoiceStatistics:
        """One batch's sufficient statistics for :meth:`apply` (:class:`ChoiceStatistics`:
        count, sum and sum of squares of the finite rewards, and each choice's sum and count).
        Their sum over several batches (an all-reduce over ranks of :meth:`ChoiceStatistics.flat`)
        is the statistics of the union. Validates the arguments (see :meth:`update`).
        """
        c = int_list("choices", choices)
        check_rewards(rewards, len(c))
        k = self.num_choices
        if c and (min(c) < 0 or max(c) >= k):
            raise ValueError(
                f"choices should lie in [0, {k}), but got values in [{min(c)}, {max(c)}]"
            )
        return self.statistics_of(c, rewards.detach().to("cpu", torch.float64).tolist())

    def statistics_of(self, c: list[int], r_all: list[float]) -> ChoiceStatistics:
        """:meth:`statistics` of already-checked choices and rewards given as Python lists."""
        k = self.num_choices
        sums, counts = [0.0] * k, [0.0] * k
        bad, total, total_sq, n = 0, [], [], 0
        for choice, v in zip(c, r_all, strict=True):
            if not math.isfinite(v):
                bad += 1
                continue
            n += 1
            total.append(v)
            total_sq.append(v * v)
            sums[choice] += v
            counts[choice] += 1
        return ChoiceStatistics(
            float(bad), float(n), _sum(total), _sum(total_sq), tuple(sums), tuple(counts)
        )

    def apply(self, stats: ChoiceStatistics | Sequence[float], weight: float = 1.0) -> int:
        """Update from :meth:`statistics` (of one batch, or summed over ranks); returns n.

        ``stats`` is a :class:`ChoiceStatistics` or its :meth:`~ChoiceStatistics.flat` list.
        ``weight`` (> 0): the updates this one stands for; the step is ``lr * weight`` (each
        logit's change still capped at ``max_step``).

        Rewards are normalised to ``z = (r - base) / scale`` (``normalize``: batch mean and
        standard deviation, running ones, or the running mean and 1), so each choice's summed
        ``z`` is ``(S_k - n_k base) / scale``; a scale that is zero or lost to rounding makes
        the step zero. Every rank that applies the same statistics makes the same step.
        """
        k = self.num_choices
        if not isinstance(stats, ChoiceStatistics):
            stats = ChoiceStatistics.from_flat(stats, k)
        elif stats.num_choices != k:
            raise ValueError(f"stats are for {stats.num_choices} choices, but this policy has {k}")
        bad, total, total_sq = stats.nonfinite, stats.total, stats.total_sq
        sums, counts = stats.sums, stats.counts
        n = round(stats.n)
        self._nonfinite += round(bad)
        self._updates += 1
        if n == 0:
            self._skipped += 1
            return 0
        mean, sq = total / n, total_sq / n
        var = sq - mean * mean
        # Zero when the rewards are (numerically) all equal: rounding in E[r^2] - mean^2.
        degenerate = not (math.isfinite(var) and var > 1e-12 * max(sq, 1e-300))
        if self.normalize == "batch":
            base, scale = mean, (0.0 if degenerate else math.sqrt(var))
        else:
            # Running statistics: the estimate from before this batch is the baseline, then
            # the batch is folded in; an overflow resets them.
            if self._stats_weight == 0.0:
                base, std = mean, (0.0 if degenerate else math.sqrt(var))
            else:
                base = self._mean / self._stats_weight
                run_var = self._var / self._stats_weight - base * base
                ok = math.isfinite(run_var) and run_var > 1e-12 * max(abs(base) ** 2, 1e-300)
                std = math.sqrt(run_var) if ok else 0.0
            scale = std if self.normalize == "running" else 1.0
            m = self.momentum
            self._mean = m * self._mean + (1 - m) * mean
            self._var = m * self._var + (1 - m) * sq
            self._stats_weight = m * self._stats_weight + (1 - m)
            if not (math.isfinite(self._mean) and math.isfinite(self._var)):
                self._mean, self._var, self._stats_weight = 0.0, 1.0, 0.0
        if scale > 0 and math.isfinite(scale) and math.isfinite(base):
            z = [(s - c * base) / scale for s, c in zip(sums, counts, strict=True)]
        else:
            z = [0.0] * k
        if self.rule == "reinforce":
            # In units of the largest |z|: finite rewards near the float64 limit (normalize=
            # "none") would overflow the sum; a step that overflows is then +-inf, capped below.
            top = max(map(abs, z))
            if top > 0:
                mean_z = math.fsum(v / top for v in z) / n
                step = [top * (v / top / n - q * mean_z) for v, q in zip(z, self._q, strict=True)]
            else:
                step = [0.0] * k
        else:
            step = [v / (n * p) for v, p in zip(z, self._p, strict=True)]
        lr, cap = self.lr * weight, self.max_step
        self._logits = [
            v + (min(max(lr * d, -cap), cap) if not math.isnan(lr * d) else 0.0)
            for v, d in zip(self._logits, step, strict=True)
        ]
        self._settle()
        self._applied += n
        return n

    def update(self, choices: Tensor | list[int], rewards: Tensor) -> int:
        """Apply one batch of rewards; return how many were applied (the finite ones).

        Args:
            choices: int Tensor ``[N]`` (or a list of ints), the choice in ``[0, K)`` behind
                each example.
            rewards: floating Tensor ``[N]`` on any device (copied to the CPU as float64).
        """
        return self.apply(self.statistics(choices, rewards))

    # ------------------------------------------------------------------ bookkeeping

    def metrics(self) -> dict[str, Any]:
        """Counters: ``updates``, ``rewards_applied``, ``nonfinite_rewards`` (NaN/inf dropped),
        ``skipped_updates`` (batches with no finite reward), ``entropy`` (nats) and ``weights``."""
        return {
            "updates": self._updates,
            "rewards_applied": self._applied,
            "nonfinite_rewards": self._nonfinite,
            "skipped_updates": self._skipped,
            "entropy": -math.fsum(v * math.log(v) for v in self._p),
            "weights": self.weights,
        }

    def state_dict(self) -> dict[str, Any]:
        """All :meth:`load_state_dict` needs to continue identically (Python values, Tensors)."""
        return {
            "version": _STATE_VERSION,
            "num_choices": self.num_choices,
            "logits": torch.tensor(self._logits, dtype=torch.float64),
            "running": [self._mean, self._var, self._stats_weight],
            "counters": [self._updates, self._applied, self._nonfinite, self._skipped],
            "config": self.config,
        }

    def check_state(self, state: Any, path: str = "state", owner: str = "this policy") -> None:
        """Raise ``ValueError`` naming the field unless ``state`` is a :meth:`state_dict` this
        policy can load: every field of the right type, shape and range, and the settings
        (``config``) equal to this policy's (``owner`` names it in the message). Changes
        nothing."""
        parse_policy_state(state, path, self, owner)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a policy with the same settings.

        The whole state is checked first (:meth:`check_state`), so a refused one changes
        nothing. A state saved with other settings (``floor``, ``lr``, ``rule``,
        ``normalize``, ``momentum``, ``max_step``) is refused, naming both values: the
        policy resumes with the settings it was built with (docs/howto-resume.md).
        """
        self._load_parsed(*parse_policy_state(state, "state", self, "this policy"))

    def _load_parsed(
        self,
        logits: list[float],
        running: tuple[float, float, float],
        counters: tuple[int, int, int, int],
    ) -> None:
        """Set what :func:`parse_policy_state` read from a checked state."""
        self._logits = list(logits)
        self._settle()
        self._mean, self._var, self._stats_weight = running
        self._updates, self._applied, self._nonfinite, self._skipped = counters
        self.loads += 1


_STATE_KEYS = ("version", "num_choices", "logits", "running", "counters", "config")
_CONFIG_KEYS = ("floor", "lr", "rule", "normalize", "momentum", "max_step")


def checked_config(
    k: int,
    floor: float | None,
    lr: float | None,
    rule: str,
    normalize: str,
    momentum: float,
    max_step: float,
) -> dict[str, Any]:
    """The configuration of a policy of ``k`` choices, checked, defaults resolved."""
    if floor is None:
        floor = 0.05 / k
    what = f"a number in [0, 1/num_choices) = [0, {1 / k:.6g})"
    # The upper bound is on floor * k, as the policy uses it (1 / k rounds).
    if check_number("floor", floor, low=0, what=what) * k >= 1:
        raise ValueError(f"floor should be {what}, but got floor={floor!r}")
    if rule not in RULES:
        raise ValueError(f"rule should be one of {', '.join(RULES)}, but got rule={rule!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"normalize should be one of {', '.join(NORMALIZATIONS)}, "
            f"but got normalize={normalize!r}"
        )
    momentum = check_number("momentum", momentum, low=0, high=1)
    # lr=0: a policy that counts its updates but never moves (a frozen control).
    lr = (
        DEFAULT_LR[rule]
        if lr is None
        else check_number("lr", lr, low=0, what="a non-negative finite number")
    )
    max_step = check_number("max_step", max_step, positive=True)
    return {
        "floor": float(floor),
        "lr": lr,
        "rule": rule,
        "normalize": normalize,
        "momentum": float(momentum),
        "max_step": max_step,
    }


def parse_policy_state(
    state: Any, path: str, policy: CategoricalPolicy, owner: str
) -> tuple[list[float], tuple[float, float, float], tuple[int, int, int, int]]:
    """Check a :meth:`CategoricalPolicy.state_dict` for ``policy`` (see
    :meth:`CategoricalPolicy.check_state`); returns its logits, running statistics and
    counters as Python values. Raises ``ValueError`` naming the field under ``path``."""
    check_policy_state(state, path)
    k = policy.num_choices
    if not is_int(state["num_choices"]) or state["num_choices"] != k:
        raise ValueError(
            f"{path}['num_choices'] is {f.describe(state['num_choices'])}, but {owner} has {k} "
            "choices"
        )
    logits = f.tensor(f"{path}['logits']", state["logits"], torch.float64, (k,)).tolist()
    if any(not math.isfinite(v) for v in logits) or max(logits) - min(logits) > _LOGIT_RANGE:
        raise ValueError(
            f"{path}['logits'] should hold finite logits within {_LOGIT_RANGE:g} of each other "
            f"(the policy keeps them so), but holds {logits}"
        )
    mean, var, weight = f.reals(f"{path}['running']", state["running"], 3)
    if var < 0 or not 0 <= weight <= 1:
        raise ValueError(
            f"{path}['running'] should hold [mean, mean square >= 0, weight in [0, 1]], but "
            f"holds {[mean, var, weight]}"
        )
    updates, applied, nonfinite, skipped = f.integers(
        f"{path}['counters']", state["counters"], 4, lo=0
    )
    if skipped > updates:
        raise ValueError(
            f"{path}['counters'] counts {skipped} skipped updates of {updates} updates"
        )
    cfg = state["config"]
    try:
        theirs = checked_config(k, *(cfg[key] for key in _CONFIG_KEYS))
    except ValueError as e:
        raise ValueError(f"{path}['config'] is invalid: {e}") from None
    for key in (
        "rule",
        "normalize",
        "floor",
        "lr",
        "momentum",
        "max_step",
    ):  # lr's default is rule's
        if cfg[key] is None or theirs[key] != getattr(policy, key):
            raise ValueError(
                f"{path}['config'] has {key}={cfg[key]!r}, but {owner} has "
                f"{key}={getattr(policy, key)!r}: a resumed run keeps the settings it was "
                f"built with; build it with {key}={cfg[key]!r} to resume this state "
                "(docs/howto-resume.md)"
            )
    return logits, (mean, var, weight), (updates, applied, nonfinite, skipped)


def check_unique_names(names: Sequence[Any], what: str) -> None:
    """Raise unless the ``names`` stay distinct once converted with ``str``."""
    seen: dict[str, Any] = {}
    for name in names:
        key = str(name)
        if key in seen:
            raise ValueError(
                f"{what} should be distinct after str(), but {seen[key]!r} and {name!r} are "
                f"both {key!r}"
            )
        seen[key] = name


def check_policy_state(state: Any, path: str = "state") -> None:
    """Raise ``ValueError`` unless ``state`` is a complete :meth:`CategoricalPolicy.state_dict`
    of this version (its values are checked by :func:`parse_policy_state`)."""
    if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
        raise ValueError(
            f"{path} should be a CategoricalPolicy.state_dict() of version "
            f"{_STATE_VERSION}, but got {type(state).__name__}"
            + (f" with version={state.get('version')!r}" if isinstance(state, Mapping) else "")
        )
    check_keys(state, _STATE_KEYS, "CategoricalPolicy.state_dict()")
    if not isinstance(state["config"], Mapping):
        raise ValueError(
            f"{path}['config'] should be a dict, but got " + type(state["config"]).__name__
        )
    check_keys(state["config"], _CONFIG_KEYS, "CategoricalPolicy.state_dict()['config']")


def _sum(values: list[float]) -> float:
    """An exact sum where it is finite; +-inf (or NaN) where it overflows, never an error."""
    try:
        return math.fsum(values)
    except OverflowError:  # fsum raises on intermediate overflow; the plain sum saturates
        return sum(values)


def check_rewards(rewards: Any, n: int, what: str = "rewards") -> None:
    """Raise unless ``rewards`` is a 1-D floating Tensor of ``n`` entries holding data."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{what} should be a torch.Tensor, but got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"{what} should be a floating-point Tensor, but got dtype={rewards.dtype}")
    if rewards.device.type == "meta":
        raise ValueError(
            f"{what} should be on a device that holds data (cpu, cuda, ...), "
            f"but got device={rewards.device}"
        )
    if rewards.dim() != 1 or rewards.numel() != n:
        raise ValueError(
            f"{what} should have shape ({n},), one per example, "
            f"but got shape={tuple(rewards.shape)}"
        )
