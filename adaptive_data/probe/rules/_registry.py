"""The registry: module type -> the :class:`GhostRule` that covers it.

Types match exactly: a subclass may override ``forward``, so it falls back to the generic
rule unless it registers its own. A type from a package the core does not import (Hugging
Face's ``Conv1D``) is registered by its qualified name and matched when such a module is met.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ._base import GhostRule

__all__ = ["ghost_rules", "register_ghost_rule", "registered_names", "rule_for"]

_RULES: dict[type[nn.Module], GhostRule] = {}
_BY_NAME: dict[str, GhostRule] = {}  # "package.module.QualName" -> rule

TangentFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Mapping[str, Tensor]], Any]


class _TangentRule(GhostRule):
    """A rule given as its tangent function alone (``@register_ghost_rule(T)`` on a function)."""

    def __init__(self, fn: TangentFn, recursive: bool, replays_forward: bool) -> None:
        self.fn = fn
        self.recursive = recursive  # type: ignore[misc]
        self.replays_forward = replays_forward  # type: ignore[misc]

    def tangent(
        self, module: nn.Module, args: tuple, kwargs: dict, direction: Mapping[str, Tensor]
    ) -> Any:
        return self.fn(module, args, kwargs, direction)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(module: nn.Module) -> GhostRule | None:
    """The rule registered for exactly ``type(module)``, or None."""
    cls = type(module)
    rule = _RULES.get(cls)
    if rule is None and _BY_NAME:
        rule = _BY_NAME.get(_qualified(cls))
    return rule


def family_rule(module: nn.Module) -> GhostRule | None:
    """The rule that speaks for ``module``'s refusals and example mixing: its own, else the
    first registered whose ``family`` holds it."""
    rule = rule_for(module)
    if rule is not None:
        return rule
    for candidate in (*_RULES.values(), *_BY_NAME.values()):
        if candidate.family and isinstance(module, candidate.family):
            return candidate
    return None


def registered_names(most: int = 3) -> str:
    """The registered types, for error messages: ``"BatchNorm1d, ..., Conv1D (transformers)"``.
    A rule registered by name for more than ``most`` classes of a package is counted, not
    listed (``"HFRMSNormRule's 145 classes (transformers)"``): ``ghost_rules()`` lists them."""
    names = {cls.__name__ for cls in _RULES}
    by_rule: dict[tuple[str, type], list[str]] = {}
    for q in _BY_NAME:
        by_rule.setdefault((q.split(".", 1)[0], type(_BY_NAME[q])), []).append(q)
    for (package, rule), group in by_rule.items():
        if len(group) > most:
            names.add(f"{rule.__name__}'s {len(group)} classes ({package})")
        else:
            names |= {f"{q.rsplit('.', 1)[1]} ({package})" for q in group}
    return ", ".join(sorted(names))


def ghost_rules() -> dict[type[nn.Module] | str, GhostRule]:
    """A copy of the registry: module type -> the rule ``estimator='ghost'`` uses for it. A
    type registered by name whose package is not imported is keyed by that name."""
    out: dict[type[nn.Module] | str, GhostRule] = {cls: rule for cls, rule in _RULES.items()}
    for name, rule in _BY_NAME.items():
        module, _, qualname = name.rpartition(".")
        cls = getattr(sys.modules.get(module), qualname, None)
        out[cls if isinstance(cls, type) else name] = rule
    return out


def register_ghost_rule(
    *module_types: type[nn.Module] | str,
    recursive: bool = False,
    replays_forward: bool = False,
) -> Callable[[Any], Any]:
    """Decorator: the rule for modules of exactly these types (classes, or qualified names
    such as ``"transformers.pytorch_utils.Conv1D"`` for a package the program may not import).

    On a :class:`GhostRule` subclass it registers one instance (the class's own ``recursive``
    and ``replays_forward`` hold). On a function ``(module, args, kwargs, direction) ->
    tangent`` it registers that tangent alone, with ``recursive`` and ``replays_forward`` as
    given: the dot reward then comes from it, the cosine from the generic path. Registering a
    type twice raises instead of silently replacing the first rule.
    """
    if not module_types:
        raise TypeError("register_ghost_rule needs at least one module type")
    for cls in module_types:
        if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, nn.Module))):
            raise TypeError(
                "register_ghost_rule takes nn.Module subclasses or qualified names such as "
                f"'transformers.pytorch_utils.Conv1D', but got {cls!r}"
            )

    def decorate(target: Any) -> Any:
        for cls in module_types:
            name = cls if isinstance(cls, str) else cls.__name__
            if cls in _RULES or cls in _BY_NAME:
                raise ValueError(f"a ghost rule for {name} is already registered")
        if isinstance(target, type) and issubclass(target, GhostRule):
            rule: GhostRule = target()
        elif callable(target):
            rule = _TangentRule(target, recursive, replays_forward)
        else:
            raise TypeError(
                "register_ghost_rule decorates a GhostRule subclass or a tangent function, "
                f"but got {type(target).__name__}"
            )
        for cls in module_types:
            if isinstance(cls, str):
                _BY_NAME[cls] = rule
            else:
                _RULES[cls] = rule
        return target

    return decorate
