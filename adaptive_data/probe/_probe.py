"""GradientProbe: r_i = <grad_theta l_i(theta), D> for every example of a batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._batch import (
    Inputs,
    batch_size,
    call_args,
    check_same_batch,
    per_example_losses,
    split_batch,
)
from .._check import check_int, check_number
from . import _plan
from ._calls import per_example_dot
from ._capture import GhostRun
from ._direction import (
    Direction,
    check_direction,
    check_optimizer,
    check_unsharded,
    cosine_rewards,
    first_nonfinite,
    gradient_free_rows,
    mean_loss_gradient,
    precondition,
    trainable_parameters,
    zero_rows,
)
from ._layout import Layout, Layouts
from ._model_state import cuda_devices, forward_ad_friendly, preserved
from ._plan import plan

__all__ = ["METHODS", "REWARDS", "GradientProbe"]

LossFn = Callable[[Any, Any], Tensor]

METHODS = ("ghost", "jvp", "per_sample", "finite_difference", "head")
REWARDS = ("dot", "cosine")


# What a method returns: r [N], and the squared per-example gradient norms [N] where the method
# computes them (ghost and per_sample with reward="cosine"), else None.
_Result = tuple[Tensor, "Tensor | None"]


class _Job(NamedTuple):
    """One probe call, as every method receives it."""

    args: tuple
    kwargs: dict
    y: Any
    n: int  # batch size
    d: Direction  # the (preconditioned) direction D, keyed like the trainable parameters
    params: dict[str, nn.Parameter]  # the trainable parameters
    norms: bool  # also compute squared per-example gradient norms (reward="cosine")


class GradientProbe:
    """Per-example gradient-alignment rewards ``r_i = <grad_theta l_i(theta), D>``.

    ``probe(x, y, reference=(x_ref, y_ref))`` (or ``direction={name: tensor}``) returns a float32
    Tensor ``[N]``: example i's own loss gradient dotted with the reference direction ``D``,
    preconditioned by ``optimizer=`` if given (docs/concepts.md lists the optimizers). Dict
    batches: ``probe(batch, reference=ref_batch)`` (:func:`split_batch`). The probe never edits the
    model (parameters, buffers, ``.grad``, hooks, mode, RNG). Cost with the default
    ``method="ghost"``: about one training step. The methods, their exactness, BatchNorm
    semantics, guarantees and measured costs: [docs/probe.md](probe.md); the maths:
    [docs/concepts.md](concepts.md).

    Args:
        model: the ``nn.Module`` (``DistributedDataParallel`` is unwrapped).
        loss_fn: ``loss_fn(output, target) -> Tensor [N]`` of per-example losses.
        method: ``"ghost"``, ``"jvp"``, ``"per_sample"``, ``"finite_difference"`` or ``"head"``.
        fallback: ``"jvp"`` or ``"raise"`` for modules ``ghost`` has no rule for.
        verify: ``ghost``'s sum check: ``"first"``, ``"always"`` or ``"never"``.
        rel_eps: ``finite_difference``'s relative step.
        chunk_size: examples per ``vmap`` chunk for ``per_sample`` (None: all at once).
        reward: ``"dot"`` or ``"cosine"``.

    Example:
        >>> probe = GradientProbe(model, nn.CrossEntropyLoss(reduction="none"))
        >>> r = probe(x, y, reference=(x_ref, y_ref))  # Tensor [N]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        method: str = "ghost",
        *,
        fallback: str = "jvp",
        verify: str = "first",
        rel_eps: float = 1e-3,
        chunk_size: int | None = None,
        reward: str = "dot",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model should be an nn.Module, but got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn should be callable, but got {type(loss_fn).__name__}")
        if method not in METHODS:
            raise ValueError(
                f"method should be one of {', '.join(METHODS)}, but got method={method!r}"
            )
        if fallback not in ("jvp", "raise"):
            raise ValueError(f"fallback should be 'jvp' or 'raise', but got fallback={fallback!r}")
        check_number("rel_eps", rel_eps, positive=True)
        if reward not in REWARDS:
            raise ValueError(
                f"reward should be one of {', '.join(REWARDS)}, but got reward={reward!r}"
            )
        if reward == "cosine" and method not in ("ghost", "per_sample"):
            raise ValueError(
                "reward='cosine' needs per-example gradient norms, which method='ghost' and "
                f"method='per_sample' compute, but got method={method!r}"
            )
        if verify not in ("first", "always", "never"):
            raise ValueError(
                f"verify should be 'first', 'always' or 'never', but got verify={verify!r}"
            )
        check_int("chunk_size", chunk_size, minimum=1, none_ok=True)
        check_unsharded(model)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Probe the wrapped module: its forward and backward then never enter DDP's
            # gradient synchronisation, and .grad stays as the training step left it.
            model = model.module
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.fallback = fallback
        self.verify = verify
        self._verified = False
        self.rel_eps = float(rel_eps)
        self.chunk_size = chunk_size
        self.reward = reward
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters (every requires_grad is False)")
        self._plan = plan(model, params, fallback) if method == "ghost" else []
        # The root holds bare parameters (a GPT's position embedding): see _run_ghost.
        self._replays_root = any(e.root and e.params for e in self._plan)
        self._layouts = Layouts(model, self._plan, "method='ghost'", fallback)
        self._frozen_rows = gradient_free_rows(model, params)
        self._param_ids = tuple(id(p) for p in params.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, method={self.method!r})"

    # ------------------------------------------------------------------ public API

    def __call__(
        self,
        x: Inputs,
        y: Any = None,
        *,
        reference: Any = None,
        direction: Mapping[str, Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Tensor:
        """Rewards of the batch ``(x, y)``: a float32 Tensor ``[N]``.

        Exactly one of ``reference`` (a batch ``(x_ref, y_ref)``; ``d`` is the gradient of
        ``loss_fn(model(x_ref), y_ref).mean()``) or ``direction`` (``{parameter name: tensor}``
        keyed like ``model.named_parameters()``, trainable ones only) must be given. With
        ``optimizer`` (a torch optimizer, or a wrapper exposing one as ``.optimizer`` such as
        accelerate's) ``d`` is preconditioned to the step it really takes (docs/concepts.md
        lists the optimizers; others get one warning and the plain gradient).

        Dict batches: ``probe(batch, reference=ref_batch)``, with ``y`` left out, splits a
        dict batch the Hugging Face way (:func:`split_batch`: the target under ``"labels"``,
        the other keys passed as ``model(**inputs)``); ``reference`` may be such a dict too.
        For other key names, split with ``split_batch(batch, target_key=..., input_key=...)``.
        """
        if (reference is None) == (direction is None):
            raise ValueError(
                "pass exactly one of reference=(x_ref, y_ref) or direction={name: tensor}"
            )
        if y is None:
            if not isinstance(x, Mapping):
                raise TypeError(
                    "y should be the targets of the batch, but got y=None with x of type "
                    f"{type(x).__name__} (only a dict batch holds its own targets)"
                )
            x, y = split_batch(x)
        if isinstance(reference, Mapping):
            reference = split_batch(reference)
        args, kwargs = call_args(x)
        n = batch_size(x)
        check_same_batch(y, n)
        params = trainable_parameters(self.model)
        if tuple(id(p) for p in params.values()) != self._param_ids:
            raise RuntimeError(
                "the model's trainable parameters changed since this GradientProbe was built "
                "(requires_grad toggled or parameters replaced); build a new GradientProbe"
            )
        if optimizer is not None:  # before the reference pass, so a bad optimizer fails fast
            optimizer = check_optimizer(optimizer, params)
        if direction is not None:
            d = check_direction(direction, params)
        else:
            if not (isinstance(reference, tuple | list) and len(reference) == 2):
                raise TypeError(
                    "reference should be a pair (x_ref, y_ref) or a dict batch, but got "
                    f"{type(reference).__name__}"
                    + (
                        f" of length {len(reference)}"
                        if isinstance(reference, tuple | list)
                        else ""
                    )
                )
            d = self._reference_direction(*reference, params)
        d = precondition(d, params, optimizer)
        if self._frozen_rows:
            d = zero_rows(d, self._frozen_rows)
        with preserved(self.model):
            job = _Job(args, kwargs, y, n, d, params, norms=self.reward == "cosine")
            r, sq_norms = getattr(self, f"_run_{self.method}")(job)
        if sq_norms is not None:
            r = cosine_rewards(r, sq_norms, d)
        return r

    def reference_direction(self, x_ref: Inputs, y_ref: Any) -> Direction:
        """``d = grad_theta loss_fn(model(x_ref), y_ref).mean()`` as ``{name: tensor}``.

        Raises if it holds NaN or inf. Leaves the model untouched (``.grad`` included).
        """
        return self._reference_direction(x_ref, y_ref, trainable_parameters(self.model))

    def _reference_direction(
        self, x_ref: Inputs, y_ref: Any, params: dict[str, nn.Parameter]
    ) -> Direction:
        args, kwargs = call_args(x_ref)
        n = batch_size(x_ref, "x_ref")
        check_same_batch(y_ref, n)
        if self.method == "head":
            with preserved(self.model):
                d = self._head_reference(args, kwargs, y_ref, n, params)
        else:
            d = mean_loss_gradient(self.model, self.loss_fn, args, kwargs, y_ref, n, params)
        bad = first_nonfinite(d)
        if bad is not None:
            raise ValueError(f"the reference gradient of {bad!r} contains NaN or inf")
        return d

    # ------------------------------------------------------------------ methods

    def _run_ghost(self, job: _Job) -> _Result:
        args, kwargs, y, n, d, params, norms = job
        whole_jvp = not norms and not _plan.couples_examples(self.model)
        if whole_jvp and self._replays_root:
            # The root module holds bare parameters: replaying it by forward-mode AD costs a
            # whole-model JVP anyway, and with independent examples that one pass gives all of r.
            return self._run_jvp(job)
        layout = self._layouts.get(args, kwargs, n)
        if whole_jvp and layout.root_params:
            # Modules whose output does not hold the batch are covered at the root: the same.
            return self._run_jvp(job)
        device = next(iter(params.values())).device
        verify = self.verify == "always" or (self.verify == "first" and not self._verified)
        run = GhostRun(
            self._plan,
            layout,
            d,
            n,
            cuda_devices(self.model),
            device,
            norms=norms,
            per_module=verify,
        )
        try:
            with torch.enable_grad():
                losses = per_example_losses(self.loss_fn, self.model(*args, **kwargs), y, n)
                inputs = list(run.anchors.values()) + (list(params.values()) if verify else [])
                grads = (
                    torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if inputs else ()
                )
            r, sq = run.finish()
        finally:
            run.close()
        if verify:
            param_grads = grads[len(run.anchors) :]
            self._verify_ghost(run, layout, dict(zip(params, param_grads, strict=True)), d)
            self._verified = True
        return r, sq

    def _verify_ghost(
        self,
        run: GhostRun,
        layout: Layout,
        grads: Mapping[str, Tensor | None],
        d: Direction,
    ) -> None:
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
        for entry in self._plan:
            covered = layout.params(entry)
            if not covered:
                continue
            want, s = dot(covered.values())
            have = float(module_sums.get(entry.name, 0.0))
            if abs(have - want) > 1e-3 * (s + abs(have)) + 1e-30:
                suspects.append(f"{entry.name} ({type(entry.module).__name__})")
        raise RuntimeError(
            f"method='ghost' accounted for sum_i r_i = {got:.6g}, but <grad sum_i l_i, D> = "
            f"{expected:.6g}: some parameters are used outside their module's forward "
            f"(e.g. tied weights read directly). Modules whose share does not match: {suspects}. "
            "Use method='jvp', or verify='never' to accept the partial reward"
        )

    def _run_jvp(self, job: _Job) -> _Result:
        args, kwargs, y, n, d, params, _ = job
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        with torch.no_grad(), forward_ad_friendly(), fwad.dual_level():
            duals = {name: fwad.make_dual(p.detach(), d[name]) for name, p in params.items()}
            out = functional_call(self.model, {**duals, **buffers}, args, kwargs)
            losses = per_example_losses(self.loss_fn, out, y, n)
            tangent = fwad.unpack_dual(losses).tangent
        if tangent is None:  # the loss does not depend on any trainable parameter
            return torch.zeros(n, dtype=torch.float32, device=losses.device), None
        return tangent.float(), None

    def _run_finite_difference(self, job: _Job) -> _Result:
        args, kwargs, y, n, d, params, _ = job
        theta_norm = math.sqrt(
            sum(float(p.detach().double().square().sum()) for p in params.values())
        )
        d_norm = math.sqrt(sum(float(t.double().square().sum()) for t in d.values()))
        if d_norm == 0.0:
            device = next(iter(params.values())).device
            return torch.zeros(n, dtype=torch.float32, device=device), None
        eps = self.rel_eps * max(theta_norm, 1.0) / d_norm
        rng = torch.get_rng_state()
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                torch.set_rng_state(rng)  # the same dropout masks on both sides
                moved = {name: p.detach() + sign * eps * d[name] for name, p in params.items()}
                out = functional_call(self.model, moved, args, kwargs)
                losses.append(per_example_losses(self.loss_fn, out, y, n).double())
        return ((losses[0] - losses[1]) / (2.0 * eps)).float(), None

    def _run_per_sample(self, job: _Job) -> _Result:
        args, kwargs, y, n, d, params, norms = job
        model, loss_fn = self.model, self.loss_fn
        with torch.no_grad():  # check loss_fn on the whole batch, for the same message as elsewhere
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
            chunk_size=self.chunk_size,
        )
        with forward_ad_friendly():
            dot, sq = batched(detached, buffers, args, kwargs, y)
        return dot.float(), sq.float() if norms else None

    # ------------------------------------------------------------------ head

    def _head_forward(self, args: tuple, kwargs: dict) -> tuple[nn.Linear, Tensor, Tensor]:
        """Run the model without autograd; return its last Linear, that layer's input and output."""
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
            "method='head' needs the model's output to be the output of an nn.Linear layer "
            f"(the head), but the model returned {type(out).__name__} from another operation"
        )

    def _head_names(self, head: nn.Linear, params: Mapping[str, nn.Parameter]) -> dict[str, str]:
        by_id = {id(p): name for name, p in params.items()}
        return {local: by_id[id(p)] for local, p in head.named_parameters() if id(p) in by_id}

    def _head_output_grad(self, logits: Tensor, y: Any, n: int, mean: bool) -> Tensor:
        logits = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = per_example_losses(self.loss_fn, logits, y, n)
            total = losses.mean() if mean else losses.sum()
            (g,) = torch.autograd.grad(total, logits)
        return g

    def _run_head(self, job: _Job) -> _Result:
        args, kwargs, y, n, d, params, _ = job
        head, inp, out = self._head_forward(args, kwargs)
        names = self._head_names(head, params)
        if not names:
            raise ValueError("method='head': the last Linear layer has no trainable parameters")
        b = self._head_output_grad(out, y, n, mean=False)
        local = {k: d[g] for k, g in names.items()}
        weight = local.get("weight", torch.zeros_like(head.weight))
        bias = None if head.bias is None else local.get("bias", torch.zeros_like(head.bias))
        return per_example_dot(b, F.linear(inp, weight, bias), 0), None

    def _head_reference(
        self, args: tuple, kwargs: dict, y: Any, n: int, params: dict[str, nn.Parameter]
    ) -> Direction:
        head, inp, out = self._head_forward(args, kwargs)
        b = self._head_output_grad(out, y, n, mean=True)
        d = {name: torch.zeros_like(p) for name, p in params.items()}
        names = self._head_names(head, params)
        b2, a2 = b.reshape(-1, b.shape[-1]), inp.reshape(-1, inp.shape[-1])
        if "weight" in names:
            d[names["weight"]] = b2.T @ a2
        if "bias" in names:
            d[names["bias"]] = b2.sum(0)
        return d
