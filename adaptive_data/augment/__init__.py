"""Learned augmentation: the op table and its policy (no image code), and GARTransform.

:class:`GARTransform` and :func:`apply_op` subclass and call torchvision's ``transforms.v2``,
whose import takes seconds: they are imported on first use.
"""

from typing import TYPE_CHECKING, Any

from ._policy import KERNELS, AugmentPolicy, AugmentStatistics, trivial_augment_wide_table

if TYPE_CHECKING:
    from ._transform import GARTransform, apply_op


def __getattr__(name: str) -> Any:
    if name in ("GARTransform", "apply_op"):
        from . import _transform

        return getattr(_transform, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KERNELS",
    "AugmentPolicy",
    "AugmentStatistics",
    "GARTransform",
    "apply_op",
    "trivial_augment_wide_table",
]
