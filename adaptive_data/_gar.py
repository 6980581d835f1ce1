"""GAR: learned mixtures and augmentation with one line in the training loop."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _ghost
from ._batch import batch_size, call_args, check_same_batch
from ._check import check_int
from ._direction import (
    Direction,
    check_optimizer,
    first_nonfinite,
    gradient_free_rows,
    precondition,
    trainable_parameters,
    zero_rows,
)
from ._ghost import Call, Entry, register_call_hooks
from ._norms import supported as supported_norms
from ._probe import REWARDS, _cosine, mean_loss_gradient
from ._sampler import GARSampler
from ._state import RngSnapshot, cuda_devices

__all__ = ["GAR"]


@dataclass
class _Kept:
    """One forward call of a covered module in a kept batch, and its output gradients."""

    call: Call  # inputs, RNG state and the rule's tangents
    grads: dict[int, tuple[Tensor, int]] = field(default_factory=dict)  # leaf -> (grad, dim)


@dataclass
class _Group:
    """What the hooks kept of one batch: one entry per covered-module call."""

    batch: int  # the sampler's batch id
    step: int  # the number of step() calls made before its forward
    calls: list[_Kept] = field(default_factory=list)
    n: int | None = None  # batch size, from the first output seen
    entries: set[int] = field(default_factory=set)  # ids of the entries called (cosine check)


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GAR:
    """Learn the sampler's mixture (and its :class:`GARTransform`) from the training loop itself.

    ::

        gar = GAR(model, sampler, optimizer=opt)
        for x, y in loader:                  # loader over sampler, as usual
            opt.zero_grad()
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            gar.step()                       # before opt.step()
            opt.step()

    Next-batch reference (default; the GAR authors' choice). While the loop runs forward and
    backward on batch t, hooks on the covered layers keep each layer's inputs and the
    gradient at its output. At the next ``gar.step()`` (step t+1) the gradient that the
    user's backward just left in ``.grad`` (batch t+1's, preconditioned by the optimizer's
    state when ``optimizer`` is given) is the direction ``D``, and each kept layer gives its
    share of ``<g_i, D>`` for every example of batch t, as ``method="ghost"`` computes it
    (docs/concepts.md): no extra forward or backward. The rewards go to
    ``sampler.update(r, batch=t)``. The tangents use the parameters of step t+1: exact for
    layers affine in their parameters (Linear, Conv, Embedding, the norms' affine part),
    first order in the step for the others (attention, modules covered by a JVP replay).

    Held-out reference (``reference=`` an iterator of ``(x_ref, y_ref)`` batches, with
    ``loss_fn``): ``D`` is the gradient of the reference batch's mean loss, computed at
    ``step()`` with one extra forward and backward (the model's buffers and ``.grad`` left as
    they were), and the batch just trained on is rewarded at once.

    Rewards. ``reward="cosine"`` (default): ``<g_i, D> / (||g_i|| ||D||)``, with exact
    per-example gradient norms computed at ``step()`` from the kept inputs and output
    gradients; ``"dot"``: ``<g_i, D>``. The kept gradients are those of the user's reduced
    loss: with ``.mean()`` every ``g_i`` is divided by the batch size. That scale cancels in
    the cosine and in the sampler's default batch normalisation of rewards; with
    ``normalize="running"``/``"none"`` and the dot reward, use the same reduction throughout.

    Which batches are rewarded. Every ``every``-th step's batches (``every=1``: all). With a
    transform's ``reference_every``, the un-augmented reference batches are never kept or
    rewarded: they are the reference of the augmented batches before them, and ``every``
    counts the augmented batches (every ``every``-th of them is kept, whatever the epochs'
    lengths). An augmented batch
    is rewarded at the next step whose batch is a reference batch (with ``reference_every=2``,
    the very next step; across an epoch's end, the new epoch's first reference batch), never
    against another augmented batch; one that waited more than ``reference_every`` steps (an
    epoch shorter than that has no reference batch) is dropped. With gradient accumulation
    (several forward/backward passes between two ``step()`` calls) each micro-batch is kept
    and rewarded against the accumulated gradient of the next step. When a loader's epoch
    ends, the last batch is rewarded at the first ``step()`` of the next epoch; after the last
    epoch it is never rewarded (``close()`` drops it; the sampler counts it in
    ``batches_dropped_unrewarded`` once it leaves the reward window).

    Memory: the inputs and output gradients of the covered layers for the kept batch (about
    one training step's activations), held from its step to the next; at ``step()`` the
    current batch's are held as well when every step is rewarded. With reference batches,
    up to ``reference_every`` kept batches wait for one.

    DDP: a ``DistributedDataParallel`` model is unwrapped for the hooks; ``.grad`` after its
    backward is the all-reduced one, so ``D`` is the global next-batch gradient. In the
    held-out mode the ranks' reference gradients are averaged (one all-reduce of the
    parameters' size per step), so ``D`` is global too. Each rank rewards its own batch and
    the sampler all-reduces the reward statistics.

    Args:
        model: the model the loop trains (or its DDP wrapper).
        sampler: the :class:`GARSampler` the loop's loader iterates.
        optimizer: SGD, Adam or AdamW over the model's parameters; ``D`` is preconditioned
            by its state (the step it really takes). ``None``: plain gradients.
        every: reward the batches of every ``every``-th step only (>= 1); with reference
            batches, every ``every``-th augmented batch.
        reward: ``"cosine"`` or ``"dot"``.
        reference: ``None`` (next batch) or an iterator of ``(x_ref, y_ref)`` batches, e.g.
            ``iter(ReferenceBatches(target, 128))``.
        loss_fn: ``loss_fn(output, target) -> [N]`` per-example losses; needed with
            ``reference``.

    Raises at construction for a model without a layer the ghost rules cover, an optimizer
    that does not own the model's trainable parameters, or bad arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: GARSampler,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 1,
        reward: str = "cosine",
        reference: Iterable[Any] | None = None,
        loss_fn: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model should be an nn.Module, but got {type(model).__name__}")
        if not isinstance(sampler, GARSampler):
            raise TypeError(f"sampler should be a GARSampler, but got {type(sampler).__name__}")
        check_int("every", every, minimum=1)
        if reward not in REWARDS:
            raise ValueError(
                f"reward should be one of {', '.join(REWARDS)}, but got reward={reward!r}"
            )
        if reference is not None:
            if loss_fn is None or not callable(loss_fn):
                raise ValueError(
                    "reference= needs loss_fn (per-example losses) to compute the reference "
                    f"gradient, but got loss_fn={loss_fn!r}"
                )
            reference = iter(reference)
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        params = trainable_parameters(core)
        if not params:
            raise ValueError("model has no trainable parameters (every requires_grad is False)")
        if optimizer is not None:
            check_optimizer(optimizer, params)
        entries = _ghost.plan(core, params, fallback="jvp")
        if not any(e.rule is not _ghost.FALLBACK_RULE for e in entries):
            allowed = ", ".join(sorted(cls.__name__ for cls in _ghost.ghost_rules()))
            raise ValueError(
                f"GAR found no layer it covers in {type(core).__name__}: it needs at least one "
                f"of {allowed} with trainable parameters"
            )
        if reward == "cosine":
            missing = [f"{e.name} ({type(e.module).__name__})" for e in entries if e.norm is None]
            if missing:
                raise ValueError(
                    f"reward='cosine' has no per-example gradient norm for {missing}; norms "
                    f"exist for {', '.join(supported_norms())}. Use reward='dot'"
                )
        self.model = model
        self.sampler = sampler
        self.optimizer = optimizer
        self.every = every
        self.reward = reward
        self.loss_fn = loss_fn
        self._core = core
        self._reference: Iterator[Any] | None = reference
        self._params = params
        self._param_ids = tuple(id(p) for p in params.values())
        self._frozen_rows = gradient_free_rows(core, params)
        self._devices = cuda_devices(core)
        self._steps = 0
        self._augmented = 0  # augmented batches seen (with reference batches)
        self._last_augmented: int | None = None
        self._groups: list[_Group] = []
        self._current: _Group | None = None
        self._paused = False
        self._rewarded = 0
        self._dropped = 0
        self._last_mean = math.nan
        self._rng_snapshots: dict[int, RngSnapshot] = {}
        self._handles: list[Any] = [
            core.register_forward_pre_hook(self._begin),
            *register_call_hooks(entries, self._rng, self._keep),
        ]

    def __repr__(self) -> str:
        mode = "next batch" if self._reference is None else "held-out"
        return (
            f"{type(self).__name__}(reference={mode}, every={self.every}, reward={self.reward!r})"
        )

    def __enter__(self) -> GAR:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and drop what they kept. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._dropped += len(self._groups)
        self._groups.clear()
        self._current = None
        self._rng_snapshots.clear()

    # ------------------------------------------------------------------ hooks

    def _begin(self, module: nn.Module, args: tuple) -> None:
        """Root forward: decide whether this batch is kept, and for which sampler batch."""
        self._current = None
        if self._paused or not (torch.is_grad_enabled() and module.training):
            return
        counting_batches = bool(self.sampler.reference_every)
        if not counting_batches and self._steps % self.every:
            return
        try:
            batch = self.sampler.last_batch
        except RuntimeError:
            return  # no batch received from the sampler's loader yet (a warm-up forward)
        if self.sampler.is_reference(batch):
            return
        if counting_batches:
            # With reference batches, every k-th *augmented* batch is kept: counting steps
            # would line the kept steps up with the reference batches in every other epoch
            # of odd length, and nothing would be rewarded in those epochs.
            if batch != self._last_augmented:
                self._last_augmented = batch
                self._augmented += 1
            if (self._augmented - 1) % self.every:
                return
        # A second forward of the same batch (before the same step) replaces the first.
        self._groups = [g for g in self._groups if g.batch != batch]
        self._current = _Group(batch, self._steps)
        self._groups.append(self._current)

    def _rng(self, entry: Entry, module: nn.Module, args: tuple) -> None:
        if self._current is not None:
            self._rng_snapshots[id(entry)] = RngSnapshot(self._devices)

    def _keep(
        self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        group = self._current
        if group is None:
            return
        if self.reward == "cosine":
            if id(entry) in group.entries:
                _ghost.refuse_repeated_call(entry, module)
            group.entries.add(id(entry))
        # Detached views share the inputs' version counters: in-place edits are still caught.
        kept = _Kept(
            Call(entry, _detach(args), _detach(kwargs), self._rng_snapshots.pop(id(entry), None))
        )
        outs, _ = tree_flatten(output)
        dims = entry.rule.batch_dims(module, len(outs))
        for i, leaf in enumerate(outs):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad):
                continue
            dim = dims[i]
            n = leaf.shape[dim] if leaf.dim() > dim else -1
            if group.n is None:
                group.n = n
            if n != group.n:
                raise ValueError(
                    f"GAR cannot attribute module {entry.name!r} ({type(module).__name__}) to "
                    f"examples: its output of shape {list(leaf.shape)} does not hold the batch "
                    f"(size {group.n}) in dim {dim}"
                )
            leaf.register_hook(functools.partial(self._on_grad, kept, i, dim))
        group.calls.append(kept)

    def _on_grad(self, kept: _Kept, i: int, dim: int, grad: Tensor) -> None:
        kept.grads[i] = (grad.detach(), dim)

    # ------------------------------------------------------------------ the step

    def step(self) -> Tensor | None:
        """Reward the kept batches whose reference is now known; call after ``backward()``.

        Returns the rewards applied (of the last batch rewarded), or ``None`` when no batch
        was rewarded at this step.
        """
        if not self._handles:
            raise RuntimeError("step() after close(): this GAR's hooks are removed")
        # This step's batch is complete. From here on no forward is a training batch: the
        # rules that replay a module's forward (JVP) must not be kept as one.
        self._current = None
        params = trainable_parameters(self._core)
        if tuple(id(p) for p in params.values()) != self._param_ids:
            raise RuntimeError(
                "the model's trainable parameters changed since this GAR was built "
                "(requires_grad toggled or parameters replaced); build a new GAR"
            )
        if self._reference is None:
            missing = [name for name, p in params.items() if p.grad is None]
            if len(missing) == len(params):
                raise RuntimeError(
                    "step() was called before any backward(): no parameter has a .grad. Call "
                    "it after loss.backward() and before optimizer.step()"
                )
            self._drop_stale()
            due = [g for g in self._groups if g.step < self._steps]
            if due and self._awaiting_reference():
                due = []  # the kept augmented batches wait for the next reference batch
            d = (
                self._direction(
                    {
                        name: torch.zeros_like(p) if p.grad is None else p.grad
                        for name, p in params.items()
                    }
                )
                if due
                else None
            )
        else:
            due = [g for g in self._groups if g.step <= self._steps]
            d = self._reference_direction(params) if due else None
        out = None
        for group in due:
            self._groups.remove(group)
            if d is None:
                continue
            r = self._rewards(group, d)
            if r is None:
                self._dropped += 1
                continue
            self.sampler.update(r, batch=group.batch)
            self._rewarded += 1
            finite = r[torch.isfinite(r)]
            self._last_mean = float(finite.mean()) if finite.numel() else math.nan
            out = r
        self._steps += 1
        return out

    def _awaiting_reference(self) -> bool:
        """With a transform's reference batches (``reference_every``), whether the batch just
        trained on is an augmented one: its gradient is then not the reference of the kept
        augmented batches, which wait for the next un-augmented batch's."""
        if not self.sampler.reference_every:
            return False
        try:
            return not self.sampler.is_reference(self.sampler.last_batch)
        except (RuntimeError, ValueError):
            return False  # no batch received from the sampler's loader

    def _drop_stale(self) -> None:
        """Drop kept batches that waited more than ``reference_every`` steps for a reference
        batch (an epoch shorter than ``reference_every`` has none): memory stays bounded."""
        wait = self.sampler.reference_every
        if not wait:
            return
        stale = [g for g in self._groups if self._steps - g.step > wait]
        for group in stale:
            self._groups.remove(group)
        self._dropped += len(stale)

    def _direction(self, grads: Direction) -> Direction:
        bad = first_nonfinite(grads)
        if bad is not None:
            raise ValueError(
                f"the gradient of {bad!r} in .grad contains NaN or inf; GAR does not use it as "
                "a reference direction (skip step() on such steps)"
            )
        d = precondition(dict(grads), self._params, self.optimizer)
        if self._frozen_rows:
            d = zero_rows(d, self._frozen_rows)
        return d

    def _reference_direction(self, params: dict[str, nn.Parameter]) -> Direction:
        if self._reference is None:
            raise RuntimeError("no reference iterator: GAR was built for the next-batch mode")
        try:
            x_ref, y_ref = next(self._reference)
        except StopIteration:
            raise RuntimeError("the reference iterator is exhausted") from None
        args, kwargs = call_args(x_ref)
        n = batch_size(x_ref, "x_ref")
        check_same_batch(y_ref, n)
        self._paused = True  # the reference pass is not a training batch: keep nothing
        try:
            d = mean_loss_gradient(self._core, self.loss_fn, args, kwargs, y_ref, n, params)
        finally:
            self._paused = False
        # The global reference direction: the mean of the ranks' reference gradients.
        mean = self.sampler._group.all_reduce_mean(list(d.values()), "GAR's reference gradient")
        return self._direction(dict(zip(d, mean, strict=True)))

    def _rewards(self, group: _Group, d: Direction) -> Tensor | None:
        if group.n is None or not group.calls or any(not c.grads for c in group.calls):
            return None  # a forward without a backward: nothing to reward
        device = next(iter(d.values())).device
        r = torch.zeros(group.n, dtype=torch.float32, device=device)
        sq = torch.zeros_like(r)
        cosine = self.reward == "cosine"
        with torch.no_grad():
            for kept in group.calls:
                for i, (grad, dim) in kept.grads.items():
                    dot, sq_m = kept.call.share(i, dim, grad, d, norms=cosine)
                    r += dot
                    if sq_m is not None:
                        sq += sq_m
        return _cosine(r, sq, d) if cosine else r

    # ------------------------------------------------------------------ reading

    def metrics(self) -> dict[str, float]:
        """A flat dict: ``steps``, ``batches_rewarded``, ``batches_dropped`` (kept but never
        rewarded: a forward without backward, or dropped by ``close()``), ``reward_mean``
        (of the last rewarded batch)."""
        return {
            "steps": self._steps,
            "batches_rewarded": self._rewarded,
            "batches_dropped": self._dropped,
            "reward_mean": self._last_mean,
        }
