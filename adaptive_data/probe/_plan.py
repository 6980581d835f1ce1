"""Which module covers which trainable parameter: the plan of a model, made once.

Every module whose type has a rule covers its own parameters (a recursive rule, its
children's too); a module no rule covers gets the generic rule (or is refused with
``fallback="raise"``); the model's root has an entry whenever it has no rule of its own,
for the parameters of modules whose output does not hold the batch (see :class:`Layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor, nn

from .rules import FALLBACK_RULE, GhostRule, family_rule, registered_names, rule_for

__all__: list[str] = []


@dataclasses.dataclass
class Entry:
    """One covered module: its rule and ``{local parameter name: global name}``.

    The model's root has an entry whenever it has no rule of its own, even without bare
    parameters: parameters of modules whose output does not hold the batch are covered there
    (see :class:`Layout`)."""

    name: str
    module: nn.Module
    rule: GhostRule
    params: dict[str, str]
    root: bool = False


def plan(model: nn.Module, trainable: Mapping[str, Tensor], fallback: str) -> list[Entry]:
    """Assign every trainable parameter to the modules whose rule covers it.

    Raises (naming the modules) if a parameter would be left uncovered with
    ``fallback='raise'``, or if a module cannot be probed without editing the model.
    """
    global_name = {id(p): n for n, p in trainable.items()}
    entries: list[Entry] = []
    covered_by_parent: set[str] = set()
    uncovered: list[str] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:  # one module under two names: its calls are hooked once
            continue
        seen.add(id(module))
        kin = family_rule(module)
        if kin is not None:
            kin.check(mod_name, module)
        if mod_name in covered_by_parent:
            continue
        rule = rule_for(module)
        if rule is not None and rule.recursive:
            named = module.named_parameters()
            covered_by_parent.update(
                f"{mod_name}.{c}" if mod_name else c for c, _ in module.named_modules()
            )
        else:
            named = module.named_parameters(recurse=False)
        local = {n: global_name[id(p)] for n, p in named if id(p) in global_name}
        is_root = module is model
        if not local and not (is_root and rule is None):
            continue
        entries.append(
            Entry(mod_name or "<root>", module, rule or FALLBACK_RULE, local, root=is_root)
        )
    entries = _to_the_rule(entries)
    if fallback == "raise":
        uncovered = [
            f"{e.name} ({type(e.module).__name__})"
            for e in entries
            if e.rule is FALLBACK_RULE and e.params
        ]
    if uncovered:
        raise ValueError(
            f"estimator='ghost' has no rule for the trainable parameters of {uncovered}; "
            f"rules exist for {registered_names()}. Use fallback='jvp', estimator='jvp', "
            "freeze them, or register a rule with adaptive_data.register_ghost_rule"
        )
    return entries


def _to_the_rule(entries: list[Entry]) -> list[Entry]:
    """A parameter registered on a module no rule covers and also on one of its descendants
    that a rule covers is the descendant's: its forward is where the parameter is used
    (Hugging Face's ``BertLMPredictionHead`` registers the bias its ``decoder`` Linear adds);
    covering it at the ancestor too would count its share twice."""
    ruled = [e for e in entries if e.rule is not FALLBACK_RULE]
    out = []
    for entry in entries:
        if entry.rule is FALLBACK_RULE:
            prefix = "" if entry.root else entry.name + "."
            below = {g for e in ruled if e.name.startswith(prefix) for g in e.params.values()}
            entry.params = {k: g for k, g in entry.params.items() if g not in below}
            if not entry.params and not entry.root:
                continue
        out.append(entry)
    return out


def couples_examples(model: nn.Module) -> bool:
    """Whether a known module makes one example's loss depend on another's in this mode."""
    for module in model.modules():
        rule = family_rule(module)
        if rule is not None and rule.mixes_examples(module):
            return True
    return False
