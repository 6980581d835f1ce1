"""AugmentPolicy: the learned part of GARTransform (op table, op and magnitude policies, state).

No image code here: the policy chooses ``(op, magnitude bin, sign)`` decisions and learns from
their rewards; :class:`GARTransform` applies them with torchvision's kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._check import check_int, check_keys
from ..policy import _fields as f
from ..policy._categorical import (
    DEFAULT_LR,
    STATS_HEAD,
    CategoricalPolicy,
    ChoiceStatistics,
    check_rewards,
    parse_policy_state,
)
from ..policy._history import History

__all__ = [
    "KERNELS",
    "NO_AUGMENTATION",
    "AugmentPolicy",
    "AugmentStatistics",
    "trivial_augment_wide_table",
]

# Op id carried by a decision that leaves the image as it is (un-augmented reference batches).
NO_AUGMENTATION = -1

# The op names GARTransform can apply: each maps to torchvision.transforms.v2.functional kernels
# with the magnitude conventions of torchvision's auto-augment transforms (see apply_op).
KERNELS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
"""The op names :class:`GARTransform` can apply (the keys an op table may use)."""
_NEEDS_MAGNITUDE = frozenset(KERNELS[1:12])


@dataclass(frozen=True)
class AugmentStatistics:
    """One batch's sufficient statistics for :meth:`AugmentPolicy.apply`: the op policy's, and
    each magnitude policy's (of the ops with magnitudes, in op order), over the augmented
    examples. Sums over batches or ranks are the statistics of their union (an all-reduce of
    :meth:`flat`, read back with :meth:`AugmentPolicy.statistics_from_flat`)."""

    ops: ChoiceStatistics
    magnitudes: tuple[ChoiceStatistics, ...]

    @property
    def empty(self) -> bool:
        """No augmented example (a reference batch): nothing to learn from."""
        return self.ops.n == 0 and self.ops.nonfinite == 0

    def flat(self) -> list[float]:
        """The op policy's :meth:`ChoiceStatistics.flat`, then each magnitude policy's."""
        out = self.ops.flat()
        for part in self.magnitudes:
            out += part.flat()
        return out


_STATE_VERSION = 2  # 2: the history as float64 tensors, the op table
# Keys of a policy's state_dict().
_STATE_KEYS = (
    "version",
    "ops",
    "bins",
    "table",
    "op_policy",
    "magnitude_policies",
    "counters",
    "history",
)  # "learn", "history_every" and "history_limit" may be absent (saved before them)

# Step sizes of the exponentiated-gradient policies. Its step for a choice is its summed
# z-scored reward over N * p (importance weighting): with a batch of 128 spread over 14 ops,
# an op sees ~9 examples and a magnitude bin of 31 well under one, so the per-update noise of
# a bin's step is ~30x an op's. The magnitudes get 0.3 of the ops' step (a guess, not tuned).
DEFAULT_OP_LR = 0.1
MAGNITUDE_LR_RATIO = 0.3

# Ops whose magnitude is a bit count or a fraction of the image's range (torchvision raises
# outside these, at the first image): checked when a table is given.
_RANGES = {"Posterize": (0.0, 8.0), "Solarize": (0.0, 1.0)}

Table = dict[str, tuple[list[float] | None, bool]]


def trivial_augment_wide_table(num_bins: int = 31) -> Table:
    """TrivialAugmentWide's augmentation space as an op table: ``{op: (magnitudes, signed)}``.

    ``magnitudes`` is the list of the ``num_bins`` magnitude values of the op (``None`` for
    ops without one: Identity, AutoContrast, Equalize); ``signed`` ops are applied with
    ``-magnitude`` half of the time. The values are torchvision's ``TrivialAugmentWide`` ones:
    shear 0..0.99, translate 0..32 px, rotate 0..135 degrees, brightness/color/contrast/sharpness
    factor ``1 + 0..0.99``, posterize 8..2 bits, solarize threshold 1..0 of the maximum.
    """
    check_int("num_bins", num_bins, minimum=2)

    def lin(a: float, b: float) -> list[float]:
        # float32, as torchvision computes them, so each magnitude is bit-for-bit its value
        return torch.linspace(a, b, num_bins, dtype=torch.float32).tolist()

    posterize = (8 - (torch.arange(num_bins) / ((num_bins - 1) / 6))).round().int().tolist()
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.99), True),
        "ShearY": (lin(0.0, 0.99), True),
        "TranslateX": (lin(0.0, 32.0), True),
        "TranslateY": (lin(0.0, 32.0), True),
        "Rotate": (lin(0.0, 135.0), True),
        "Brightness": (lin(0.0, 0.99), True),
        "Color": (lin(0.0, 0.99), True),
        "Contrast": (lin(0.0, 0.99), True),
        "Sharpness": (lin(0.0, 0.99), True),
        "Posterize": ([float(v) for v in posterize], False),
        "Solarize": (lin(1.0, 0.0), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


def _resolve_table(ops: Any, num_bins: int) -> Table:
    default = trivial_augment_wide_table(num_bins)
    if ops is None:
        return default
    if isinstance(ops, str):
        raise TypeError(
            f"ops should be a list of op names or a mapping op -> (magnitudes, signed), but got "
            f"the string {ops!r}"
        )
    if isinstance(ops, Mapping):
        table: Table = {}
        for name, spec in ops.items():
            if name not in KERNELS:
                raise ValueError(f"unknown op {name!r}; the ops are {', '.join(KERNELS)}")
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise TypeError(
                    f"op {name!r} should map to a tuple (magnitudes, signed), but got {spec!r}"
                )
            mags, signed = spec
            if mags is None:
                if name in _NEEDS_MAGNITUDE:
                    raise ValueError(f"op {name!r} needs magnitudes, but got None")
                table[name] = (None, bool(signed))
                continue
            values = torch.as_tensor(mags, dtype=torch.float64).flatten()
            if values.numel() < 2:
                raise ValueError(
                    f"op {name!r} should have at least 2 magnitude bins, but got {values.numel()}"
                )
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"op {name!r} has non-finite magnitudes: {values.tolist()}")
            lo, hi = _RANGES.get(name, (-math.inf, math.inf))
            bad = [v for v in values.tolist() if not lo <= v <= hi]
            if bad or (signed and name in _RANGES):
                raise ValueError(
                    f"op {name!r} takes unsigned magnitudes in [{lo:g}, {hi:g}], but got "
                    + (f"{bad}" if bad else "signed=True")
                )
            table[name] = (values.tolist(), bool(signed))
    elif isinstance(ops, Sequence):
        # Names from TrivialAugmentWide's table, or ops without a magnitude (Invert).
        known = {**default, **{k: (None, False) for k in KERNELS if k not in _NEEDS_MAGNITUDE}}
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise ValueError(
                f"unknown op(s) {unknown}; the ops are {', '.join(KERNELS)} (pass a mapping "
                "op -> (magnitudes, signed) to set other magnitudes)"
            )
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops should not repeat an op, but got {list(ops)}")
        table = {o: known[o] for o in ops}
    else:
        raise TypeError(
            "ops should be a list of op names or a mapping op -> (magnitudes, signed), "
            f"but got {type(ops).__name__}"
        )
    if not table:
        raise ValueError("ops should name at least one op, but got none")
    return table


class AugmentPolicy:
    """What :class:`GARTransform` learns: an op table and two learned distributions over it.

    A categorical over the table's ops and, per op with magnitudes, a categorical over its
    magnitude bins (each a :class:`CategoricalPolicy` with an exploration floor). Signed ops
    are negated with probability 1/2 (not learned). The policy draws decisions
    ``(op id, bin, negate)`` (:meth:`draw`), learns from their rewards (:meth:`update`, or
    :meth:`statistics` then :meth:`apply` when the statistics are summed over ranks first) and
    saves all of it in one :meth:`state_dict`. It holds no image code and no random state: the
    generator is the caller's. All state is float64 on the CPU; an update costs O(N + bins).

    Args:
        ops: ``None`` (TrivialAugmentWide's 14 ops), a list of some of those op names, or a
            table ``{op: (magnitudes, signed)}`` with ``magnitudes`` a sequence of >= 2 values
            (``None`` for Identity, AutoContrast, Equalize, Invert); see :data:`KERNELS` and
            :func:`apply_op` for the names and the meaning of a magnitude.
        num_magnitude_bins: bins of the default table (>= 2).
        learn_ops: ``True`` learns the op policy; ``False`` (default) keeps it at its
            initial weights (see :class:`GARTransform` for why learning is opt-in).
        learn_magnitudes: ``True`` learns the magnitude policies; ``False`` (default) keeps
            them at their initial weights.
        floor: exploration floor of every policy (default ``0.05 / K`` of each).
        lr: step size of the op policy (default 0.1 for ``rule="exp_grad"``, the policy's
            default for ``"reinforce"``); 0 makes a policy that never moves but counts its
            updates, as a learning one does.
        magnitude_lr: step size of the magnitude policies (default ``0.3 * lr``).
        rule: of the policies (see :class:`CategoricalPolicy`).
        normalize: of the policies (see :class:`CategoricalPolicy`).
        history_limit: at most this many entries of :attr:`history` after the initial one
            (>= 2), evenly spread over the run: when full, every other entry is dropped and
            from then on every 2nd (4th, ...) update is recorded. Memory: at most
            ``history_limit * (1 + 2 * ops) * 8`` bytes (240 KB for the 14 default ops at
            the default 1024). ``None``: every update (``O(updates * ops)`` memory).

    Its settings (the op table, ``learn_ops``, ``learn_magnitudes``, ``history_limit`` and
    the policies' ``floor``, ``lr``, ``rule``, ``normalize``) are not taken from a loaded
    state: :meth:`load_state_dict` refuses a state saved with other ones (docs/howto-resume.md).
    """

    def __init__(
        self,
        ops: Any = None,
        *,
        num_magnitude_bins: int = 31,
        learn_ops: bool = False,
        learn_magnitudes: bool = False,
        floor: float | None = None,
        lr: float | None = None,
        magnitude_lr: float | None = None,
        rule: str = "exp_grad",
        normalize: str = "batch",
        history_limit: int | None = 1024,
    ) -> None:
        self.loads = 0  # load_state_dict() calls
        for name, flag in (("learn_ops", learn_ops), ("learn_magnitudes", learn_magnitudes)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} should be a bool, but got {name}={flag!r}")
        self.table = _resolve_table(ops, num_magnitude_bins)
        self.op_names = list(self.table)
        self.learn_ops = learn_ops
        self.learn_magnitudes = learn_magnitudes

        if lr is None:
            lr = DEFAULT_OP_LR if rule == "exp_grad" else DEFAULT_LR.get(rule)
        if magnitude_lr is None and lr is not None:
            magnitude_lr = lr * MAGNITUDE_LR_RATIO

        def policy(k: int, step: float | None, names: list[str] | None = None) -> CategoricalPolicy:
            return CategoricalPolicy(
                k, names=names, floor=floor, lr=step, rule=rule, normalize=normalize
            )

        self._op_policy = policy(len(self.op_names), lr, self.op_names)
        self._mag_policies: dict[int, CategoricalPolicy] = {}
        for i, name in enumerate(self.op_names):
            mags = self.table[name][0]
            if mags is not None:
                self._mag_policies[i] = policy(len(mags), magnitude_lr)
        self._max_bins = max((len(m) for m, _ in self.table.values() if m is not None), default=1)
        self._bin_probs: Tensor | None = None  # [ops, max_bins] cache for drawing
        # One row per update: [update, op probabilities..., expected bin of each op...].
        self._history = History(1 + 2 * len(self.op_names), limit=history_limit)
        self._initial = (0, self._op_policy.probs_list(), self._mean_bins())
        self._updates = 0
        self._reference_skipped = 0
        self._nonfinite = 0  # NaN/inf rewards of augmented examples, never applied

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ops={len(self.op_names)}, "
            f"learn_ops={self.learn_ops}, learn_magnitudes={self.learn_magnitudes})"
        )

    # ------------------------------------------------------------------ reading

    @property
    def op_weights(self) -> dict[str, float]:
        """``{op name: probability}``; sums to 1."""
        return dict(zip(self.op_names, self._op_policy.probs_list(), strict=True))

    @property
    def magnitude_weights(self) -> dict[str, list[float]]:
        """``{op name: [probability of each magnitude bin]}`` for the ops with magnitudes."""
        return {self.op_names[i]: p.probs_list() for i, p in self._mag_policies.items()}

    def magnitude(self, op: int, bin: int, negate: bool = False) -> float | None:
        """The magnitude value of bin ``bin`` of op number ``op`` (``None`` if it has none)."""
        if not 0 <= op < len(self.op_names):
            raise ValueError(f"op should lie in [0, {len(self.op_names)}), but got op={op}")
        mags, signed = self.table[self.op_names[op]]
        if mags is None:
            return None
        if not 0 <= bin < len(mags):
            raise ValueError(
                f"bin should lie in [0, {len(mags)}) for op {self.op_names[op]!r}, but got "
                f"bin={bin}"
            )
        return -mags[bin] if (signed and negate) else mags[bin]

    # ------------------------------------------------------------------ drawing

    def draw(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` decisions from the current policies: op ids, bins and negations, Tensors [n].

        Bins of ops without magnitudes are 0. Randomness from ``generator`` (default: torch's
        default generator).
        """
        p_ops = self._op_policy.probs
        if self._bin_probs is None:
            rows = torch.zeros(len(self.op_names), self._max_bins, dtype=torch.float64)
            rows[:, 0] = 1.0
            for i, pol in self._mag_policies.items():
                rows[i] = 0.0
                rows[i, : pol.num_choices] = pol.probs
            self._bin_probs = rows
        ops = torch.multinomial(p_ops, n, replacement=True, generator=generator)
        bins = torch.multinomial(self._bin_probs[ops], 1, generator=generator).squeeze(1)
        negate = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool)
        return ops, bins, negate

    # ------------------------------------------------------------------ learning

    def statistics(
        self, ops: Sequence[int] | Tensor, bins: Sequence[int] | Tensor, rewards: Tensor
    ) -> AugmentStatistics:
        """One batch's sufficient statistics for :meth:`apply` (:class:`AugmentStatistics`: the
        op policy's and each magnitude policy's; see :meth:`CategoricalPolicy.statistics`).
        Sums over ranks are the statistics of the union. Examples with op
        ``NO_AUGMENTATION`` (reference batches) are left out."""
        if isinstance(ops, Tensor):  # as draw() returns them
            ops = ops.tolist()
        if isinstance(bins, Tensor):
            bins = bins.tolist()
        check_rewards(rewards, len(ops))
        return self.statistics_of(ops, bins, rewards.detach().to("cpu", torch.float64).tolist())

    def statistics_of(
        self, ops: Sequence[int], bins: Sequence[int], r_all: list[float]
    ) -> AugmentStatistics:
        """:meth:`statistics` of rewards already checked and given as a list of floats."""
        if not len(bins) == len(ops) == len(r_all):
            raise ValueError(
                f"ops, bins and rewards should have the same length, got {len(ops)}, "
                f"{len(bins)}, {len(r_all)}"
            )
        keep = [i for i, o in enumerate(ops) if o != NO_AUGMENTATION]
        k = len(self.op_names)
        if any(not 0 <= ops[i] < k for i in keep):
            raise ValueError(
                f"ops should lie in [0, {k}) or be NO_AUGMENTATION, but got {list(ops)}"
            )
        for i in keep:
            pol = self._mag_policies.get(ops[i])
            n_bins = pol.num_choices if pol is not None else 1  # ops without magnitudes: bin 0
            if not 0 <= bins[i] < n_bins:
                raise ValueError(
                    f"bins should lie in [0, {n_bins}) for op {self.op_names[ops[i]]!r}, but "
                    f"example {i} has bin {bins[i]}"
                )
        op_stats = self._op_policy.statistics_of([ops[i] for i in keep], [r_all[i] for i in keep])
        by_op: dict[int, list[int]] = {}
        for i in keep:
            by_op.setdefault(ops[i], []).append(i)
        magnitudes = tuple(
            pol.statistics_of([bins[i] for i in idx], [r_all[i] for i in idx])
            for o, pol in self._mag_policies.items()
            for idx in (by_op.get(o, []),)
        )
        return AugmentStatistics(op_stats, magnitudes)

    @property
    def statistics_width(self) -> int:
        """The length of a :meth:`AugmentStatistics.flat` list of this policy."""
        return sum(STATS_HEAD + 2 * p.num_choices for p in self._policies())

    def statistics_from_flat(self, values: Sequence[float]) -> AugmentStatistics:
        """The inverse of :meth:`AugmentStatistics.flat` for this policy's op table; raises on
        another length."""
        if len(values) != self.statistics_width:
            raise ValueError(
                f"stats should hold {self.statistics_width} numbers (this policy's statistics()),"
                f" but got {len(values)}"
            )
        parts, pos = [], 0
        for pol in self._policies():
            w = STATS_HEAD + 2 * pol.num_choices
            parts.append(ChoiceStatistics.from_flat(values[pos : pos + w], pol.num_choices))
            pos += w
        return AugmentStatistics(parts[0], tuple(parts[1:]))

    def _policies(self) -> list[CategoricalPolicy]:
        return [self._op_policy, *self._mag_policies.values()]

    def apply(self, stats: AugmentStatistics | Sequence[float], weight: float = 1.0) -> None:
        """Update both policies from :meth:`statistics` (of one batch, or summed over ranks):
        an :class:`AugmentStatistics` or its :meth:`~AugmentStatistics.flat` list; ``weight``:
        the updates it stands for (:meth:`CategoricalPolicy.apply`)."""
        if not isinstance(stats, AugmentStatistics):
            stats = self.statistics_from_flat(stats)
        elif [p.num_choices for p in (stats.ops, *stats.magnitudes)] != [
            p.num_choices for p in self._policies()
        ]:
            raise ValueError(
                "stats were computed by a policy with another op table than this one's "
                f"({len(stats.ops.sums)} ops, {len(stats.magnitudes)} with magnitudes; this "
                f"policy: {len(self.op_names)} ops, {len(self._mag_policies)} with magnitudes)"
            )
        if stats.empty:  # no augmented example: a reference batch
            self._reference_skipped += 1
            return
        self._nonfinite += round(stats.ops.nonfinite)
        if self.learn_ops:
            self._op_policy.apply(stats.ops, weight)
        for pol, part in zip(self._mag_policies.values(), stats.magnitudes, strict=True):
            if self.learn_magnitudes and (part.nonfinite or part.n):
                pol.apply(part, weight)
        self._bin_probs = None
        self._updates += 1
        self._history.append([self._updates, *self._op_policy.probs_list(), *self._mean_bins()])

    def update(
        self, ops: Sequence[int] | Tensor, bins: Sequence[int] | Tensor, rewards: Tensor
    ) -> None:
        """Learn from one batch: ``ops``/``bins`` of each example (lists of ints, or the
        Tensors :meth:`draw` returns) and its reward ``[N]``.

        Examples with op ``NO_AUGMENTATION`` (reference batches) are left out. The op policy
        gets every reward; each op's magnitude policy gets the rewards of its own examples.
        NaN/inf rewards are never applied (counted in :meth:`metrics`).
        """
        self.apply(self.statistics(ops, bins, rewards))

    def _mean_bins(self) -> list[float]:
        """Expected bin of each op as a fraction of its range (NaN for ops without bins)."""
        out = [math.nan] * len(self.op_names)
        for i, pol in self._mag_policies.items():
            p = pol.probs_list()
            out[i] = math.fsum(j * v for j, v in enumerate(p)) / (len(p) - 1)
        return out

    # ------------------------------------------------------------------ bookkeeping

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per update: ``{"update": n, "op_weights": {...}, "magnitude": {...}}``;
        ``magnitude`` is each op's expected bin as a fraction of its range (0 = first bin,
        1 = last). The first entry (``update=0``) holds the initial policy."""
        k = len(self.op_names)

        def entry(n: float, ops: list[float], mags: list[float]) -> dict[str, Any]:
            return {
                "update": int(n),
                "op_weights": dict(zip(self.op_names, ops, strict=True)),
                "magnitude": {self.op_names[i]: mags[i] for i in self._mag_policies},
            }

        out = [entry(*self._initial)]
        out += [entry(row[0], row[1 : 1 + k], row[1 + k :]) for row in self._history.rows()]
        return out

    def metrics(self) -> dict[str, float]:
        """A flat dict for any logger: ``updates``, ``reference_batches_skipped``,
        ``nonfinite_rewards``, ``op_entropy``, ``op_weight/<op>`` and ``magnitude/<op>`` (the
        expected bin as a fraction of the op's range)."""
        m: dict[str, float] = {
            "updates": self._updates,
            "reference_batches_skipped": self._reference_skipped,
            "nonfinite_rewards": self._nonfinite,
            "op_entropy": self._op_policy.metrics()["entropy"],
        }
        for name, p in self.op_weights.items():
            m[f"op_weight/{name}"] = p
        mags = self._mean_bins()
        for i in self._mag_policies:
            m[f"magnitude/{self.op_names[i]}"] = mags[i]
        return m

    def state_dict(self) -> dict[str, Any]:
        """Both policies, counters and history (torchdata's ``Stateful`` protocol)."""
        return {
            "version": _STATE_VERSION,
            "ops": list(self.op_names),
            "bins": [len(m) if m is not None else 0 for m, _ in self.table.values()],
            "table": {
                k: (None if m is None else torch.tensor(m, dtype=torch.float64), sg)
                for k, (m, sg) in self.table.items()
            },
            "op_policy": self._op_policy.state_dict(),
            "magnitude_policies": {
                self.op_names[i]: p.state_dict() for i, p in self._mag_policies.items()
            },
            "counters": [self._updates, self._reference_skipped, self._nonfinite],
            "history": self._history.state(),
            "history_every": self._history.every,
            "history_limit": self._history.limit,
            "learn": [self.learn_ops, self.learn_magnitudes],
        }

    def check_state(self, state: Any, path: str = "state") -> None:
        """Raise ``ValueError`` naming the field unless ``state`` is a :meth:`state_dict` this
        policy can load: of this op table and settings, every field of the right type, shape
        and range, its counters and history consistent. Changes nothing."""
        self._parse(state, path)

    def _parse(self, state: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"{path} should be a GARTransform or AugmentPolicy state_dict() of version "
                f"{_STATE_VERSION}, but got {type(state).__name__}"
                + (f" with version={state.get('version')!r}" if isinstance(state, Mapping) else "")
            )
        check_keys(state, _STATE_KEYS, "GARTransform.state_dict()")
        bins = [len(m) if m is not None else 0 for m, _ in self.table.values()]
        ops, their_bins = state["ops"], state["bins"]
        if (
            not isinstance(ops, list | tuple)
            or list(ops) != self.op_names
            or not isinstance(their_bins, list | tuple)
            or list(their_bins) != bins
        ):
            raise ValueError(
                f"{path} is for ops {f.describe(ops)} with bins {f.describe(their_bins)} "
                f"(state['ops'], state['bins']), but this policy has ops {self.op_names} with "
                f"bins {bins}"
            )
        table = f.mapping(f"{path}['table']", state["table"])
        mine = {k: (None if m is None else list(m), bool(sg)) for k, (m, sg) in self.table.items()}
        theirs: dict[str, Any] = {}
        for op, spec in table.items():
            if not (
                isinstance(spec, tuple | list)
                and len(spec) == 2
                and isinstance(spec[1], bool)
                and (spec[0] is None or isinstance(spec[0], Tensor))
            ):
                raise f.refuse(f"{path}['table'][{op!r}]", "a pair (magnitudes, signed)", spec)
            theirs[op] = (None if spec[0] is None else spec[0].tolist(), spec[1])
        if theirs != mine:
            diff = sorted({*mine, *theirs} - {k for k in mine if theirs.get(k) == mine[k]})
            raise ValueError(
                f"{path}['table'] is another op table: op(s) {diff} have other magnitudes or signs"
            )
        learn = state.get("learn")
        if learn is not None:
            mine_learn = [self.learn_ops, self.learn_magnitudes]
            if not isinstance(learn, list | tuple) or list(learn) != mine_learn:
                raise ValueError(
                    f"{path}['learn'] has [learn_ops, learn_magnitudes]={f.describe(learn)}, but "
                    f"this policy has {mine_learn}: a resumed run keeps the settings it was "
                    "built with (docs/howto-resume.md)"
                )
        limit = state.get("history_limit", self._history.limit)
        if "history_limit" in state and limit != self._history.limit:
            raise ValueError(
                f"{path}['history_limit'] has history_limit={limit!r}, but this policy has "
                f"history_limit={self._history.limit!r}: a resumed run keeps the settings it "
                "was built with (docs/howto-resume.md)"
            )
        op_policy = parse_policy_state(
            state["op_policy"], f"{path}['op_policy']", self._op_policy, "this policy"
        )
        mags = f.mapping(f"{path}['magnitude_policies']", state["magnitude_policies"])
        names = [self.op_names[i] for i in self._mag_policies]
        check_keys(mags, names, "GARTransform.state_dict()['magnitude_policies']")
        extra = [k for k in mags if k not in names]
        if extra:
            raise ValueError(
                f"{path}['magnitude_policies'] holds op(s) {extra} that have no magnitudes here"
            )
        magnitudes = [
            parse_policy_state(
                mags[self.op_names[i]],
                f"{path}['magnitude_policies'][{self.op_names[i]!r}]",
                p,
                "this policy",
            )
            for i, p in self._mag_policies.items()
        ]
        updates, skipped, nonfinite = f.integers(f"{path}['counters']", state["counters"], 3, lo=0)
        every = state.get("history_every")
        if every is not None:
            every = f.integer(f"{path}['history_every']", every, lo=1)
            if every & (every - 1):
                raise ValueError(
                    f"{path}['history_every'] should be a power of two, but got {every}"
                )
        rows, every = self._history.parse(
            state["history"], f"{path}['history']", updates, every, f"{path}['counters'][0]"
        )
        k = len(self.op_names)
        if len(rows):
            hpath = f"{path}['history']"
            numbers = torch.arange(1, len(rows) + 1, dtype=torch.float64) * every
            if not torch.equal(rows[:, 0], numbers):
                raise ValueError(
                    f"{hpath} should number its rows {every}, {2 * every}, ... (one kept every "
                    f"{every} updates), but numbers them {rows[:, 0].tolist()[:8]}..."
                )
            probs = rows[:, 1 : 1 + k]
            if not bool(((probs >= 0) & (probs <= 1)).all()) or not bool(
                ((probs.sum(1) - 1).abs() <= 1e-6).all()
            ):
                raise ValueError(f"{hpath} should hold op probabilities that sum to 1")
            mean_bins = rows[:, 1 + k :]
            has = torch.tensor([i in self._mag_policies for i in range(k)])
            ok = torch.where(has, (mean_bins >= 0) & (mean_bins <= 1), torch.isnan(mean_bins))
            if not bool(ok.all()):
                raise ValueError(
                    f"{hpath} should hold each op's mean bin in [0, 1] (NaN for ops without "
                    "magnitudes)"
                )
        return op_policy, magnitudes, (updates, skipped, nonfinite), rows, every

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The whole state is checked first
        (:meth:`check_state`): one of another op table or other settings, or with any field
        out of place, raises ``ValueError`` naming it and changes nothing."""
        op_policy, magnitudes, counters, rows, every = self._parse(state, "state")
        for pol, (logits, running, policy_counters) in zip(
            self._policies(), [op_policy, *magnitudes], strict=True
        ):
            pol._load_parsed(logits, running, policy_counters)
        self._updates, self._reference_skipped, self._nonfinite = counters
        self._history._set(rows)
        self._history.every, self._history.seen = every, counters[0]
        self._bin_probs = None
        self.loads += 1  # a GARSampler's drawing copy re-syncs on it
