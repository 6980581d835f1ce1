"""The reference direction d: validation and optimizer preconditioning."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__: list[str] = []

Direction = dict[str, Tensor]

_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


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


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> None:
    """Raise unless ``optimizer`` is a supported type that owns some of ``params``."""
    if not isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
        names = ", ".join(cls.__name__ for cls in _SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"optimizer should be one of {names} (or None), but got {type(optimizer).__name__}"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in owned for p in params.values()):
        raise ValueError("optimizer owns none of the model's trainable parameters")


def precondition(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> Direction:
    """``D = P d``: the direction in which the optimizer's next step really moves each weight.

    * SGD (any momentum): ``P = I``; momentum adds the same term for every example.
    * Adam/AdamW: ``P = diag(1 / (sqrt(v / (1 - beta2**step)) + eps))`` from ``exp_avg_sq``
      (``max_exp_avg_sq`` with amsgrad). A parameter with no state yet (before the first step)
      uses ``P = I``.
    * A parameter the optimizer does not own does not move: its entry of ``D`` is zero.
    * ``maximize=True`` flips the sign.
    Common positive factors (the largest learning rate, Adam's ``1/(1 - beta1**step)``) are
    left out; parameter groups with a smaller learning rate are scaled by their rate over it.
    The caller has checked ``optimizer`` with :func:`check_optimizer`.
    """
    if optimizer is None:
        return dict(direction)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    # The learning rate is a common factor only within a group: groups with other rates are
    # scaled relative to the largest (one group: no scaling).
    top_lr = max(float(g["lr"]) for g in optimizer.param_groups)
    out: Direction = {}
    for name, d in direction.items():
        p = params[name]
        group = groups.get(id(p))
        if group is None:
            out[name] = torch.zeros_like(d)
            continue
        state = optimizer.state.get(p, {})
        if adam and "exp_avg_sq" in state:
            v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
            step = float(state["step"])
            beta2 = float(group["betas"][1])
            denom = (v.detach() / (1.0 - beta2**step)).sqrt_().add_(float(group["eps"]))
            d = d / denom.to(d.dtype)
        lr = float(group["lr"])
        if lr != top_lr:
            d = d * (lr / top_lr if top_lr > 0 else 0.0)
        if group.get("maximize", False):
            d = -d
        out[name] = d
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
