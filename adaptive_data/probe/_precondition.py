"""The optimizer's preconditioning: ``D = P d``, the direction in which the optimizer's next
step moves each weight, from the state its last step left (docs/concepts.md has the table).

A rule maps (param group, the parameter's state, the parameter) to ``(c, P)``: the
coefficient of the gradient in the update ``-c * P g``. ``P`` is elementwise, ``None`` for the
identity. Before a parameter's first step there is no state: ``P = I`` and ``c = lr``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []

Direction = dict[str, Tensor]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that holds the state: wrappers that expose the optimizer they wrap as
    their public ``.optimizer`` attribute (accelerate's ``AcceleratedOptimizer``, ...) are
    followed through it, as deep as they nest, to the innermost torch optimizer. Raises
    ``TypeError`` when the chain holds none."""
    chain, seen = [optimizer], {id(optimizer)}
    while (inner := getattr(chain[-1], "optimizer", None)) is not None and id(inner) not in seen:
        chain.append(inner)
        seen.add(id(inner))
    for found in reversed(chain):
        if isinstance(found, torch.optim.Optimizer):
            return found
    raise TypeError(
        "optimizer should be a torch.optim.Optimizer (or a wrapper that exposes one as its "
        f".optimizer attribute), but got {type(optimizer).__name__}"
    )


# Optimizers already warned about (one warning per optimizer object, not one per call).
_WARNED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def check_optimizer(optimizer: Any, params: Mapping[str, Tensor]) -> torch.optim.Optimizer:
    """The torch optimizer behind ``optimizer`` (see :func:`unwrap_optimizer`), checked to own
    some of ``params``. An optimizer without a preconditioner rule gets one warning (per
    optimizer object) that ``D`` is the plain gradient."""
    found = unwrap_optimizer(optimizer)
    owned = {id(p) for group in found.param_groups for p in group["params"]}
    if not any(id(p) in owned for p in params.values()):
        raise ValueError(
            "optimizer owns none of the model's trainable parameters (an optimizer over "
            "flattened or sharded copies, such as DeepSpeed ZeRO's, is not supported)"
        )
    if _rule_for(found) is None and found not in _WARNED:
        _WARNED.add(found)
        names = ", ".join(sorted({cls.__name__ for cls in _RULES}))
        warnings.warn(
            f"{type(found).__name__} has no diagonal preconditioner that adaptive_data reads: "
            "the rewards use the plain gradient (as for SGD), not the step it really takes. "
            f"Preconditioned optimizers: {names}",
            UserWarning,
            stacklevel=3,
        )
    return found


Rule = Callable[[dict, dict, Tensor], tuple[float, Tensor | None]]
_RULES: dict[type, Rule] = {}


def _rule(*classes: type) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for cls in classes:
            if cls in _RULES:
                raise RuntimeError(f"a preconditioner rule for {cls.__name__} exists already")
            _RULES[cls] = fn
        return fn

    return register


def _rule_for(optimizer: torch.optim.Optimizer) -> Rule | None:
    """The rule of the nearest class in the optimizer's MRO that has one."""
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def _step(state: dict) -> float:
    step = state.get("step")
    return 0.0 if step is None else float(step)


def _stat(state: dict, key: str) -> Tensor:
    """A state tensor as real numbers (a complex parameter's statistics are kept per part)."""
    t = state[key].detach()
    return torch.view_as_real(t) if t.is_complex() else t


@_rule(torch.optim.SGD)
def _sgd(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # The next step: d_p = g (+ wd p); with momentum buf = mu buf + (1 - dampening) d_p (the
    # first step: buf = d_p), and the update is buf, or d_p + mu buf with nesterov.
    mu, damp = float(group["momentum"]), float(group["dampening"])
    c = 1.0
    if mu != 0:
        c = 1.0 if state.get("momentum_buffer") is None else 1.0 - damp
        if group["nesterov"]:
            c = 1.0 + mu * c
    return float(group["lr"]) * c, None


@_rule(torch.optim.Adam, torch.optim.AdamW)
def _adam(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -(lr / bc1) m / (sqrt(v / bc2) + eps), m = beta1 m + (1 - beta1) g
    t = _step(state)
    if t == 0 or "exp_avg_sq" not in state:
        return float(group["lr"]), None
    beta1, beta2 = (float(b) for b in group["betas"])
    v = _stat(state, "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq")
    denom = (v / (1.0 - beta2**t)).sqrt_().add_(float(group["eps"]))
    return float(group["lr"]) * (1.0 - beta1) / (1.0 - beta1**t), denom.reciprocal_()


@_rule(torch.optim.NAdam)
def _nadam(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -lr [(1 - mu_t) / (1 - prod_t) g + mu_{t+1} / (1 - prod_t mu_{t+1}) m] / (sqrt(v/bc2)+eps)
    t = _step(state)
    if t == 0 or "exp_avg_sq" not in state:
        return float(group["lr"]), None
    beta1, beta2 = (float(b) for b in group["betas"])
    decay = float(group["momentum_decay"])
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * decay))
    prod = float(state["mu_product"])  # the product up to and including mu_t
    c = (1.0 - mu) / (1.0 - prod) + mu_next * (1.0 - beta1) / (1.0 - prod * mu_next)
    v = _stat(state, "exp_avg_sq")
    denom = (v / (1.0 - beta2**t)).sqrt_().add_(float(group["eps"]))
    return float(group["lr"]) * c, denom.reciprocal_()


@_rule(torch.optim.RAdam)
def _radam(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -lr m / bc1 * (rect * sqrt(bc2) / (sqrt(v) + eps) if rho_t > 5 else 1)
    t = _step(state)
    if t == 0 or "exp_avg_sq" not in state:
        return float(group["lr"]), None
    beta1, beta2 = (float(b) for b in group["betas"])
    c = float(group["lr"]) * (1.0 - beta1) / (1.0 - beta1**t)
    bc2 = 1.0 - beta2**t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * t * beta2**t / bc2
    if rho <= 5.0:  # the rectification is off: a momentum SGD step
        return c, None
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    denom = _stat(state, "exp_avg_sq").sqrt().add_(float(group["eps"]))
    return c * rect * math.sqrt(bc2), denom.reciprocal_()


@_rule(torch.optim.Adamax)
def _adamax(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -(lr / bc1) m / u, u = max(beta2 u, |g| + eps)
    t = _step(state)
    if t == 0 or "exp_inf" not in state:
        return float(group["lr"]), None
    beta1 = float(group["betas"][0])
    c = float(group["lr"]) * (1.0 - beta1) / (1.0 - beta1**t)
    return c, _stat(state, "exp_inf").reciprocal()


@_rule(torch.optim.RMSprop)
def _rmsprop(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -lr g / (sqrt(s - centered * a^2) + eps) (into the momentum buffer with momentum)
    if _step(state) == 0 or "square_avg" not in state:
        return float(group["lr"]), None
    s = _stat(state, "square_avg")
    if group["centered"]:
        a = _stat(state, "grad_avg")
        s = (s - a * a).clamp_(min=0)
    return float(group["lr"]), s.sqrt().add_(float(group["eps"])).reciprocal_()


@_rule(torch.optim.Adagrad)
def _adagrad(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -lr / (1 + (t - 1) lr_decay) g / (sqrt(sum) + eps)
    t = _step(state)
    if t == 0 or "sum" not in state:  # sum holds initial_accumulator_value before step 1
        return float(group["lr"]), None
    c = float(group["lr"]) / (1.0 + (t - 1.0) * float(group["lr_decay"]))
    return c, _stat(state, "sum").sqrt().add_(float(group["eps"])).reciprocal_()


@_rule(torch.optim.ASGD)
def _asgd(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
    # -eta_t g with eta_t = lr / (1 + lambd lr (t - 1))^alpha (the state holds the next eta)
    lr, t = float(group["lr"]), _step(state)
    if t == 0:
        return lr, None
    return lr / (1.0 + float(group["lambd"]) * lr * (t - 1.0)) ** float(group["alpha"]), None


if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5

    @_rule(torch.optim.Adafactor)
    def _adafactor(group: dict, state: dict, p: Tensor) -> tuple[float, Tensor | None]:
        # -alpha_t g / sqrt(V) with alpha_t = max(eps2, RMS(p)) min(lr, 1/sqrt(t)) and V the
        # factored second moment row_var col_var / mean(row_var) (a vector's own variance);
        # the update's clipping by its RMS over d is left out (it depends on the gradient).
        t = _step(state)
        lr = float(group["lr"])
        if t == 0:
            return lr, None
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else float(eps1)
        pd = p.detach()
        alpha = max(float(eps2), float(pd.norm()) / math.sqrt(pd.numel())) * min(
            lr, 1.0 / math.sqrt(t)
        )
        if state.get("row_var") is not None and state.get("col_var") is not None:
            row, col = state["row_var"].detach(), state["col_var"].detach()
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
        else:
            var = state["variance"].detach().clone()
        return alpha, var.clamp_(min=eps1 * eps1).rsqrt_()


def precondition(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    optimizer: Any,
) -> Direction:
    """``D = P d``: the direction in which the optimizer's step moves each weight.

    ``optimizer`` is a torch optimizer or a wrapper of one (:func:`unwrap_optimizer`). Each
    parameter's step is ``-c P g`` for its gradient ``g`` (+ terms the same for every example)
    with ``P`` diagonal, read from the state the optimizer's last step left (docs/concepts.md
    lists ``c`` and ``P`` per optimizer; before a parameter's first step ``P = I``).
    ``D = (c / c_max) P d``: the coefficients are relative to the largest one, so parameter
    groups with other learning rates are scaled and a common factor drops out. A parameter the
    optimizer does not own does not move (``D = 0``); ``maximize=True`` flips the sign. An
    optimizer without a rule is treated as SGD (``P = I``, ``c = lr``). Cost: one elementwise
    product per parameter (a small matrix product for Adafactor's factored form).
    """
    if optimizer is None:
        return dict(direction)
    optimizer = unwrap_optimizer(optimizer)
    rule = _rule_for(optimizer)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    found: dict[str, tuple[float, Tensor | None, bool]] = {}
    for name in direction:
        p = params[name]
        group = groups.get(id(p))
        if group is None:
            continue
        if rule is None:
            c, pre = float(group.get("lr", 1.0)), None
        else:
            c, pre = rule(group, optimizer.state.get(p, {}), p)
        found[name] = (c, pre, bool(group.get("maximize", False)))
    top = max((c for c, _, _ in found.values()), default=0.0)
    out: Direction = {}
    for name, d in direction.items():
        if name not in found or top <= 0:
            out[name] = torch.zeros_like(d)
            continue
        c, pre, maximize = found[name]
        if pre is not None:
            if d.is_complex():
                d = torch.view_as_complex(torch.view_as_real(d) * pre.to(d.real.dtype))
            else:
                d = d * pre.to(d.dtype)
        if c != top:
            d = d * (c / top)
        out[name] = -d if maximize else d
    return out
