"""The per-layer rules of the reward engine: one file per layer family, each rule stating in
one place its tangent (the dot), its per-example norm pieces (the cosine), whether its rows are
independent (``rows=``), whether it mixes examples, and which parameters it covers.

A new layer type is one :class:`GhostRule` subclass registered with
:func:`register_ghost_rule`; importing its file registers it.
"""

from . import attention, conv, embedding, hf_conv1d, hf_embedding, hf_rmsnorm, linear, norms
from ._base import GhostRule, Pieces, Request, Site, Sums, param_direction, square_norms
from ._registry import family_rule, ghost_rules, register_ghost_rule, registered_names, rule_for
from .generic import FALLBACK_RULE, generic_pieces, jvp_tangent

__all__ = [
    "FALLBACK_RULE",
    "GhostRule",
    "Pieces",
    "Request",
    "Site",
    "Sums",
    "attention",
    "conv",
    "embedding",
    "family_rule",
    "generic_pieces",
    "ghost_rules",
    "hf_conv1d",
    "hf_embedding",
    "hf_rmsnorm",
    "jvp_tangent",
    "linear",
    "norms",
    "param_direction",
    "register_ghost_rule",
    "registered_names",
    "rule_for",
    "square_norms",
]
