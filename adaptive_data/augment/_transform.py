"""GARTransform: a TrivialAugment-style torchvision v2 transform whose policy is learned.

The image code lives here (which inputs are images, applying one op with torchvision's
``transforms.v2.functional`` kernels); what is learned lives in :class:`AugmentPolicy`.
"""

from __future__ import annotations

import inspect
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


# The AugmentPolicy's members, read through GARTransform.policy (named in an AttributeError).
_POLICY_MEMBERS = frozenset(
    {
        *("table", "op_names", "learn_ops", "learn_magnitudes", "op_weights"),
        *("magnitude_weights", "magnitude", "draw", "statistics", "statistics_of"),
        *("update", "history", "metrics", "check_state"),
    }
)
# The keyword options of the AugmentPolicy a GARTransform makes (all but its op table).
_POLICY_OPTIONS = frozenset(inspect.signature(AugmentPolicy).parameters) - {"ops"}


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
        ops: the op table (see :class:`AugmentPolicy`); default: TrivialAugmentWide's.
        interpolation: of the geometric ops: an ``InterpolationMode`` or its name (default
            nearest, as TrivialAugmentWide).
        fill: of the geometric ops (default None: black).
        generator: for standalone calls only.
        policy: an :class:`AugmentPolicy` to use (shared, not copied).
        **policy_options: the options of the :class:`AugmentPolicy` made from ``ops``
            (``num_magnitude_bins``, ``learn_ops``, ``learn_magnitudes``, ``floor``, ``lr``,
            ``magnitude_lr``, ``rule``, ``normalize``; documented there). Learning is off by
            default: the frozen policy is TrivialAugmentWide's distribution drawn through the
            sampler (docs/howto-augment.md says what learning was measured to do).

    The learned part is :attr:`policy` (its weights, history, metrics, update); this object
    applies its decisions to images.
    """

    def __init__(
        self,
        ops: Any = None,
        *,
        interpolation: Any = None,
        fill: Any = None,
        generator: torch.Generator | None = None,
        policy: AugmentPolicy | None = None,
        **policy_options: Any,
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
        unknown = sorted(set(policy_options) - _POLICY_OPTIONS)
        if unknown:
            raise TypeError(
                f"GARTransform got unexpected keyword argument(s) {unknown}; the policy's "
                f"options are {sorted(_POLICY_OPTIONS)}"
            )
        if policy is None:
            policy = AugmentPolicy(ops, **policy_options)
        elif not isinstance(policy, AugmentPolicy):
            raise TypeError(f"policy should be an AugmentPolicy, but got {type(policy).__name__}")
        elif ops is not None or policy_options:
            given = (["ops"] if ops is not None else []) + sorted(policy_options)
            raise ValueError(
                "pass either policy= or the arguments that configure one, but got policy= "
                f"and {', '.join(given)}"
            )
        self.policy = policy
        self.interpolation = _interpolation(interpolation)
        self.fill = fill
        self.generator = generator
        # The decision armed by the sampler's dataset for the example being fetched, in a
        # holder set once: nn.Module.__setattr__ would cost ~10 us per assignment per example.
        self._slot = _Slot()

    def __getattr__(self, name: str) -> Any:
        if name in _POLICY_MEMBERS:  # they lived here once: say where they are
            raise AttributeError(
                f"'GARTransform' object has no attribute {name!r}: it is the policy's, "
                f"transform.policy.{name}"
            )
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        p = self.policy
        return (
            f"ops={len(p.op_names)}, learn_ops={p.learn_ops}, learn_magnitudes={p.learn_magnitudes}"
        )

    # ------------------------------------------------------------------ state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The policy's :meth:`AugmentPolicy.state_dict` (torchdata's ``Stateful`` protocol).

        Called with ``nn.Module.state_dict``'s arguments (a parent module collecting its
        children's state) it is that method, and the policy's state rides in its extra state.
        """
        if args or kwargs:
            return super().state_dict(*args, **kwargs)
        return self.policy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
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
