"""The reference direction d and what turns it into rewards, below both GradientProbe and GAR:
the gradient of a batch's mean loss, validation, optimizer preconditioning, and the cosine of
each example's gradient with d from the dot products and squared norms the rules compute."""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import per_example_losses
from ._model_state import preserved

__all__: list[str] = []

Direction = dict[str, Tensor]


def first_nonfinite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf, or None.

    One reduction per tensor and a single host sync: a NaN or inf anywhere makes a sum
    non-finite. Only then (or on a float overflow of the sum) is each tensor checked elementwise.
    """
    if not tensors:
        return None
    sums = torch.stack([t.sum().to(torch.float64) for t in tensors.values()])
    if bool(torch.isfinite(sums).all()):
        return None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` with ``requires_grad``; a tied parameter appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_unsharded(model: nn.Module) -> None:
    """Raise for a model whose parameters are flattened or sharded across ranks: FSDP (its
    ``FullyShardedDataParallel`` wrapper, ``fully_shard``'s ``FSDPModule``, ``DTensor``
    parameters) and DeepSpeed (its engine, ZeRO-3 partitioned parameters). Their ``.grad`` and
    optimizer state do not hold each parameter whole on a rank, which the rewards need."""
    # A model can only be sharded by a package already imported: looking the types up in
    # sys.modules costs nothing and imports nothing (torch.distributed.fsdp takes seconds).
    found = None
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kinds = tuple(
        kind
        for kind in (
            getattr(fsdp, name, None) for name in ("FullyShardedDataParallel", "FSDPModule")
        )
        if isinstance(kind, type)
    )
    if kinds:
        for module in model.modules():
            if isinstance(module, kinds):
                found = f"FSDP ({type(module).__name__})"
                break
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if (
        found is None
        and isinstance(dtensor, type)
        and any(isinstance(p, dtensor) for p in model.parameters())
    ):
        found = "DTensor parameters (FSDP's fully_shard or tensor parallelism)"
    deepspeed = sys.modules.get("deepspeed")  # only a program that uses DeepSpeed imports it
    if found is None and deepspeed is not None:
        engine = getattr(deepspeed, "DeepSpeedEngine", None)
        if isinstance(engine, type) and isinstance(model, engine):
            found = f"DeepSpeed ({type(model).__name__})"
        elif any(hasattr(p, "ds_id") for p in model.parameters()):
            found = "DeepSpeed ZeRO-3 partitioned parameters"
    if found is not None:
        raise TypeError(
            f"model is sharded by {found}: adaptive_data needs every parameter and its .grad "
            "whole on each rank; flattened or sharded parameters are not supported (use "
            "DistributedDataParallel)"
        )


def check_direction(direction: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Direction:
    """Validate ``direction`` against the trainable parameters; return it on their device/dtype."""
    if not isinstance(direction, Mapping):
        raise TypeError(
            "direction should be a dict {parameter name: tensor}, "
            f"but got {type(direction).__name__}"
        )
    missing = [n for n in params if n not in direction]
    extra = [n for n in direction if n not in params]
    if missing:
        raise ValueError(f"direction is missing trainable parameters: {missing}")
    if extra:
        raise ValueError(
            f"direction has entries that are not trainable parameters of the model: {extra} "
            "(frozen parameters, requires_grad=False, are not part of d)"
        )
    checked: Direction = {}
    for name, p in params.items():
        d = direction[name]
        if not isinstance(d, Tensor):
            raise TypeError(f"direction[{name!r}] should be a Tensor, but got {type(d).__name__}")
        if tuple(d.shape) != tuple(p.shape):
            raise ValueError(
                f"direction[{name!r}] has shape {list(d.shape)}, "
                f"but the parameter has shape {list(p.shape)}"
            )
        if not (d.is_floating_point() or d.is_complex()):
            raise TypeError(
                f"direction[{name!r}] should be floating point, but got dtype {d.dtype}"
            )
        checked[name] = d.detach().to(device=p.device, dtype=p.dtype)
    bad = first_nonfinite(checked)
    if bad is not None:
        raise ValueError(f"direction[{bad!r}] contains NaN or inf")
    return checked


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


# ---------------------------------------------------------------------------- preconditioners
#
# A rule maps (param group, the parameter's state, the parameter) to (c, P): the coefficient
# of the gradient in the update ``-c * P g`` of the step the optimizer took last, read from the
# state that step left (docs/concepts.md has the table). ``P`` is elementwise, ``None`` for the
# identity. Before a parameter's first step there is no state: ``P = I`` and ``c = lr``.

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


def gradient_free_rows(model: nn.Module, params: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """``(parameter name, row)`` of weights that backward never updates.

    An Embedding's ``padding_idx`` row gets no gradient, so no step moves it; forward-mode and
    finite-difference methods would otherwise see it move along ``d``.
    """
    by_id = {id(p): name for name, p in params.items()}
    rows = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            name = by_id.get(id(module.weight))
            if name is not None:
                rows.append((name, module.padding_idx))
    return rows


def zero_rows(direction: Direction, rows: list[tuple[str, int]]) -> Direction:
    """A copy of ``direction`` with the given rows set to 0."""
    out = dict(direction)
    for name, row in rows:
        out[name] = out[name].clone()
        out[name][row] = 0
    return out


def mean_loss_gradient(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    args: tuple,
    kwargs: dict,
    y: Any,
    n: int,
    params: dict[str, nn.Parameter],
) -> Direction:
    """``grad_theta loss_fn(model(*args, **kwargs), y).mean()`` as ``{name: tensor}`` (zeros
    for parameters the loss does not reach), with the model's state, ``.grad`` included, left
    as it was."""
    with preserved(model), torch.enable_grad():
        losses = per_example_losses(loss_fn, model(*args, **kwargs), y, n)
        grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def cosine_rewards(dot: Tensor, sq_norms: Tensor, d: Direction) -> Tensor:
    """``<g_i, D> / (||g_i|| ||D||)``; 0 where either norm is 0, NaN where either is not
    finite."""
    d_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in d.values()])
    )
    denom = sq_norms.clamp_min(0).sqrt() * d_norm.to(sq_norms.device)
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(dot.dtype).tiny), 0.0)
    # A non-finite gradient gives a NaN reward (dropped and counted downstream), never a 0.
    finite = torch.isfinite(dot) & torch.isfinite(sq_norms) & torch.isfinite(d_norm)
    return torch.where(finite, cos, torch.nan)
