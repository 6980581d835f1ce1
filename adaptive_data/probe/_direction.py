"""The reference direction d and what turns it into rewards, below both GradientProbe and GAR:
the gradient of a batch's mean loss, validation, optimizer preconditioning, and the cosine of
each example's gradient with d from the dot products and squared norms the rules compute."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import per_example_losses
from .._distributed import Group
from ._model_state import preserved
from ._precondition import check_optimizer, precondition
from ._sharding import Shards, is_shard, local, row_offset

__all__: list[str] = []

Direction = dict[str, Tensor]


def first_nonfinite(tensors: Mapping[str, Tensor], shards: Shards | None = None) -> str | None:
    """The name of the first tensor holding NaN or inf, or None.

    One reduction per tensor and a single host sync: a NaN or inf anywhere makes a sum
    non-finite. Only then (or on a float overflow of the sum) is each tensor checked elementwise.
    With the ``shards`` of an FSDP2 model: over every rank's shards, the same name on every rank.
    """
    if shards is not None and shards.active:
        return shards.first_nonfinite(tensors)
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


def _like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (a parameter's local part) as ``p`` is: a DTensor sharded as ``p`` when it is
    one, else ``t``."""
    if not is_shard(p):
        return t
    shard: Any = p
    return shard.from_local(
        t, shard.device_mesh, shard.placements, run_check=False, shape=p.shape, stride=p.stride()
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
        if is_shard(p) and not is_shard(d):
            raise TypeError(
                f"direction[{name!r}] should be a DTensor sharded as the parameter is (the "
                "model is sharded by FSDP2), but got a plain Tensor"
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


def _holders(model: nn.Module) -> dict[int, int]:
    """Parameter id -> how many modules register it (2 or more: tied, as an output layer
    sharing the embedding's weight)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return holders


def gradient_free_rows(model: nn.Module, params: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """``(parameter name, row)`` of weights that backward never updates.

    An Embedding's ``padding_idx`` row gets no gradient, so no step moves it; forward-mode and
    finite-difference methods would otherwise see it move along ``d``. Not where the weight is
    another module's too (an output layer tied to the embedding, as BERT's and GPT-2's are):
    that module's gradient moves the row.
    """
    by_id = {id(p): name for name, p in params.items()}
    owners = _holders(model)
    rows = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            name = by_id.get(id(module.weight))
            if name is not None and owners[id(module.weight)] == 1:
                rows.append((name, module.padding_idx))
    return rows


def tied_padding(model: nn.Module) -> list[str]:
    """Names of the Embeddings with a ``padding_idx`` whose weight another module holds too
    (a tied output layer): backward gives the padding row the other module's gradient only,
    while a forward-mode derivative (``jvp``, ``fd``) moves it in the lookup too, so those
    estimators are not exact for such a model."""
    owners = _holders(model)
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        and m.padding_idx is not None
        and m.weight.requires_grad
        and owners[id(m.weight)] > 1
    ]


def warn_if_tied_padding(model: nn.Module, estimator: str) -> None:
    """One warning where ``estimator`` (forward-mode) is not exact for ``model``."""
    tied = tied_padding(model)
    if tied:
        warnings.warn(
            f"estimator={estimator!r} differentiates the forward, and the padding row of "
            f"Embedding(s) {tied}, whose weight another module holds too, moves in the lookup "
            "although backward gives it no gradient there: the rewards are approximate. "
            "estimator='ghost' is exact for this model",
            UserWarning,
            stacklevel=4,
        )


def zero_rows(direction: Direction, rows: list[tuple[str, int]]) -> Direction:
    """A copy of ``direction`` with the given rows set to 0."""
    out = dict(direction)
    for name, row in rows:
        t = out[name] = out[name].clone()
        if is_shard(t):  # an FSDP2 shard: the row, where this rank holds it
            start, part = row_offset(t), local(t)
            if start <= row < start + part.shape[0]:
                part[row - start] = 0
        else:
            t[row] = 0
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


class DirectionSource:
    """Where ``D`` comes from, for both front doors: the model's trainable parameters (which
    must not change under it), the rows that no step moves, the reference gradient (averaged
    over the ranks by ``sync``, checked finite, reused for ``refresh`` steps) and the
    optimizer's preconditioning (``D = P d``, docs/concepts.md).

    Args:
        model: the module whose parameters ``D`` moves (DDP already unwrapped).
        optimizer: the optimizer whose state preconditions ``D`` (or a wrapper of one);
            ``None``: plain gradients (the probe passes one per call instead).
        loss_fn: ``loss_fn(output, target) -> [N]``, for the reference gradient.
        refresh: reuse a reference gradient until it is ``refresh`` steps old (>= 1).
        sync: averages a list of tensors over the ranks (``None``: one process).
        group: the ranks' collectives for an FSDP2 model's sums (default: the process
            group's).
        who: the front door's name, for errors.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        refresh: int = 1,
        sync: Callable[[list[Tensor]], list[Tensor]] | None = None,
        group: Group | None = None,
        who: str = "GradientProbe",
    ) -> None:
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters (every requires_grad is False)")
        self.model = model
        self.params = params
        # The optimizer that holds the state, behind wrappers such as accelerate's.
        self.optimizer = None if optimizer is None else check_optimizer(optimizer, params)
        self.loss_fn = loss_fn
        self.refresh = refresh
        self.sync = sync
        self.who = who
        self.frozen_rows = gradient_free_rows(model, params)
        # FSDP2: which parameters are shards, and the collectives over them.
        self.shards = Shards(model, params, group)
        self._ids = tuple(id(p) for p in params.values())
        # The last reference gradient (all-reduced, not preconditioned) and the step it was
        # computed at: reused while fewer than ``refresh`` steps have passed.
        self.gradient: Direction | None = None
        self.computed_at = 0

    def check_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, refused if they changed since this source was made."""
        params = trainable_parameters(self.model)
        if tuple(id(p) for p in params.values()) != self._ids:
            raise RuntimeError(
                f"the model's trainable parameters changed since this {self.who} was built "
                f"(requires_grad toggled or parameters replaced); build a new {self.who}"
            )
        return params

    def direction(self, grads: Mapping[str, Tensor], optimizer: Any = None) -> Direction:
        """``D``: ``grads`` preconditioned by ``optimizer`` (default: this source's), the rows
        no step moves set to 0."""
        d = precondition(
            dict(grads), self.params, self.optimizer if optimizer is None else optimizer
        )
        if self.frozen_rows:
            d = zero_rows(d, self.frozen_rows)
        return d

    def reference_gradient(
        self,
        args: tuple,
        kwargs: dict,
        y: Any,
        n: int,
        explain: Callable[[Exception], Exception] | None = None,
    ) -> Direction:
        """The gradient of the reference batch's mean loss (the model left as it was),
        averaged over the ranks; raises if it holds NaN or inf. ``explain`` turns an error
        of the model's forward or the loss into the one raised (its cause)."""
        if self.loss_fn is None:
            raise RuntimeError(f"{self.who} has no loss_fn to compute a reference gradient")
        try:
            if self.shards.active:
                d = self._sharded_gradient(args, kwargs, y, n)
            else:
                d = mean_loss_gradient(self.model, self.loss_fn, args, kwargs, y, n, self.params)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            if explain is None:
                raise
            raise explain(error) from error
        return self.checked(d)

    def _sharded_gradient(self, args: tuple, kwargs: dict, y: Any, n: int) -> Direction:
        """The reference gradient of an FSDP2 model: its shards as FSDP's backward leaves them
        in ``.grad`` (averaged over the ranks; replicated parameters still need ``sync``)."""
        loss_fn = self.loss_fn
        assert loss_fn is not None  # checked by reference_gradient

        def forward() -> Tensor:
            return per_example_losses(loss_fn, self.model(*args, **kwargs), y, n).mean()

        with preserved(self.model):
            return self.shards.mean_loss_gradient(forward, self.params)

    def checked(self, d: Direction) -> Direction:
        """A reference gradient averaged over the ranks (with ``sync``; FSDP's backward has
        averaged the shards already) and checked finite."""
        if self.sync is not None:
            names = [name for name in d if name not in self.shards.sharded]
            if names:
                synced = self.sync([d[name] for name in names])
                d = {**d, **dict(zip(names, synced, strict=True))}
        bad = first_nonfinite(d, self.shards)
        if bad is not None:
            raise ValueError(f"the reference gradient of {bad!r} contains NaN or inf")
        return d

    def reused_gradient(
        self, step: int, compute: Callable[[], Direction], keep: bool = False
    ) -> Direction:
        """The reference gradient at ``step``: ``compute()`` when none is held or it is
        ``refresh`` steps old (always, with ``refresh=1``), else the one held. With
        ``refresh=1`` the gradient is held only with ``keep`` (its last value is wanted)."""
        if self.refresh == 1 and not keep:
            return compute()
        if self.gradient is None or step - self.computed_at >= self.refresh:
            self.gradient = compute()
            self.computed_at = step
        return self.gradient

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The reference gradient held (a copy, or None) and the step it was computed at. An
        FSDP2 model's is this rank's shards (plain tensors, in a per-rank state as the
        sampler's is)."""
        held = self.gradient
        return {
            "reference_gradient": (
                None
                if held is None
                else {name: local(t).detach().clone() for name, t in held.items()}
            ),
            "reference_step": self.computed_at,
        }

    def check_state(self, saved: Any) -> Direction | None:
        """A saved reference gradient, checked against the model's parameters (raises, naming
        the key); returned on the parameters' devices and dtypes."""
        if saved is None:
            return None
        if not isinstance(saved, Mapping) or set(saved) != set(self.params):
            raise ValueError(
                "state's reference_gradient should name exactly this model's trainable "
                f"parameters {sorted(self.params)}, but got "
                + (str(sorted(saved)) if isinstance(saved, Mapping) else type(saved).__name__)
            )
        out = {}
        for name, p in self.params.items():
            t = saved[name]
            want = local(p).shape  # an FSDP2 model's state holds this rank's shards
            if not isinstance(t, Tensor) or is_shard(t) or t.shape != want:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"state's reference_gradient[{name!r}] should have the parameter's "
                    + ("local shard's " if is_shard(p) else "")
                    + f"shape {tuple(want)}, but got {shape}"
                    + (" (a DTensor)" if is_shard(t) else "")
                )
            if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"state's reference_gradient[{name!r}] should be a finite floating-point "
                    f"tensor, but got "
                    + (f"dtype={t.dtype}" if not t.dtype.is_floating_point else "NaN or inf")
                )
            out[name] = _like(t.to(device=p.device, dtype=p.dtype), p)
        return out

    def load(self, gradient: Direction | None, step: int) -> None:
        """Hold ``gradient`` (checked by :meth:`check_state`) as computed at ``step``."""
        self.gradient = gradient
        self.computed_at = step
