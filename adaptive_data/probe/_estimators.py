"""How a :class:`GradientProbe` computes one batch's rewards: one class per estimator, named
in one table (:data:`ESTIMATORS`). Each returns ``(r, sq)``: ``r = <g_i, D>`` for every
example, float32 ``[N]``, and the squared per-example gradient norms where it computes them
(for ``reward="cosine"``), else None. The front door has already built ``D``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._batch import per_example_losses
from . import _fd, _plan
from ._calls import per_example_dot
from ._capture import GhostRun
from ._direction import (
    Direction,
    DirectionSource,
    tied_padding,
    trainable_parameters,
    warn_if_tied_padding,
)
from ._layout import Layout, Layouts
from ._model_state import RngSnapshot, cuda_devices, forward_ad_friendly, preserved
from ._sharding import Shards

__all__: list[str] = []

Result = tuple[Tensor, "Tensor | None"]


class Job(NamedTuple):
    """One probe call, as every estimator receives it."""

    args: tuple
    kwargs: dict
    y: Any
    n: int  # batch size
    d: Direction  # the (preconditioned) direction D, keyed like the trainable parameters
    params: dict[str, nn.Parameter]  # the trainable parameters
    norms: bool  # also compute squared per-example gradient norms (reward="cosine")


@dataclasses.dataclass(frozen=True)
class Options:
    """The probe's settings that estimators read."""

    fallback: str = "jvp"  # ghost: modules without a rule
    verify: str = "first"  # ghost: the sum check
    rel_eps: float = 1e-3  # fd: the relative step
    chunk_size: int | None = None  # per_sample: examples per vmap chunk


class Estimator:
    """One way to compute ``<g_i, D>``. ``norms``: whether it can give the cosine reward."""

    norms: ClassVar[bool] = False

    def __init__(self, model: nn.Module, loss_fn: Any, options: Options) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.options = options

    def reference(
        self, source: DirectionSource, args: tuple, kwargs: dict, y: Any, n: int
    ) -> Direction:
        """The reference gradient ``d`` of a batch (the mean loss's, by default)."""
        return source.reference_gradient(args, kwargs, y, n)

    def __call__(self, job: Job) -> Result:
        raise NotImplementedError


class Jvp(Estimator):
    """All N directional derivatives ``d l_i / d eps`` in one forward-mode pass (exact, but
    for a padding row tied to another module: :func:`tied_padding`)."""

    def __init__(self, model: nn.Module, loss_fn: Any, options: Options) -> None:
        super().__init__(model, loss_fn, options)
        warn_if_tied_padding(model, "jvp")

    def __call__(self, job: Job) -> Result:
        return whole_model_jvp(self.model, self.loss_fn, job)


def whole_model_jvp(model: nn.Module, loss_fn: Any, job: Job) -> Result:
    """``d l_i / d eps`` of every example in one forward with dual numbers (cloned buffers)."""
    args, kwargs, y, n, d, params, _ = job
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.no_grad(), forward_ad_friendly(), fwad.dual_level():
        duals = {name: fwad.make_dual(p.detach(), d[name]) for name, p in params.items()}
        out = functional_call(model, {**duals, **buffers}, args, kwargs)
        losses = per_example_losses(loss_fn, out, y, n)
        tangent = fwad.unpack_dual(losses).tangent
    if tangent is None:  # the loss does not depend on any trainable parameter
        return torch.zeros(n, dtype=torch.float32, device=losses.device), None
    return tangent.float(), None


class Ghost(Estimator):
    """Exact rewards from the covered layers' inputs and output gradients, in one forward and
    one backward (the per-layer rules); the sum check on the first call (``verify``)."""

    norms = True

    def __init__(self, model: nn.Module, loss_fn: Any, options: Options) -> None:
        super().__init__(model, loss_fn, options)
        self.plan = _plan.plan(model, trainable_parameters(model), options.fallback)
        # The root holds bare parameters (a GPT's position embedding): see __call__.
        self._replays_root = any(e.root and e.params for e in self.plan)
        # A whole-model JVP is exact unless a padding row is tied to another module's use.
        self._jvp_exact = not tied_padding(model)
        self._layouts = Layouts(model, self.plan, "estimator='ghost'", options.fallback)
        self._verified = False

    def __call__(self, job: Job) -> Result:
        args, kwargs, y, n, d, params, norms = job
        whole_jvp = not norms and self._jvp_exact and not _plan.couples_examples(self.model)
        if whole_jvp and self._replays_root:
            # The root module holds bare parameters: replaying it by forward-mode AD costs a
            # whole-model JVP anyway, and with independent examples that one pass gives all of r.
            return whole_model_jvp(self.model, self.loss_fn, job)
        layout = self._layouts.get(args, kwargs, n)
        if whole_jvp and layout.root_params:
            # Modules whose output does not hold the batch are covered at the root: the same.
            return whole_model_jvp(self.model, self.loss_fn, job)
        device = next(iter(params.values())).device
        verify = self.options.verify == "always" or (
            self.options.verify == "first" and not self._verified
        )
        run = GhostRun(
            self.plan,
            layout,
            d,
            n,
            cuda_devices(self.model),
            device,
            norms,
            per_module=verify,
            params=frozenset(id(p) for p in params.values()),
        )
        try:
            with torch.enable_grad():
                losses = per_example_losses(self.loss_fn, self.model(*args, **kwargs), y, n)
                ends = list(run.anchors.values()) + run.sinks
                inputs = ends + (list(params.values()) if verify else [])
                grads = (
                    torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if inputs else ()
                )
            r, sq = run.finish()
        finally:
            run.close()
        if verify:
            param_grads = grads[len(ends) :]
            self._verify(run, layout, dict(zip(params, param_grads, strict=True)), d)
            self._verified = True
        return r, sq

    def _verify(
        self, run: GhostRun, layout: Layout, grads: Mapping[str, Tensor | None], d: Direction
    ) -> None:
        """Raise unless ``sum_i r_i = <grad sum_i l_i, D>``, naming the modules whose share
        does not match (parameters used outside their module's forward)."""

        def dot(names: Any) -> tuple[float, float]:
            total, scale = 0.0, 0.0
            for name in names:
                g = grads[name]
                if g is None:
                    continue
                prod = (g.to_dense() if g.is_sparse else g) * d[name]
                total += float(prod.sum())
                scale += float(prod.abs().sum())
            return total, scale

        expected, scale = dot(grads)
        r = run.acc.r
        got = float(r.sum())
        if abs(got - expected) <= 1e-3 * (scale + float(r.abs().sum())) + 1e-30:
            return
        suspects = []
        module_sums = run.acc.module_sums or {}  # kept whenever the check runs
        for entry in self.plan:
            covered = layout.params(entry)
            if not covered:
                continue
            want, s = dot(covered.values())
            have = float(module_sums.get(entry.name, 0.0))
            if abs(have - want) > 1e-3 * (s + abs(have)) + 1e-30:
                suspects.append(f"{entry.name} ({type(entry.module).__name__})")
        raise RuntimeError(
            f"estimator='ghost' accounted for sum_i r_i = {got:.6g}, but <grad sum_i l_i, D> = "
            f"{expected:.6g}: some parameters are used outside their module's forward "
            f"(e.g. tied weights read directly). Modules whose share does not match: {suspects}. "
            "Use estimator='jvp', or verify='never' to accept the partial reward"
        )


class FiniteDifference(Estimator):
    """``(l_i(theta + eps D) - l_i(theta - eps D)) / 2 eps``: two no-grad forwards (the one
    central difference, :func:`_fd.central_difference`), ``eps`` relative (``rel_eps``)."""

    def __init__(self, model: nn.Module, loss_fn: Any, options: Options) -> None:
        super().__init__(model, loss_fn, options)
        warn_if_tied_padding(model, "fd")
        self.shards = Shards(model, trainable_parameters(model))  # FSDP2's, if it shards

    def __call__(self, job: Job) -> Result:
        args, kwargs, y, n, d, params, _ = job
        rng = RngSnapshot(cuda_devices(self.model))  # the same dropout masks on both sides
        moved = _fd.central_difference(
            self.model, params, d, args, kwargs, rng, self.options.rel_eps, self.shards
        )
        if moved is None:  # D = 0
            device = next(iter(params.values())).device
            return torch.zeros(n, dtype=torch.float32, device=device), None
        plus, minus, eps = moved
        losses = [per_example_losses(self.loss_fn, out, y, n).double() for out in (plus, minus)]
        return ((losses[0] - losses[1]) / (2.0 * eps)).float(), None


class PerSample(Estimator):
    """``vmap(grad)`` per-example gradients dotted with ``D``: the oracle, N x params memory."""

    norms = True

    def __call__(self, job: Job) -> Result:
        args, kwargs, y, n, d, params, norms = job
        model, loss_fn = self.model, self.loss_fn
        with torch.no_grad():  # check loss_fn on the whole batch, for the same message
            per_example_losses(loss_fn, model(*args, **kwargs), y, n)
        # One copy of every buffer per example, so in-place updates (BatchNorm running stats in
        # train mode) land on batched tensors instead of failing.
        buffers = {
            name: b.detach().unsqueeze(0).expand(n, *b.shape).clone()
            for name, b in model.named_buffers()
        }
        detached = {name: p.detach() for name, p in params.items()}

        def loss_one(p: dict, b: dict, a: tuple, k: dict, t: Any) -> Tensor:
            a, k, t = tree_map(lambda v: v.unsqueeze(0) if isinstance(v, Tensor) else v, (a, k, t))
            out = functional_call(model, {**p, **b}, a, k)
            return per_example_losses(loss_fn, out, t, 1).sum()

        def reward_one(p: dict, b: dict, a: tuple, k: dict, t: Any) -> tuple[Tensor, Tensor]:
            g = grad(loss_one)(p, b, a, k, t)
            dot = torch.stack([(g[name] * d[name]).sum() for name in d]).sum()
            return dot, torch.stack([g[name].pow(2).sum() for name in d]).sum()

        batched = vmap(
            reward_one,
            in_dims=(None, 0, 0, 0, 0),
            randomness="different",
            chunk_size=self.options.chunk_size,
        )
        with forward_ad_friendly():
            dot, sq = batched(detached, buffers, args, kwargs, y)
        return dot.float(), sq.float() if norms else None


class Head(Estimator):
    """The closed form for the last Linear layer only, its reference gradient included."""

    def _forward(self, args: tuple, kwargs: dict) -> tuple[nn.Linear, Tensor, Tensor]:
        """Run the model without autograd; return its last Linear, that layer's input and
        output."""
        seen: list[tuple[nn.Linear, Tensor, Tensor]] = []

        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen.append((module, inputs[0], output))  # type: ignore[arg-type]

        handles = [
            m.register_forward_hook(keep) for m in self.model.modules() if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad():
                out = self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for module, inp, output in reversed(seen):
            if output is out:
                return module, inp, out
        raise ValueError(
            "estimator='head' needs the model's output to be the output of an nn.Linear layer "
            f"(the head), but the model returned {type(out).__name__} from another operation"
        )

    @staticmethod
    def _names(head: nn.Linear, params: Mapping[str, nn.Parameter]) -> dict[str, str]:
        by_id = {id(p): name for name, p in params.items()}
        return {local: by_id[id(p)] for local, p in head.named_parameters() if id(p) in by_id}

    def _output_grad(self, logits: Tensor, y: Any, n: int, mean: bool) -> Tensor:
        logits = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = per_example_losses(self.loss_fn, logits, y, n)
            total = losses.mean() if mean else losses.sum()
            (g,) = torch.autograd.grad(total, logits)
        return g

    def __call__(self, job: Job) -> Result:
        args, kwargs, y, n, d, params, _ = job
        head, inp, out = self._forward(args, kwargs)
        names = self._names(head, params)
        if not names:
            raise ValueError("estimator='head': the last Linear layer has no trainable parameters")
        b = self._output_grad(out, y, n, mean=False)
        local = {k: d[g] for k, g in names.items()}
        weight = local.get("weight", torch.zeros_like(head.weight))
        bias = None if head.bias is None else local.get("bias", torch.zeros_like(head.bias))
        return per_example_dot(b, F.linear(inp, weight, bias), 0), None

    def reference(
        self, source: DirectionSource, args: tuple, kwargs: dict, y: Any, n: int
    ) -> Direction:
        """The head's share of the reference gradient; zeros elsewhere."""
        params = source.params
        with preserved(self.model):
            head, inp, out = self._forward(args, kwargs)
            b = self._output_grad(out, y, n, mean=True)
        d = {name: torch.zeros_like(p) for name, p in params.items()}
        names = self._names(head, params)
        b2, a2 = b.reshape(-1, b.shape[-1]), inp.reshape(-1, inp.shape[-1])
        if "weight" in names:
            d[names["weight"]] = b2.T @ a2
        if "bias" in names:
            d[names["bias"]] = b2.sum(0)
        return source.checked(d)


# The estimators a GradientProbe takes, by name (one table: the allowed values in messages
# come from it). "fd" was spelled "finite_difference" before (a deprecated alias).
ESTIMATORS: dict[str, type[Estimator]] = {
    "ghost": Ghost,
    "jvp": Jvp,
    "per_sample": PerSample,
    "fd": FiniteDifference,
    "head": Head,
}
