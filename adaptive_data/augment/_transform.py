"""GARTransform: a TrivialAugment-style torchvision v2 transform whose policy is learned.

The image code lives here (which inputs are images, applying one op with torchvision's
``transforms.v2.functional`` kernels); what is learned lives in :class:`AugmentPolicy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image as PILImage
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from .._check import is_real
from ._policy import (
    DEFAULT_OP_LR,
    KERNELS,
    MAGNITUDE_LR_RATIO,
    NO_AUGMENTATION,
    AugmentPolicy,
    AugmentStatistics,
    trivial_augment_wide_table,
)

__all__ = [
    "DEFAULT_OP_LR",
    "KERNELS",
    "MAGNITUDE_LR_RATIO",
    "NO_AUGMENTATION",
    "AugmentPolicy",
    "GARTransform",
    "apply_op",
    "trivial_augment_wide_table",
]

# The tv_tensors TrivialAugmentWide refuses (it raises TypeError on them); other TVTensors it
# passes through untouched, and so does GARTransform. KeyPoints exist from torchvision 0.23.
_REFUSED = tuple(
    t
    for t in (
        tv_tensors.BoundingBoxes,
        tv_tensors.Mask,
        getattr(tv_tensors, "KeyPoints", None),
    )
    if t is not None
)


def _is_image(x: Any) -> bool:
    """Whether ``x`` is what an auto-augment transform augments: a PIL image, a
    ``tv_tensors.Image`` or ``Video``, or a plain Tensor (v2 treats the first one as an image
    when the sample holds no explicit image)."""
    if isinstance(x, PILImage.Image | tv_tensors.Image | tv_tensors.Video):
        return True
    return isinstance(x, Tensor) and not isinstance(x, tv_tensors.TVTensor)


def _check_image(image: Any) -> None:
    if isinstance(image, PILImage.Image):
        if image.mode not in ("L", "RGB"):
            raise TypeError(
                f"PIL images should be in mode 'L' or 'RGB', but got mode={image.mode!r}"
            )
        return
    if isinstance(image, Tensor):
        if isinstance(image, tv_tensors.TVTensor) and not isinstance(
            image, tv_tensors.Image | tv_tensors.Video
        ):
            raise TypeError(
                f"GARTransform augments images, but got a tv_tensors.{type(image).__name__} (as "
                "TrivialAugmentWide, it does not take masks, boxes or keypoints)"
            )
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(
                "image tensors should have dtype torch.uint8 (values 0..255) or a floating-point "
                f"dtype (values in [0, 1]), but got dtype={image.dtype}"
            )
        if image.dim() < 3 or image.shape[-3] not in (1, 3):
            raise ValueError(
                "image tensors should have shape [..., 1 or 3, H, W], "
                f"but got shape={tuple(image.shape)}"
            )
        return
    raise TypeError(
        "GARTransform takes one image: a PIL image, a uint8 or float torch.Tensor "
        f"[..., C, H, W], a tv_tensors.Image or Video, but got {type(image).__name__}"
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
    threshold is ``magnitude`` times the image's maximum value (255 for uint8 and PIL images,
    1 for floating-point ones). Returns the same type as ``image`` (PIL image, Tensor,
    ``tv_tensors.Image`` or ``Video``); a batch ``[..., C, H, W]`` gets the one op throughout.
    """
    _check_image(image)
    return _kernel(image, op, magnitude, _interpolation(interpolation), fill)


def _interpolation(value: Any) -> InterpolationMode:
    if value is None:
        return InterpolationMode.NEAREST
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, str):
        try:
            return InterpolationMode(value)
        except ValueError:
            pass
    raise ValueError(
        "interpolation should be None, an InterpolationMode or its name "
        f"({', '.join(m.value for m in InterpolationMode)}), but got interpolation={value!r}"
    )


def _kernel(image: Any, op: str, magnitude: float, interpolation: Any, fill: Any) -> Any:
    """:func:`apply_op` on an image already checked (GARTransform checks once per call)."""
    F = v2.functional
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
        # The image's maximum value: uint8 tensors and 8-bit PIL images 255, float ones 1.
        floating = isinstance(image, Tensor) and image.is_floating_point()
        return F.solarize(image, threshold=(1.0 if floating else 255.0) * magnitude)
    if op == "AutoContrast":
        return F.autocontrast(image)
    if op == "Equalize":
        return F.equalize(image)
    if op == "Invert":
        return F.invert(image)
    raise ValueError(f"unknown op {op!r}; the ops are {', '.join(KERNELS)}")


class _Slot:
    """The decision armed for the next call, and the calls made since it was armed."""

    __slots__ = ("calls", "decision")

    def __init__(self) -> None:
        self.decision: tuple[int, int, bool] | None = None
        self.calls = 0


# The arguments that configure the policy, with their defaults (GARTransform(policy=...) takes
# none of them).
_POLICY_DEFAULTS: dict[str, Any] = {
    "ops": None,
    "num_magnitude_bins": 31,
    "learn_ops": False,
    "learn_magnitudes": False,
    "floor": None,
    "lr": None,
    "magnitude_lr": None,
    "rule": "exp_grad",
    "normalize": "batch",
}


class GARTransform(v2.Transform):
    """A TrivialAugment-style ``torchvision.transforms.v2`` transform whose policy is learned.

    Each image gets one op from an op table and one magnitude bin of that op, like
    ``TrivialAugmentWide``, but from the learned distributions of an :class:`AugmentPolicy`
    (:attr:`policy`): a categorical over ops and, per op, over its magnitude bins. Signed ops
    are negated with probability 1/2 (not learned).

    Put it anywhere in an ordinary ``transforms.v2.Compose`` and hand it to the sampler::

        tf = GARTransform()
        pipeline = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), tf,
                               v2.ToDtype(torch.float32, scale=True)])
        sampler = GARSampler(train_set, batch_size=128, transform=tf)

    Inputs are those of ``TrivialAugmentWide``: one image (a PIL image in mode L or RGB, a
    uint8 or floating-point Tensor ``[..., 1 or 3, H, W]``, a ``tv_tensors.Image`` or
    ``Video``), alone or inside any tuple, list or dict; everything else in the sample
    (labels, other Tensors when an explicit image is present) passes through untouched, as
    v2 transforms do. Masks, boxes and keypoints are refused, as ``TrivialAugmentWide`` refuses
    them. The output has the input's structure and types.

    One decision per call. Used alone (evaluation, a notebook), a call draws one decision from
    the current policy, from ``generator`` if given, else from torch's default generator (which
    a DataLoader seeds per worker), and a batched Tensor ``[B, C, H, W]`` gets that one op and
    magnitude throughout, as ``TrivialAugmentWide`` does. Inside a GAR pipeline the sampler
    draws a decision for every example in the main process and carries it in the key; the
    dataset wrapper :meth:`arm`\\ s the ``tf`` in the pipeline with it just before the source
    fetches that example, so each example gets its own decision, the worker's copy never needs
    the live policy, and ``sampler.update(r)`` updates the policy.

    Args:
        ops: the op table (see :class:`AugmentPolicy`, as are the next eight).
        num_magnitude_bins: bins of the default table.
        learn_ops: ``True`` learns the op policy from the rewards. Off by default: in
            ``benchmarks/augment_study.py`` (digits, Fashion-MNIST, low-data CIFAR-10, 6 seeds)
            no variant of the learning beat its frozen control on two data sets of three. With
            both off this is the frozen control: TrivialAugmentWide's distribution drawn through
            the same pipeline (with the sampler's un-augmented reference batches, no worse than
            TrivialAugmentWide on every data set measured).
        learn_magnitudes: ``True`` learns the magnitude policies (off by default, as above).
        floor: exploration floor of every policy.
        lr: step size of the op policy.
        magnitude_lr: step size of the magnitude policies.
        rule: the policies' update rule.
        normalize: the policies' reward normalisation.
        interpolation: of the geometric ops: an ``InterpolationMode`` or its name (default
            nearest, as TrivialAugmentWide).
        fill: of the geometric ops (default None: black).
        generator: for standalone calls only.
        policy: an :class:`AugmentPolicy` to use (shared, not copied) instead of the arguments
            above that configure one.
    """

    def __init__(
        self,
        ops: Any = None,
        *,
        num_magnitude_bins: int = 31,
        interpolation: Any = None,
        fill: Any = None,
        learn_ops: bool = False,
        learn_magnitudes: bool = False,
        floor: float | None = None,
        lr: float | None = None,
        magnitude_lr: float | None = None,
        rule: str = "exp_grad",
        normalize: str = "batch",
        generator: torch.Generator | None = None,
        policy: AugmentPolicy | None = None,
    ) -> None:
        super().__init__()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator should be a torch.Generator, but got {type(generator).__name__}"
            )
        if fill is not None and not (
            is_real(fill) or (isinstance(fill, Sequence) and all(is_real(v) for v in fill))
        ):
            raise TypeError(
                "fill should be None, a number or a sequence of numbers (one per channel), used "
                f"for every image, but got fill={fill!r}"
            )
        given = {
            "ops": ops,
            "num_magnitude_bins": num_magnitude_bins,
            "learn_ops": learn_ops,
            "learn_magnitudes": learn_magnitudes,
            "floor": floor,
            "lr": lr,
            "magnitude_lr": magnitude_lr,
            "rule": rule,
            "normalize": normalize,
        }
        if policy is None:
            policy = AugmentPolicy(**given)
        elif not isinstance(policy, AugmentPolicy):
            raise TypeError(f"policy should be an AugmentPolicy, but got {type(policy).__name__}")
        else:
            other = [k for k, v in given.items() if v != _POLICY_DEFAULTS[k]]
            if other:
                raise ValueError(
                    "pass either policy= or the arguments that configure one, but got policy= "
                    f"and {', '.join(other)}"
                )
        self.policy = policy
        self.interpolation = _interpolation(interpolation)
        self.fill = fill
        self.generator = generator
        # The decision armed by the sampler's dataset for the example being fetched, in a
        # holder set once: nn.Module.__setattr__ would cost ~10 us per assignment per example.
        self._slot = _Slot()

    def extra_repr(self) -> str:
        p = self.policy
        return (
            f"ops={len(p.op_names)}, learn_ops={p.learn_ops}, learn_magnitudes={p.learn_magnitudes}"
        )

    # ------------------------------------------------------------------ the policy's view

    @property
    def table(self) -> dict[str, tuple[list[float] | None, bool]]:
        """The op table ``{op: (magnitudes, signed)}`` (the policy's)."""
        return self.policy.table

    @property
    def op_names(self) -> list[str]:
        """The ops of the table, in the order of their ids."""
        return self.policy.op_names

    @property
    def learn_ops(self) -> bool:
        """Whether the op policy learns (the policy's flag)."""
        return self.policy.learn_ops

    @property
    def learn_magnitudes(self) -> bool:
        """Whether the magnitude policies learn (the policy's flag)."""
        return self.policy.learn_magnitudes

    @property
    def op_weights(self) -> dict[str, float]:
        """``{op name: probability}``; sums to 1."""
        return self.policy.op_weights

    @property
    def magnitude_weights(self) -> dict[str, list[float]]:
        """``{op name: [probability of each magnitude bin]}`` for the ops with magnitudes."""
        return self.policy.magnitude_weights

    def magnitude(self, op: int, bin: int, negate: bool = False) -> float | None:
        """:meth:`AugmentPolicy.magnitude`."""
        return self.policy.magnitude(op, bin, negate)

    def draw(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`AugmentPolicy.draw`: ``n`` decisions (op ids, bins, negations), Tensors [n]."""
        return self.policy.draw(n, generator)

    def statistics(
        self, ops: Sequence[int] | Tensor, bins: Sequence[int] | Tensor, rewards: Tensor
    ) -> AugmentStatistics:
        """:meth:`AugmentPolicy.statistics`."""
        return self.policy.statistics(ops, bins, rewards)

    def statistics_of(
        self, ops: Sequence[int], bins: Sequence[int], r_all: list[float]
    ) -> AugmentStatistics:
        """:meth:`AugmentPolicy.statistics_of`."""
        return self.policy.statistics_of(ops, bins, r_all)

    def apply(self, stats: Any) -> Any:  # type: ignore[override]
        """:meth:`AugmentPolicy.apply`: update the policy from :meth:`statistics`.

        (A function instead of statistics gets ``nn.Module.apply``'s meaning, so that a module
        holding this transform can still ``apply(fn)`` to its children.)
        """
        if callable(stats):
            return super().apply(stats)
        self.policy.apply(stats)
        return None

    def update(
        self, ops: Sequence[int] | Tensor, bins: Sequence[int] | Tensor, rewards: Tensor
    ) -> None:
        """:meth:`AugmentPolicy.update`: learn from one batch's decisions and rewards ``[N]``."""
        self.policy.update(ops, bins, rewards)

    @property
    def history(self) -> list[dict[str, Any]]:
        """:attr:`AugmentPolicy.history`."""
        return self.policy.history

    def metrics(self) -> dict[str, float]:
        """:meth:`AugmentPolicy.metrics`."""
        return self.policy.metrics()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The policy's :meth:`AugmentPolicy.state_dict` (torchdata's ``Stateful`` protocol).

        Called with ``nn.Module.state_dict``'s arguments (a parent module collecting its
        children's state) it is that method, and the policy's state rides in its extra state.
        """
        if args or kwargs:
            return super().state_dict(*args, **kwargs)
        return self.policy.state_dict()

    def check_state(self, state: Any) -> None:
        """:meth:`AugmentPolicy.check_state`."""
        self.policy.check_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`; raises if it belongs to another op table."""
        self.policy.load_state_dict(state)

    def get_extra_state(self) -> dict[str, Any]:
        """The policy's state, for ``nn.Module.state_dict`` of a module holding this one."""
        return self.policy.state_dict()

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state` (``nn.Module.load_state_dict`` of a holder)."""
        self.policy.load_state_dict(state)

    # ------------------------------------------------------------------ decisions from keys

    def arm(self, op: int, bin: int, negate: bool) -> None:
        """Make the next call apply the decision ``(op, bin, negate)`` instead of drawing one.

        ``op`` may be ``NO_AUGMENTATION`` (the image is left as it is). The sampler's dataset
        arms the transform for each example it fetches and :meth:`disarm`\\ s it afterwards.
        """
        slot = self._slot
        slot.decision, slot.calls = (op, bin, negate), 0

    def disarm(self, where: str | None = None) -> None:
        """End the decision of :meth:`arm`. With ``where`` (the example, for the message),
        raise if the transform was not called since: it is not in that example's pipeline."""
        slot = self._slot
        called, slot.decision, slot.calls = slot.calls, None, 0
        if where is not None and not called:
            raise RuntimeError(
                f"the GARSampler's transform= was not called while {where} was fetched: this "
                "GARTransform is not in that source's pipeline (every source's own transform "
                "should contain the very object passed as transform=)"
            )

    # ------------------------------------------------------------------ v2.Transform

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Check the sample (one image, nothing TrivialAugmentWide refuses) and decide the op
        and magnitude: the armed decision, else one drawn from the policy."""
        for x in flat_inputs:
            if isinstance(x, _REFUSED):
                _check_image(x)  # raises, naming the type
        images = [x for x in flat_inputs if _is_image(x)]
        if len(images) != 1:
            raise TypeError(
                "GARTransform augments one image per call (a PIL image, a Tensor [..., C, H, W], "
                "a tv_tensors.Image or Video, alone or in a tuple, list or dict), but found "
                + ("none in the sample" if not images else f"{len(images)} in the sample")
            )
        _check_image(images[0])
        slot = self._slot
        if slot.decision is not None:
            if slot.calls:
                raise RuntimeError(
                    "this GARTransform was called twice for one example; it should appear once "
                    "in the pipeline of each source"
                )
            slot.calls += 1
            op, bin, negate = slot.decision
        else:
            ops, bins, neg = self.policy.draw(1, self.generator)
            op, bin, negate = int(ops[0]), int(bins[0]), bool(neg[0])
        if op == NO_AUGMENTATION:
            return {"op": None, "magnitude": 0.0}
        value = self.policy.magnitude(op, bin, negate)
        return {"op": self.policy.op_names[op], "magnitude": 0.0 if value is None else value}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the decided op to the image; pass anything else through."""
        if params["op"] is None or not _is_image(inpt):
            return inpt
        return _kernel(inpt, params["op"], params["magnitude"], self.interpolation, self.fill)

    # torchvision 0.19 and 0.20 call these two hooks by their former names.
    _get_params = make_params
    _transform = transform
