"""adaptive_data: learn, while a model trains, which data to draw and how to augment it.

The public surface is re-exported here; the modules behind it are private.
"""

import warnings
from typing import TYPE_CHECKING, Any

from . import augment
from ._batch import split_batch
from ._plot import draw_history, plot_history
from .augment import KERNELS, AugmentPolicy, AugmentStatistics, trivial_augment_wide_table
from .gar import GAR
from .policy import CategoricalPolicy, ChoiceStatistics
from .probe import ESTIMATORS, REWARDS, GradientProbe
from .probe.rules import GhostRule, ghost_rules, register_ghost_rule
from .sampling import GARSampler, MixtureDataset, ReferenceBatches

if TYPE_CHECKING:  # imported on first use (below); type checkers see them here
    from .augment import GARTransform, apply_op


def __getattr__(name: str) -> Any:
    # GARTransform and apply_op subclass and call torchvision's transforms.v2, whose import
    # takes seconds: it happens on first use, not at `import adaptive_data`.
    if name in ("GARTransform", "apply_op"):
        return getattr(augment, name)
    if name == "METHODS":  # the former spelling of ESTIMATORS
        warnings.warn(
            "adaptive_data.METHODS is deprecated: use adaptive_data.ESTIMATORS (the estimator "
            "once spelled 'finite_difference' is 'fd')",
            FutureWarning,
            stacklevel=2,
        )
        return ("ghost", "jvp", "per_sample", "finite_difference", "head")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0.dev0"

__all__ = [
    "ESTIMATORS",
    "GAR",
    "KERNELS",
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
    "draw_history",
    "ghost_rules",
    "plot_history",
    "register_ghost_rule",
    "split_batch",
    "trivial_augment_wide_table",
]
