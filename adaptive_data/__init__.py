"""adaptive_data: learn, while a model trains, which data to draw and how to augment it.

The public surface is re-exported here; the modules behind it are private.
"""

from typing import TYPE_CHECKING, Any

from ._augment_policy import KERNELS, AugmentPolicy, AugmentStatistics, trivial_augment_wide_table
from ._batch import split_batch
from ._gar import GAR
from ._ghost import GhostRule, ghost_rules, register_ghost_rule
from ._mixture_dataset import MixtureDataset
from ._policy import CategoricalPolicy, ChoiceStatistics
from ._probe import METHODS, REWARDS, GradientProbe
from ._reference import ReferenceBatches
from ._sampler import GARSampler

if TYPE_CHECKING:  # imported on first use (below); type checkers see them here
    from ._augment import GARTransform, apply_op


def __getattr__(name: str) -> Any:
    # GARTransform and apply_op subclass and call torchvision's transforms.v2, whose import
    # takes seconds: it happens on first use, not at `import adaptive_data`.
    if name in ("GARTransform", "apply_op"):
        from . import _augment

        return getattr(_augment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0.dev0"

__all__ = [
    "GAR",
    "KERNELS",
    "METHODS",
    "REWARDS",
    "AugmentPolicy",
    "AugmentStatistics",
    "CategoricalPolicy",
    "ChoiceStatistics",
    "GARSampler",
    "GARTransform",
    "GhostRule",
    "GradientProbe",
    "MixtureDataset",
    "ReferenceBatches",
    "__version__",
    "apply_op",
    "ghost_rules",
    "register_ghost_rule",
    "split_batch",
    "trivial_augment_wide_table",
]
