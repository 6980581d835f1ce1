"""GAR: learned mixtures and augmentation with one line in the training loop."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._batch import call_args, check_same_batch, lead_batch_size, split_batch
from .._check import check_int
from .._mix import mix
from ..probe import _fd
from ..probe._calls import Accumulator, Call, rows_independent
from ..probe._capture import CallCapture, check_outputs, detach_tree
from ..probe._direction import (
    Direction,
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
from ..probe._layout import Layout, Layouts
from ..probe._model_state import RngSnapshot, cuda_devices
from ..probe._plan import Entry, couples_examples, plan
from ..probe._probe import REWARDS
from ..probe.rules import FALLBACK_RULE, registered_names
from ..sampling._sampler import GARSampler

__all__ = ["GAR"]

_STATE_VERSION = 1
_STATE_KEYS = ("mode", "every", "reward", "steps", "augmented", "last_augmented", "rewarded")
_STATE_KEYS += ("dropped", "skipped_nonfinite", "last_mean", "reference")
_STATE_KEYS += ("reference_refresh", "reference_gradient", "reference_step", "rows")
# Saved since estimator= exists; a state without it was saved by the ghost estimator.
_ESTIMATOR_KEY = "estimator"


@dataclass
class _Kept:
    """One forward call of a covered module in a kept batch, and its output gradients."""

    call: Call  # inputs, RNG state and the rule's tangents
    grads: dict[int, tuple[Tensor, int]] = field(default_factory=dict)  # leaf -> (grad, dim)
    rows: Tensor | None = None  # the rows kept of the inputs and output gradients (None: all)


@dataclass
class _Group:
    """What the hooks kept of one batch: one entry per covered-module call."""

    batch: int  # the sampler's batch id
    step: int  # the number of step() calls made before its forward
    calls: list[_Kept] = field(default_factory=list)
    n: int | None = None  # batch size, from the first output seen
    rows: Tensor | None = None  # the rows rewarded, sorted (None: all)
    entries: set[int] = field(default_factory=set)  # ids of the entries called (cosine check)
    fd: _fd.Kept | None = None  # estimator="fd": the root's inputs and output gradients


def check_arguments(
    sampler: GARSampler,
    every: Any,
    reward: Any,
    reference: Any,
    loss_fn: Any,
    reference_refresh: Any = 1,
    rows: Any = None,
    prefix: str = "",
    estimator: Any = "ghost",
) -> None:
    """GAR's checks of ``every``, ``reward``, the reference and its refresh, ``rows`` and
    ``estimator``, shared with the integrations (which check them when they are built, before
    GAR is); ``prefix`` names their arguments."""
    p = prefix
    if estimator not in _fd.ESTIMATORS:
        raise ValueError(
            f"{p}estimator should be one of {', '.join(_fd.ESTIMATORS)}, but got "
            f"{p}estimator={estimator!r}"
        )
    check_int(f"{p}every", every, minimum=1)
    check_int(f"{p}reference_refresh", reference_refresh, minimum=1)
    check_int(f"{p}rows", rows, minimum=1, none_ok=True)
    if reference is None and reference_refresh != 1:
        raise ValueError(
            f"{p}reference_refresh reuses a held-out reference gradient: it needs "
            f"{p}reference=, but got {p}reference=None and "
            f"{p}reference_refresh={reference_refresh}"
        )
    if reward not in REWARDS:
        raise ValueError(
            f"{p}reward should be one of {', '.join(REWARDS)}, but got {p}reward={reward!r}"
        )
    if estimator == "fd" and reward != "dot":
        raise ValueError(
            f"{p}estimator='fd' estimates <g_i, D> only, so it needs {p}reward='dot' (the "
            "cosine needs each example's gradient norm, which only estimator='ghost' "
            f"computes), but got {p}estimator='fd' with {p}reward={reward!r}"
        )
    if reference is not None and (loss_fn is None or not callable(loss_fn)):
        raise ValueError(
            f"{p}reference= needs {p}loss_fn (per-example losses [N]) to compute the reference "
            f"gradient, but got {p}loss_fn={loss_fn!r}"
        )
    if reference is None and len(sampler.names) > 1:
        raise ValueError(
            f"a mixture of {len(sampler.names)} sources needs {p}reference= batches from data "
            f"you trust (a target or validation split), e.g. ReferenceBatches(val_set, 128), "
            f"with {p}loss_fn: a reference drawn from the training mixture itself lets the "
            "mixture run away onto the sources it favours (docs/concepts.md, 'Which reference "
            "can tell good data from bad'). The next-batch reference (no reference) is for "
            "augmentation over one trusted source"
        )


class GAR:
    """Learn the sampler's mixture (and its :class:`GARTransform`) from the training loop itself.

    ::

        loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
        gar = GAR(model, sampler, optimizer=opt, reference=ReferenceBatches(val, 128),
                  loss_fn=per_example_loss)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).mean().backward()
            gar.step()                       # before opt.step()
            opt.step()

    Hooks on the covered layers keep each training batch's layer inputs and output
    gradients; ``step()`` turns them into each example's share of ``<g_i, D>`` (or its
    cosine), ``D`` the optimizer-preconditioned gradient of a held-out reference batch
    (``reference=``; required for a mixture of several sources) or, without one, of the next
    training batch (augmentation over one trusted source; no extra forward or backward), and
    gives them to ``sampler.update``. The k-th training forward after a ``step()`` belongs
    to the k-th batch the tracked loader delivered after it. Semantics, memory and cost:
    docs/howto-gar.md; resume: docs/howto-resume.md.

    Mixed precision: call ``step()`` after ``scaler.unscale_(optimizer)``; a step whose
    ``.grad`` is not finite (one a ``GradScaler`` skips) is skipped too (docs/howto-gar.md).

    Args:
        model: the model the loop trains (or its DDP wrapper).
        sampler: the :class:`GARSampler` whose tracked loader (``sampler.track``) the loop
            iterates.
        optimizer: the optimizer over the model's parameters (or a wrapper exposing it as
            ``.optimizer``, such as accelerate's prepared one); ``D`` is preconditioned by its
            state (the step it really takes; docs/concepts.md lists the optimizers, others
            get one warning and the plain gradient). ``None``: plain gradients.
        every: reward the batches of every ``every``-th step only (>= 1); with next-batch
            references of a transform, every ``every``-th augmented batch.
        reward: ``"cosine"`` or ``"dot"``.
        reference: an iterator of held-out ``(x_ref, y_ref)`` batches, e.g.
            ``ReferenceBatches(target, 128)``; ``None``: the next batch (one source only).
        loss_fn: ``loss_fn(output, target) -> [N]`` per-example losses; needed with
            ``reference``.
        reference_refresh: with ``reference``, compute the reference gradient at most every
            ``reference_refresh`` steps and reuse it in between (>= 1; 1: a new reference
            batch at every rewarded step). The reused gradient is preconditioned by the
            optimizer's state of the step that uses it. Saves a reference forward and
            backward on ``reference_refresh - 1`` of every ``reference_refresh`` rewarded
            steps and holds one gradient's worth of memory (docs/howto-gar.md).
        rows: reward at most this many rows of each kept batch (>= 1; ``None``: all), chosen
            at random from the sampler's seed and the batch id. The per-row work and what the
            hooks keep shrink to those rows for the layers whose examples do not mix (Linear,
            Conv, Embedding, the norms without batch statistics, attention); others are
            computed on the whole batch and cut. The sampler learns from the rows alone
            (``update(rows=)``), the full update in expectation.
        estimator: how each row's ``<g_i, D>`` is computed. ``"ghost"`` (default): exactly,
            from the covered layers' inputs and output gradients (hooks keep them for every
            rewarded row). ``"fd"``: forward-only, ``<B_i, J_i D>`` with ``B_i`` the
            gradient of the loss at the model's output for row i (kept by a hook on the
            output, rewarded rows only) and ``J_i D`` a central finite difference, two
            no-grad forwards of the rewarded rows at ``theta +- eps D`` (moved copies of the
            parameters, cloned buffers; the training forward's RNG state replayed, so dropout
            draws the same masks), ``eps = sqrt(machine eps) * max(||theta||, 1) / ||D||``.
            Needs ``reward="dot"``; keeps nothing on the inner layers; with ``rows=m`` it
            costs two forwards of m rows. The rows are forwarded with the whole batch (two
            forwards of it, then cut) where the model's examples mix (BatchNorm with batch
            statistics: the reward is then row i's output moving along ``D``, batch
            statistics included, which sums to the same batch total as ``"ghost"`` but
            differs per row) or the forward draws random numbers (dropout: the masks must be
            the training forward's). In the next-batch mode the forwards run at the weights
            after the optimizer's step, the output gradients are those before it. Errors
            and costs measured: docs/howto-gar.md.

    Raises at construction for a model without a layer the ghost rules cover (with
    ``estimator="ghost"``), an FSDP or DeepSpeed model, an optimizer that does not own the
    model's trainable parameters, a mixture without ``reference``, or bad arguments.
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
        reference_refresh: int = 1,
        rows: int | None = None,
        estimator: str = "ghost",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model should be an nn.Module, but got {type(model).__name__}")
        if not isinstance(sampler, GARSampler):
            raise TypeError(f"sampler should be a GARSampler, but got {type(sampler).__name__}")
        check_arguments(
            sampler, every, reward, reference, loss_fn, reference_refresh, rows, "", estimator
        )
        if reference is not None:
            reference = iter(reference)
        check_unsharded(model)
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        params = trainable_parameters(core)
        if not params:
            raise ValueError("model has no trainable parameters (every requires_grad is False)")
        # The optimizer that holds the state, behind wrappers such as accelerate's.
        inner = None if optimizer is None else check_optimizer(optimizer, params)
        if estimator == "fd":
            # The root alone: where its inputs and outputs hold the batch.
            entries = [Entry("<root>", core, FALLBACK_RULE, {}, root=True)]
        else:
            entries = plan(core, params, fallback="jvp")
        if estimator == "ghost" and not any(e.rule is not FALLBACK_RULE for e in entries):
            allowed = registered_names()
            raise ValueError(
                f"GAR found no layer it covers in {type(core).__name__}: it needs at least one "
                f"of {allowed} with trainable parameters"
            )
        self.model = model
        self.sampler = sampler
        self.optimizer = optimizer
        self._optimizer = inner
        self.every = every
        self.reward = reward
        self.loss_fn = loss_fn
        self.reference_refresh = reference_refresh
        self.rows = rows
        self.estimator = estimator
        # The last reference gradient (all-reduced, not preconditioned) and the step it was
        # computed at: reused while fewer than reference_refresh steps have passed.
        self._ref_grad: Direction | None = None
        self._ref_step = 0
        self._core = core
        self._reference: Iterator[Any] | None = reference
        self._params = params
        self._param_ids = tuple(id(p) for p in params.values())
        self._frozen_rows = gradient_free_rows(core, params)
        self._devices = cuda_devices(core)
        self._steps = 0
        self._seen = sampler.deliveries  # deliveries paired with a training forward so far
        # A next-batch reference rewards a batch one delivery later: the sampler refuses, at
        # its first batch, a loader that reads too far ahead for its lag to wait for that.
        delay = 0 if reference is not None else 1
        if sampler.reward_delay is None or sampler.reward_delay < delay:
            sampler.reward_delay = delay
        self._step_batches: list[int] = []  # batches received since the last step, in order
        self._forwards = 0  # training forwards since the last step
        self._last_step_batches: list[int] = []  # the batches of the last step
        self._augmented = 0  # augmented batches seen (with reference batches)
        self._last_augmented: int | None = None
        self._groups: list[_Group] = []
        self._current: _Group | None = None
        self._paused = False
        self._rewarded = 0
        self._dropped = 0
        self._skipped_nonfinite = 0
        self._last_mean = math.nan
        # Where each covered layer holds the batch, found per input signature (two small
        # forwards, once) at the first kept batch; the calls of the current forward, counted.
        self._layouts = Layouts(core, entries, "GAR")
        self._layout: Layout | None = None
        self._batch_size = 0
        self._capture: CallCapture | None = None  # the covered layers' hooks (ghost)
        self._handles: list[Any] = [
            core.register_forward_pre_hook(self._begin),
            core.register_forward_pre_hook(self._find_layout, with_kwargs=True),
        ]
        if estimator == "fd":
            self._root = entries[0]
            self._param_set = frozenset(id(p) for p in params.values())
            self._couples = couples_examples(core)
            # Per layout: what to do with each output leaf (found once per input signature).
            self._actions: dict[int, tuple[Layout, dict[int, Any]]] = {}
            self._fd_rng: RngSnapshot | None = None
            self._handles += [
                core.register_forward_pre_hook(self._fd_begin),
                core.register_forward_hook(self._fd_keep, with_kwargs=True),
            ]
        else:
            self._capture = CallCapture(
                entries,
                "GAR",
                self._devices,
                on_call=self._keep,
                on_output=self._watch,
                wants_rng=lambda entry: True,
                detach=True,  # held until step(), past the backward
            )

    def __repr__(self) -> str:
        mode = "next batch" if self._reference is None else "held-out"
        refresh = f", reference_refresh={self.reference_refresh}" if self._reference else ""
        rows = "" if self.rows is None else f", rows={self.rows}"
        estimator = "" if self.estimator == "ghost" else f", estimator={self.estimator!r}"
        return (
            f"{type(self).__name__}(reference={mode}, every={self.every}, "
            f"reward={self.reward!r}{refresh}{rows}{estimator})"
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
        if self._capture is not None:
            self._capture.close()

    # ------------------------------------------------------------------ hooks

    def _begin(self, module: nn.Module, args: tuple) -> None:
        """Root forward: pair it with the batch the loop received, decide whether to keep it.

        The k-th training forward after a ``step()`` belongs to the k-th batch the tracked
        loader delivered after that step (a Trainer may fetch all its accumulation
        micro-batches first); a forward with no new delivery repeats the last batch.
        ``step()`` checks that the pairing was unambiguous.
        """
        self._keep_nothing()
        if self._paused or not (torch.is_grad_enabled() and module.training):
            return
        self._forwards += 1
        if self.sampler.deliveries > self._seen:
            batch = self.sampler.delivery(self._seen)
            self._seen += 1
            self._step_batches.append(batch)
        elif self._step_batches:
            batch = self._step_batches[-1]  # a second forward of the same batch
        else:
            return  # no batch received since the last step (a warm-up forward)
        if self._reference is None and self.sampler.reference_every:
            if self.sampler.is_reference(batch):
                return  # the next-batch reference of the augmented batches before it
            # With reference batches, every k-th *augmented* batch is kept: counting steps
            # would line the kept steps up with the reference batches in every other epoch
            # of odd length, and nothing would be rewarded in those epochs.
            if batch != self._last_augmented:
                self._last_augmented = batch
                self._augmented += 1
            if (self._augmented - 1) % self.every:
                return
        elif self._steps % self.every:
            return
        # A second forward of the same batch (before the same step) replaces the first.
        self._groups = [g for g in self._groups if g.batch != batch]
        self._current = _Group(batch, self._steps)
        self._groups.append(self._current)

    def _keep_nothing(self) -> None:
        """No batch is being kept: the forwards that follow are not captured."""
        self._current = None
        if self._capture is not None:
            self._capture.stop()

    def _find_layout(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root forward of a kept batch: where each covered layer holds the batch (cached by
        input signature; a new one costs two forwards of 2 and 3 examples)."""
        group = self._current
        if group is None:
            return
        self._batch_size = n = lead_batch_size((args, kwargs), "the model's inputs")
        self._paused = True  # the layout runs are not training batches: keep nothing
        try:
            self._layout = self._layouts.get(args, kwargs, n)
        finally:
            self._paused = False
            self._current = group  # the layout runs' root hooks cleared it
        if self.rows is not None and self.rows < n:
            group.rows = self.choose_rows(group.batch, n)
        if self._capture is not None:
            self._capture.start(self._layout, n)

    def choose_rows(self, batch: int, n: int) -> Tensor:
        """The rows of batch ``batch`` (of ``n`` examples) that ``rows=`` rewards: a uniformly
        random subset of ``rows`` positions, sorted, drawn from ``(sampler seed, batch id,
        rank)``: the same in a resumed run, and every row equally likely."""
        seed = mix(self.sampler.seed, 4, batch, self.sampler.rank)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g)[: self.rows].sort().values

    def _fd_begin(self, module: nn.Module, args: tuple) -> None:
        """Root forward of a kept batch (``estimator="fd"``): the RNG state it starts from."""
        self._fd_rng = None if self._current is None else RngSnapshot(self._devices)

    def _fd_keep(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """After the root forward of a kept batch (``estimator="fd"``): keep its inputs (the
        rewarded rows, or the whole batch where rows cannot be forwarded alone), its RNG
        state if it drew random numbers, and hooks for its outputs' gradients."""
        group, layout, rng = self._current, self._layout, self._fd_rng
        self._fd_rng = None
        if group is None or layout is None or rng is None:
            return
        (call,) = layout.calls[id(self._root)]
        leaves = tree_flatten(output)[0]
        n = self._batch_size
        if len(leaves) != len(call.outputs):
            raise RuntimeError(
                f"the model returned {len(leaves)} output tensors, but {len(call.outputs)} in "
                "the runs that found where the batch is; GAR(estimator='fd') needs a forward "
                "whose outputs do not depend on the batch"
            )
        check_outputs(self._root, call, leaves, n, "GAR(estimator='fd')")
        random = _fd.rng_changed(rng)
        rows = group.rows
        whole = (
            rows is None
            or random
            or self._couples
            or any(d is not None and d < 0 for d in call.inputs)
        )
        args, kwargs = detach_tree(args), detach_tree(kwargs)
        versions: list[tuple[Tensor, int]] = []
        if whole:
            # Held by reference: an in-place edit before step() is caught by its version.
            versions = [
                (t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
            ]
        else:
            args, kwargs = _fd.cut_inputs(args, kwargs, call.inputs, cast(Tensor, rows))
        kept = _fd.Kept(args, kwargs, whole, rng if random else None, call.outputs)
        kept.versions = versions
        cached = self._actions.get(id(layout))
        if cached is None or cached[0] is not layout:
            cached = (layout, _fd.output_actions(leaves, call.outputs, self._param_set))
            self._actions[id(layout)] = cached
        _fd.register(kept, leaves, cached[1], rows)
        for i, action in cached[1].items():
            if action == "keep" and group.n is None:
                group.n = leaves[i].shape[call.outputs[i]]
        group.fd = kept

    def _keep(self, call: Call) -> _Kept | None:
        """A covered layer's call in a kept batch (``estimator="ghost"``): keep it, with only
        the rewarded rows where its examples do not mix."""
        group = self._current
        if group is None:
            return None
        kept = _Kept(call)
        if group.rows is not None and rows_independent(
            call.entry, call.layout, call.args or (), call.kwargs or {}
        ):
            call.select_rows(group.rows)  # keep the chosen rows only
            kept.rows = group.rows
        group.calls.append(kept)
        return kept

    def _watch(self, kept: _Kept, i: int, dim: int, leaf: Tensor) -> None:
        """Output ``i`` of a kept call holds the batch in ``dim``: keep its gradient."""
        group = cast(_Group, self._current)
        if group.n is None:
            group.n = leaf.shape[dim]
        leaf.register_hook(functools.partial(self._on_grad, kept, i, dim))

    def _on_grad(self, kept: _Kept, i: int, dim: int, grad: Tensor) -> None:
        grad = grad.detach()
        if kept.rows is not None:
            grad = grad.index_select(dim, kept.rows.to(grad.device))
        kept.grads[i] = (grad, dim)

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
        self._keep_nothing()
        self._check_pairing()
        params = trainable_parameters(self._core)
        if tuple(id(p) for p in params.values()) != self._param_ids:
            raise RuntimeError(
                "the model's trainable parameters changed since this GAR was built "
                "(requires_grad toggled or parameters replaced); build a new GAR"
            )
        if self._skip_nonfinite(params):
            return None
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
            if group.rows is None:
                self.sampler.update(r, batch=group.batch)
            else:
                self.sampler.update(r, batch=group.batch, rows=group.rows)
            self._rewarded += 1
            finite = r[torch.isfinite(r)]
            self._last_mean = float(finite.mean()) if finite.numel() else math.nan
            out = r
        self._steps += 1
        return out

    def _check_pairing(self) -> None:
        """Raise if this step's forwards cannot be told apart by batch; reset the count."""
        pending = self.sampler.deliveries - self._seen
        received, forwards = len(self._step_batches), self._forwards
        self._last_step_batches, self._step_batches, self._forwards = self._step_batches, [], 0
        if pending > 0:
            raise RuntimeError(
                f"{pending} batch(es) received from the tracked loader had no training forward "
                "before this step(): GAR pairs the k-th training forward after a step with the "
                "k-th batch received after it, so train on every batch the loop receives, in "
                "order (or track the iterable the loop itself consumes, not one that reads ahead)"
            )
        if received > 1 and forwards != received:
            raise RuntimeError(
                f"{forwards} training forwards ran on the {received} batches received since "
                "the last step(): which forward belongs to which batch is ambiguous. Run one "
                "forward per received batch between two step() calls"
            )
        if forwards and not received and self.sampler.metrics()["batches_drawn"]:
            raise RuntimeError(
                "the model ran a training forward, but no batch reached the loop through "
                "sampler.track(): wrap the iterable the loop consumes, loader = "
                "sampler.track(loader), so GAR knows which batch each forward belongs to"
            )

    def _awaiting_reference(self) -> bool:
        """With a transform's reference batches (``reference_every``), whether the batch just
        trained on is an augmented one: its gradient is then not the reference of the kept
        augmented batches, which wait for the next un-augmented batch's."""
        if not self.sampler.reference_every or not self._last_step_batches:
            return False
        return not self.sampler.is_reference(self._last_step_batches[-1])

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

    def _skip_nonfinite(self, params: dict[str, nn.Parameter]) -> bool:
        """Whether ``.grad`` holds NaN or inf, as on the steps a ``GradScaler`` skips: GAR then
        skips the step too. The batches trained at this step are dropped (the optimizer does
        not step on their non-finite gradients); batches kept at earlier steps wait for the
        next step's gradient (the weights have not moved). Checked only while a batch is
        kept (one reduction per parameter and a host sync, as the scaler's own check)."""
        if not self._groups:
            return False
        grads = {name: p.grad for name, p in params.items() if p.grad is not None}
        if first_nonfinite(grads) is None:
            return False
        trained = [g for g in self._groups if g.step >= self._steps]
        for group in trained:
            self._groups.remove(group)
        self._dropped += len(trained)
        self._skipped_nonfinite += 1
        self._steps += 1
        return True

    def _direction(self, grads: Direction) -> Direction:
        d = precondition(dict(grads), self._params, self._optimizer)
        if self._frozen_rows:
            d = zero_rows(d, self._frozen_rows)
        return d

    def _reference_direction(self, params: dict[str, nn.Parameter]) -> Direction:
        """``D`` of the held-out mode: the reference gradient (recomputed when it is
        ``reference_refresh`` steps old, else the last one), preconditioned now."""
        if self.reference_refresh == 1:
            return self._direction(self._reference_gradient(params))
        if self._ref_grad is None or self._steps - self._ref_step >= self.reference_refresh:
            self._ref_grad = self._reference_gradient(params)
            self._ref_step = self._steps
        return self._direction(self._ref_grad)

    def _reference_gradient(self, params: dict[str, nn.Parameter]) -> Direction:
        if self._reference is None:
            raise RuntimeError("no reference iterator: GAR was built for the next-batch mode")
        try:
            x_ref, y_ref = split_batch(next(self._reference))
        except StopIteration:
            raise RuntimeError("the reference iterator is exhausted") from None
        args, kwargs = call_args(x_ref)
        n = lead_batch_size(x_ref, "x_ref")
        check_same_batch(y_ref, n)
        self._paused = True  # the reference pass is not a training batch: keep nothing
        try:
            d = mean_loss_gradient(self._core, self.loss_fn, args, kwargs, y_ref, n, params)
        finally:
            self._paused = False
        # The global reference direction: the mean of the ranks' reference gradients.
        mean = self.sampler.sync_group.all_reduce_mean(list(d.values()), "GAR's reference gradient")
        d = dict(zip(d, mean, strict=True))
        bad = first_nonfinite(d)
        if bad is not None:
            raise ValueError(f"the reference gradient of {bad!r} contains NaN or inf")
        return d

    def _rewards(self, group: _Group, d: Direction) -> Tensor | None:
        if self.estimator == "fd":
            if group.n is None or group.fd is None or not group.fd.grads:
                return None  # a forward without a backward: nothing to reward
            self._paused = True  # the difference's forwards are not training batches
            try:
                return _fd.rewards(self._core, group.fd, self._params, d, group.rows, group.n)
            finally:
                self._paused = False
        if group.n is None or not group.calls or any(not c.grads for c in group.calls):
            return None  # a forward without a backward: nothing to reward
        device = next(iter(d.values())).device
        cosine = self.reward == "cosine"
        rows = None if group.rows is None else group.rows.to(device)
        acc = Accumulator(group.n if rows is None else len(rows), device, norms=cosine)
        self._paused = True  # forwards replayed by the rules are not training batches
        try:
            with torch.no_grad():
                for kept in group.calls:
                    grads = {i: grad for i, (grad, _) in kept.grads.items()}
                    if rows is None or kept.rows is not None:
                        kept.call.contribute(acc, grads, d, cosine)
                        continue
                    # A call whose examples mix (batch statistics, a replay): the whole
                    # batch, then the chosen rows.
                    whole = Accumulator(group.n, device, norms=cosine)
                    kept.call.contribute(whole, grads, d, cosine)
                    acc.add_rows(kept.call.entry.name, whole, rows)
        finally:
            self._paused = False
        r, sq = acc.result()
        return cosine_rewards(r, sq, d) if cosine else r

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """GAR's counters and the held-out reference stream's position; call between steps.

        With ``every > 1`` or reference batches, which batches are kept depends on these
        counters, so a resumed run that loads them (with the sampler's state) rewards the
        batches an uninterrupted one rewards. The batches kept but not yet rewarded at the
        checkpoint (the next-batch mode's last batch; augmented batches waiting for a
        reference batch) are not saved (they hold a step's activations): a resumed run
        counts them in ``metrics()["batches_dropped"]`` and never rewards them. In the
        held-out mode every kept batch is rewarded at its own step, so nothing is lost. The
        reference iterator's position is saved when it has ``state_dict()``
        (:class:`ReferenceBatches` has); another iterator restarts where it stands.
        """
        ref = self._reference
        ref_state = ref.state_dict() if ref is not None and hasattr(ref, "state_dict") else None
        return {
            "version": _STATE_VERSION,
            "mode": "next batch" if ref is None else "held-out",
            "every": self.every,
            "reward": self.reward,
            "steps": self._steps,
            "augmented": self._augmented,
            "last_augmented": self._last_augmented,
            "rewarded": self._rewarded,
            "dropped": self._dropped + len(self._groups),
            "skipped_nonfinite": self._skipped_nonfinite,
            "last_mean": self._last_mean,
            "reference": ref_state,
            "reference_refresh": self.reference_refresh,
            "reference_gradient": (
                None
                if self._ref_grad is None
                else {name: t.detach().clone() for name, t in self._ref_grad.items()}
            ),
            "reference_step": self._ref_step,
            "rows": self.rows,
            _ESTIMATOR_KEY: self.estimator,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (load the sampler's state beside it). Raises if the
        state was saved by a GAR with another mode, ``every``, reward, ``reference_refresh``,
        ``rows`` or estimator."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"state should be a GAR.state_dict() of version {_STATE_VERSION}, but got "
                + (
                    f"version={state.get('version')!r}"
                    if isinstance(state, Mapping)
                    else type(state).__name__
                )
            )
        missing = sorted(set(_STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"GAR state is missing the key(s) {missing}")
        mode = "next batch" if self._reference is None else "held-out"
        mine_all = (
            ("mode", mode),
            ("every", self.every),
            ("reward", self.reward),
            ("reference_refresh", self.reference_refresh),
            ("rows", self.rows),
            (_ESTIMATOR_KEY, self.estimator),
        )
        for key, mine in mine_all:
            theirs = state.get(key, "ghost") if key == _ESTIMATOR_KEY else state[key]
            if theirs != mine:
                raise ValueError(f"state has {key}={theirs!r}, but this GAR has {key}={mine!r}")
        ref_grad = self._load_reference_gradient(state["reference_gradient"])  # checked first
        if state["reference"] is not None and self._reference is not None:
            if not hasattr(self._reference, "load_state_dict"):
                raise ValueError(
                    "state holds the reference stream's position, but this GAR's reference "
                    f"iterator ({type(self._reference).__name__}) has no load_state_dict()"
                )
            self._reference.load_state_dict(state["reference"])
        self._steps = int(state["steps"])
        self._augmented = int(state["augmented"])
        last = state["last_augmented"]
        self._last_augmented = None if last is None else int(last)
        self._rewarded = int(state["rewarded"])
        self._dropped = int(state["dropped"])
        self._skipped_nonfinite = int(state["skipped_nonfinite"])
        self._last_mean = float(state["last_mean"])
        self._ref_grad = ref_grad
        self._ref_step = int(state["reference_step"])
        self._groups.clear()
        self._keep_nothing()
        self._seen = self.sampler.deliveries
        self._step_batches, self._last_step_batches, self._forwards = [], [], 0

    def _load_reference_gradient(self, saved: Any) -> Direction | None:
        """The saved reference gradient, checked against the model's parameters."""
        if saved is None:
            return None
        if not isinstance(saved, Mapping) or set(saved) != set(self._params):
            raise ValueError(
                "state's reference_gradient should name exactly this model's trainable "
                f"parameters {sorted(self._params)}, but got "
                + (str(sorted(saved)) if isinstance(saved, Mapping) else type(saved).__name__)
            )
        out = {}
        for name, p in self._params.items():
            t = saved[name]
            if not isinstance(t, Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"state's reference_gradient[{name!r}] should have the parameter's shape "
                    f"{tuple(p.shape)}, but got {shape}"
                )
            out[name] = t.to(device=p.device, dtype=p.dtype)
        return out

    # ------------------------------------------------------------------ reading

    def metrics(self) -> dict[str, float]:
        """A flat dict: ``steps``, ``batches_rewarded``, ``batches_dropped`` (kept but never
        rewarded: a forward without backward, a step skipped for a non-finite ``.grad``, or
        dropped by ``close()``), ``steps_skipped_nonfinite`` (steps skipped because ``.grad``
        held NaN or inf while a batch was kept), ``reward_mean`` (of the last rewarded batch)."""
        return {
            "steps": self._steps,
            "batches_rewarded": self._rewarded,
            "batches_dropped": self._dropped,
            "steps_skipped_nonfinite": self._skipped_nonfinite,
            "reward_mean": self._last_mean,
        }
