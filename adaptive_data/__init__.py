"""adaptive_data: learn, while a model trains, which data to draw and how to augment it.

The public surface is re-exported here; the modules behind it are private.
"""

from ._augment import KERNELS, AugmentPolicy, GARTransform, apply_op, trivial_augment_wide_table
from ._batch import split_batch
from ._gar import GAR
from ._ghost import GhostRule, ghost_rules, register_ghost_rule
from ._policy import CategoricalPolicy
from ._probe import METHODS, REWARDS, GradientProbe
from ._reference import ReferenceBatches
from ._sampler import GARSampler, MixtureDataset

__version__ = "0.1.0.dev0"

__all__ = [
    "GAR",
    "KERNELS",
    "METHODS",
    "REWARDS",
    "AugmentPolicy",
    "CategoricalPolicy",
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
