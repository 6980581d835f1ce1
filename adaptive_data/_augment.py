"""GARTransform: a TrivialAugment-style augmentation whose op and magnitude policies are learned."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image as PILImage
from torch import Tensor

from ._check import check_int, check_keys, is_real
from ._history import History
from ._policy import (
    DEFAULT_LR,
    STATS_HEAD,
    CategoricalPolicy,
    check_policy_state,
    check_rewards,
)

__all__ = ["KERNELS", "NO_AUGMENTATION", "GARTransform", "apply_op", "trivial_augment_wide_table"]

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
_STATE_VERSION = 2  # 2: the history as float64 tensors, the op table
# Keys of GARTransform.state_dict().
_STATE_KEYS = (
    "version",
    "ops",
    "bins",
    "table",
    "op_policy",
    "magnitude_policies",
    "counters",
    "history",
)

# Step sizes of the exponentiated-gradient policies. Its step for a choice is its summed
# z-scored reward over N * p (importance weighting): with a batch of 128 spread over 14 ops,
# an op sees ~9 examples and a magnitude bin of 31 well under one, so the per-update noise of
# a bin's step is ~30x an op's. The magnitudes get 0.3 of the ops' step (a guess, not tuned).
DEFAULT_OP_LR = 0.1
MAGNITUDE_LR_RATIO = 0.3


def trivial_augment_wide_table(num_bins: int = 31) -> dict[str, tuple[list[float] | None, bool]]:
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


def _check_image(image: Any) -> None:
    if isinstance(image, PILImage.Image):
        if image.mode not in ("L", "RGB"):
            raise TypeError(
                f"PIL images should be in mode 'L' or 'RGB', but got mode={image.mode!r}"
            )
        return
    if isinstance(image, Tensor):
        from torchvision import tv_tensors

        if isinstance(image, tv_tensors.TVTensor) and not isinstance(
            image, (tv_tensors.Image, tv_tensors.Video)
        ):
            raise TypeError(
                f"GARTransform augments images, but got a tv_tensors.{type(image).__name__} (as "
                "TrivialAugmentWide, it does not take masks, boxes or keypoints)"
            )
        if image.dtype != torch.uint8:
            raise TypeError(
                "image tensors should have dtype torch.uint8 (as for TrivialAugmentWide; convert "
                f"to float after the augmentation), but got dtype={image.dtype}"
            )
        if image.dim() < 3 or image.shape[-3] not in (1, 3):
            raise ValueError(
                "image tensors should have shape [..., 1 or 3, H, W], "
                f"but got shape={tuple(image.shape)}"
            )
        return
    raise TypeError(
        "GARTransform takes one image: a PIL image, a uint8 torch.Tensor [..., C, H, W] or a "
        f"tv_tensors.Image, but got {type(image).__name__}"
    )


def apply_op(
    image: Any,
    op: str,
    magnitude: float,
    interpolation: Any = None,
    fill: Any = None,
) -> Any:
    """Apply one op at ``magnitude`` with ``torchvision.transforms.v2.functional`` kernels.

    The conventions are torchvision's auto-augment ones: shear ``magnitude`` is the shear
    factor (the kernel gets ``degrees(atan(magnitude))``, about the top-left corner),
    translations are in pixels (truncated to int), rotation in degrees, the colour ops use
    the factor ``1 + magnitude``, posterize keeps ``int(magnitude)`` bits, and solarize's
    threshold is ``magnitude`` times the image's maximum value. Returns the same type as
    ``image`` (PIL image, Tensor or ``tv_tensors.Image``).
    """
    _check_image(image)
    return _kernel(image, op, magnitude, interpolation, fill)


def _kernel(image: Any, op: str, magnitude: float, interpolation: Any, fill: Any) -> Any:
    """:func:`apply_op` on an image already checked (GARTransform checks once per call)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if interpolation is None:
        interpolation = InterpolationMode.NEAREST
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return F.affine(
            image,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0] if op == "ShearX" else [0.0, shear],
            interpolation=interpolation,
            fill=fill,
            center=[0, 0],
        )
    if op in ("TranslateX", "TranslateY"):
        shift = int(magnitude)
        return F.affine(
            image,
            angle=0.0,
            translate=[shift, 0] if op == "TranslateX" else [0, shift],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=interpolation,
            fill=fill,
        )
    if op == "Rotate":
        return F.rotate(image, angle=magnitude, interpolation=interpolation, fill=fill)
    if op == "Brightness":
        return F.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return F.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return F.posterize(image, bits=int(magnitude))
    if op == "Solarize":
        bound = 255.0  # uint8 tensors and 8-bit PIL images, the only inputs accepted
        return F.solarize(image, threshold=bound * magnitude)
    if op == "AutoContrast":
        return F.autocontrast(image)
    if op == "Equalize":
        return F.equalize(image)
    if op == "Invert":
        return F.invert(image)
    raise ValueError(f"unknown op {op!r}; the ops are {', '.join(KERNELS)}")


# Ops whose magnitude is a bit count or a fraction of the image's range (torchvision raises
# outside these, at the first image): checked when a table is given.
_RANGES = {"Posterize": (0.0, 8.0), "Solarize": (0.0, 1.0)}


def _resolve_table(ops: Any, num_bins: int) -> dict[str, tuple[list[float] | None, bool]]:
    default = trivial_augment_wide_table(num_bins)
    if ops is None:
        return default
    if isinstance(ops, str):
        raise TypeError(
            f"ops should be a list of op names or a mapping op -> (magnitudes, signed), but got "
            f"the string {ops!r}"
        )
    if isinstance(ops, Mapping):
        table: dict[str, tuple[list[float] | None, bool]] = {}
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


class GARTransform:
    """A TrivialAugment-style augmentation whose policy is learned from rewards.

    Each image gets one op from an op table and one magnitude bin of that op, like
    ``TrivialAugmentWide``, but from two learned distributions: a categorical over ops and,
    per op, a categorical over its magnitude bins (each a :class:`CategoricalPolicy` with an
    exploration floor). Signed ops are negated with probability 1/2 (not learned).

    Put it anywhere in an ordinary ``transforms.v2.Compose`` and hand it to the sampler::

        tf = GARTransform()
        pipeline = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), tf,
                               v2.ToDtype(torch.float32, scale=True)])
        sampler = GARSampler(train_set, batch_size=128, transform=tf)

    Inside a GAR pipeline the sampler draws every decision (op, bin, sign) in the main process
    and carries it in the key; the dataset wrapper arms the ``tf`` inside the pipeline with it
    just before the source fetches the example, so the worker's copy applies the decision and
    never needs the live policy. ``sampler.update(r)`` then updates both policies. Used alone
    (evaluation, a notebook), ``tf(img)`` samples from its current policy, from ``generator``
    if given, else from torch's default generator (which a DataLoader seeds per worker), like
    torchvision's transforms.

    Args:
        ops: ``None`` (TrivialAugmentWide's 14 ops), a list of some of those op names, or a
            table ``{op: (magnitudes, signed)}`` with ``magnitudes`` a sequence of >= 2 values
            (``None`` for Identity, AutoContrast, Equalize, Invert); see :data:`KERNELS` and
            :func:`apply_op` for the names and the meaning of a magnitude.
        num_magnitude_bins: bins of the default table (>= 2).
        interpolation: of the geometric ops (default nearest, as TrivialAugmentWide).
        fill: of the geometric ops (default None: black).
        learn_ops, learn_magnitudes: ``False`` freezes that policy at its initial weights.
        floor: exploration floor of every policy (default ``0.05 / K`` of each).
        lr: step size of the op policy (default 0.1 for ``rule="exp_grad"``, the policy's
            default for ``"reinforce"``).
        magnitude_lr: step size of the magnitude policies (default ``0.3 * lr``).
        rule, normalize: of the policies (see :class:`CategoricalPolicy`).
        generator: for standalone calls only.

    Inputs: a PIL image (mode L or RGB), a uint8 Tensor ``[..., 1 or 3, H, W]`` or a
    ``tv_tensors.Image``; the output has the input's type.
    """

    def __init__(
        self,
        ops: Any = None,
        *,
        num_magnitude_bins: int = 31,
        interpolation: Any = None,
        fill: Any = None,
        learn_ops: bool = True,
        learn_magnitudes: bool = True,
        floor: float | None = None,
        lr: float | None = None,
        magnitude_lr: float | None = None,
        rule: str = "exp_grad",
        normalize: str = "batch",
        generator: torch.Generator | None = None,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator should be a torch.Generator, but got {type(generator).__name__}"
            )
        for name, flag in (("learn_ops", learn_ops), ("learn_magnitudes", learn_magnitudes)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} should be a bool, but got {name}={flag!r}")
        if fill is not None and not (
            is_real(fill) or (isinstance(fill, Sequence) and all(is_real(v) for v in fill))
        ):
            raise TypeError(
                "fill should be None, a number or a sequence of numbers (one per channel), used "
                f"for every image, but got fill={fill!r}"
            )
        self.table = _resolve_table(ops, num_magnitude_bins)
        self.op_names = list(self.table)
        self.interpolation = interpolation
        self.fill = fill
        self.learn_ops = learn_ops
        self.learn_magnitudes = learn_magnitudes
        self.generator = generator

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
        self._history = History(1 + 2 * len(self.op_names))
        self._initial = (0, self._op_policy.probs_list(), self._mean_bins())
        self._updates = 0
        self._reference_skipped = 0
        self._nonfinite = 0  # NaN/inf rewards of augmented examples, never applied
        # The decision armed by the sampler's dataset for the example being fetched.
        self._armed: tuple[int, int, bool] | None = None
        self._calls = 0

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

    # ------------------------------------------------------------------ applying

    def _apply(self, image: Any, op: int, bin: int, negate: bool) -> Any:
        if op == NO_AUGMENTATION:
            return image
        value = self.magnitude(op, bin, negate)
        name = self.op_names[op]
        return _kernel(image, name, 0.0 if value is None else value, self.interpolation, self.fill)

    def __call__(self, image: Any) -> Any:
        _check_image(image)
        if self._armed is not None:
            if self._calls:
                raise RuntimeError(
                    "this GARTransform was called twice for one example; it should appear once "
                    "in the pipeline of each source"
                )
            self._calls += 1
            return self._apply(image, *self._armed)
        op, bin, negate = self.draw(1, self.generator)
        return self._apply(image, int(op[0]), int(bin[0]), bool(negate[0]))

    # ------------------------------------------------------------------ used by the sampler

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

    def _arm(self, op: int, bin: int, negate: bool) -> None:
        """Make the next call apply this decision (the sampler's dataset does this per example)."""
        self._armed = (op, bin, negate)
        self._calls = 0

    def _disarm(self, where: str) -> None:
        """End the example armed by :meth:`_arm`; raise if the transform was never called."""
        called, self._armed, self._calls = self._calls, None, 0
        if not called:
            raise RuntimeError(
                f"the GARSampler's transform= was not called while {where} was fetched: this "
                "GARTransform is not in that source's pipeline (every source's own transform "
                "should contain the very object passed as transform=)"
            )

    def statistics(
        self, ops: Sequence[int] | Tensor, bins: Sequence[int] | Tensor, rewards: Tensor
    ) -> list[float]:
        """One batch's sufficient statistics for :meth:`apply` (a fixed-length list of floats:
        the op policy's, then each magnitude policy's; see
        :meth:`CategoricalPolicy.statistics`). Sums over ranks are the statistics of the union.
        Examples with op ``NO_AUGMENTATION`` (reference batches) are left out."""
        if isinstance(ops, Tensor):  # as draw() returns them
            ops = ops.tolist()
        if isinstance(bins, Tensor):
            bins = bins.tolist()
        check_rewards(rewards, len(ops))
        return self.statistics_of(ops, bins, rewards.detach().to("cpu", torch.float64).tolist())

    def statistics_of(
        self, ops: Sequence[int], bins: Sequence[int], r_all: list[float]
    ) -> list[float]:
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
        stats = self._op_policy.statistics_of([ops[i] for i in keep], [r_all[i] for i in keep])
        by_op: dict[int, list[int]] = {}
        for i in keep:
            by_op.setdefault(ops[i], []).append(i)
        for o, pol in self._mag_policies.items():
            idx = by_op.get(o, [])
            stats += pol.statistics_of([bins[i] for i in idx], [r_all[i] for i in idx])
        return stats

    def apply(self, stats: Sequence[float]) -> None:
        """Update both policies from :meth:`statistics` (of one batch, or summed over ranks)."""
        k = len(self.op_names)
        width = STATS_HEAD + 2 * k
        if stats[0] == 0 and stats[1] == 0:  # no augmented example: a reference batch
            self._reference_skipped += 1
            return
        self._nonfinite += round(stats[0])
        if self.learn_ops:
            self._op_policy.apply(stats[:width])
        pos = width
        for pol in self._mag_policies.values():
            w = STATS_HEAD + 2 * pol.num_choices
            part = stats[pos : pos + w]
            pos += w
            if self.learn_magnitudes and (part[0] or part[1]):
                pol.apply(part)
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
        }

    def _table_state(self) -> dict[str, tuple[list[float] | None, bool]]:
        return {k: (None if m is None else list(m), bool(sg)) for k, (m, sg) in self.table.items()}

    def check_state(self, state: Any) -> None:
        """Raise unless ``state`` is a :meth:`state_dict` of a transform with this op table."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"state should be a GARTransform.state_dict() of version {_STATE_VERSION}, "
                f"but got {type(state).__name__}"
            )
        check_keys(state, _STATE_KEYS, "GARTransform.state_dict()")
        bins = [len(m) if m is not None else 0 for m, _ in self.table.values()]
        if list(state["ops"]) != self.op_names or list(state["bins"]) != bins:
            raise ValueError(
                f"state is for ops {list(state['ops'])} with bins {list(state['bins'])}, but "
                f"this transform has ops {self.op_names} with bins {bins}"
            )
        mine = self._table_state()
        theirs = {
            k: (None if m is None else torch.as_tensor(m).tolist(), bool(sg))
            for k, (m, sg) in state["table"].items()
        }
        if theirs != mine:
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            raise ValueError(
                f"state is for another op table: op(s) {diff} have other magnitudes or signs"
            )
        check_policy_state(state["op_policy"])
        mags = state["magnitude_policies"]
        check_keys(
            mags,
            [self.op_names[i] for i in self._mag_policies],
            "GARTransform.state_dict()['magnitude_policies']",
        )
        for i in self._mag_policies:
            check_policy_state(mags[self.op_names[i]])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises if it belongs to another op table."""
        self.check_state(state)
        self._op_policy.load_state_dict(state["op_policy"])
        for i, p in self._mag_policies.items():
            p.load_state_dict(state["magnitude_policies"][self.op_names[i]])
        self._updates, self._reference_skipped, self._nonfinite = (
            int(v) for v in state["counters"]
        )
        self._history.load(state["history"])
        self._bin_probs = None
