"""GAR: learned mixtures and augmentation with one line in the training loop.

GAR is the pairing and the schedule: which training forward belongs to which batch
(:class:`Pairing`), which batches and rows are rewarded and when (:class:`Schedule`). What is
kept of a batch and its rewards are the engine's (:mod:`adaptive_data.probe`): a keeper per
estimator, and the direction source for ``D``.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._batch import call_args, check_same_batch, lead_batch_size, split_batch
from ..probe._capture import Pause
from ..probe._direction import (
    Direction,
    DirectionSource,
    first_nonfinite,
    warn_if_tied_padding,
)
from ..probe._keepers import KEEPERS, FdKeeper, Keeper, KeptBatch
from ..probe._model_state import cuda_devices
from ..probe._plan import plan
from ..probe._sharding import check_sharding
from ..probe.rules import FALLBACK_RULE, registered_names
from ..sampling import GARSampler
from . import _state
from ._arguments import check_arguments
from ._budget import AUTO, KEEP_COSTS, Budget, per_row_contrast, resolve_budget
from ._pairing import Pairing
from ._reference import CallShape, as_training_call, failed
from ._schedule import Schedule
from ._watch import REASONS, DropWatch

__all__ = ["GAR"]


class GAR:
    """Learn the sampler's mixture (and its :class:`GARTransform`) from the training loop itself.

    ::

        loader = sampler.track(DataLoader(sampler.dataset, batch_sampler=sampler))
        gar = GAR(model, sampler, optimizer=opt, reference=ReferenceBatches(val, 64),
                  loss_fn=per_example_loss)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).mean().backward()
            gar.step()                       # before opt.step()
            opt.step()

    Hooks keep what each rewarded batch's rewards need while the loop's own forward and
    backward run; ``step()`` turns it into each example's ``<g_i, D>`` (or its cosine), ``D``
    the optimizer-preconditioned gradient of a held-out reference batch (``reference=``;
    required for a mixture) or, without one, of the next training batch (augmentation over
    one trusted source; no extra pass), and gives them to ``sampler.update``. The k-th
    training forward after a ``step()`` belongs to the k-th batch the tracked loader
    delivered after it. Semantics, costs and mixed precision: docs/howto-gar.md; resume:
    docs/howto-resume.md.

    Args:
        model: the model the loop trains (or its DDP wrapper).
        sampler: the :class:`GARSampler` whose tracked loader (``sampler.track``) the loop
            iterates.
        optimizer: the optimizer over the model's parameters (or a wrapper exposing it as
            ``.optimizer``); ``D`` is preconditioned by its state. ``None``: plain gradients.
        budget: the rewards' estimated share of a training step's work: the first 16
            rewarded batches are exact (every batch, every row, a fresh reference); then GAR
            chooses which batches to reward, how many of their rows and how often to
            recompute the reference gradient to stay within the budget, from counted work
            only (the same choices with any worker count and after a resume;
            docs/howto-gar.md, "The cost budget"). ``"auto"`` (default): 0.1 with
            ``reference`` (a mixture), 0.02 with the next batch (an augmentation policy).
            ``None``: every batch, every row, a fresh reference (exact, and 2-4x a training
            step). An explicit ``every``, ``rows`` or ``reference_refresh`` replaces that
            choice.
        every: reward the batches of every ``every``-th step only (>= 1); with next-batch
            references of a transform, every ``every``-th augmented batch. ``None``: the
            budget's choice (1 without a budget).
        reward: ``"cosine"`` or ``"dot"``.
        reference: an iterator of held-out ``(x_ref, y_ref)`` batches, e.g.
            ``ReferenceBatches(target, 128)``; ``None``: the next batch (one source only).
        loss_fn: ``loss_fn(output, target) -> [N]`` per-example losses; needed with
            ``reference``.
        reference_refresh: with ``reference``, compute the reference gradient at most every
            ``reference_refresh`` steps and reuse it in between (preconditioned by the
            optimizer's state of the step that uses it). ``None``: the budget's choice (1
            without a budget).
        rows: reward at most this many rows of each kept batch, drawn from the sampler's
            seed and the batch id; the sampler learns from those rows alone. ``None``: the
            budget's choice (all rows without a budget).
        estimator: ``"ghost"`` (exact, from the covered layers' inputs and output
            gradients) or ``"fd"`` (forward-only: a central difference of two no-grad
            forwards of the rewarded rows at ``theta +- eps D``; needs ``reward="dot"``).
        fallback: ``"jvp"`` (default): a module no rule covers takes the generic path (its
            forward again, and one backward per example for the cosine), with one warning
            naming it and its share of the step's time; ``"raise"`` refuses it instead.

    Raises at construction for a model without a layer the rules cover (``estimator=
    "ghost"``), an FSDP1 or DeepSpeed model, an FSDP2 model with an estimator other than
    ``"fd"``, an optimizer that does not own the model's trainable parameters, a mixture
    without ``reference``, or bad arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: GARSampler,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        budget: float | str | None = AUTO,
        every: int | None = None,
        reward: str = "cosine",
        reference: Iterable[Any] | None = None,
        loss_fn: Any = None,
        reference_refresh: int | None = None,
        rows: int | None = None,
        estimator: str = "ghost",
        fallback: str = "jvp",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model should be an nn.Module, but got {type(model).__name__}")
        if not isinstance(sampler, GARSampler):
            raise TypeError(f"sampler should be a GARSampler, but got {type(sampler).__name__}")
        check_arguments(
            sampler,
            every,
            reward,
            reference,
            loss_fn,
            reference_refresh,
            rows,
            estimator=estimator,
            fallback=fallback,
            budget=budget,
        )
        check_sharding(model, estimator, "GAR")
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        group = sampler.sync_group
        share = resolve_budget(budget, next_batch=reference is None)
        self._budget = Budget(
            share,
            sampler.batch_size,
            KEEP_COSTS[estimator, reward],
            every=every,
            rows=rows,
            refresh=reference_refresh,
        )
        self._source = DirectionSource(
            core,
            optimizer,
            loss_fn=loss_fn,
            refresh=self._budget.reference_refresh(),
            sync=lambda ts: group.all_reduce_mean(ts, "GAR's reference gradient"),
            # The sampler's collectives (its sync_timeout_s) for the shards' sums, when it
            # has ranks; else the process group's.
            group=group if group.active else None,
            who="GAR",
        )
        self.model, self.sampler, self.optimizer = model, sampler, optimizer
        self.budget: float | None = share  # the share "auto" stands for, or the one given
        self.every, self.reward, self.loss_fn = every, reward, loss_fn
        self.reference_refresh, self.rows, self.estimator = reference_refresh, rows, estimator
        self.fallback = fallback
        self._reference: Iterator[Any] | None = None if reference is None else iter(reference)
        self._pairing = Pairing(sampler)
        self._schedule = Schedule(sampler, self._budget, reference is None)
        self._pause = Pause()  # while active, no forward is a training batch
        # GAR's root hook first: the keeper's hooks on the root (its RNG state) run after it
        # has opened the batch.
        self._handles = [
            core.register_forward_pre_hook(self._on_forward, with_kwargs=True),
            core.register_forward_hook(self._after_forward),
        ]
        try:
            self._keeper = self._make_keeper(core, estimator)
        except Exception:
            for handle in self._handles:
                handle.remove()
            raise
        self._counts = _state.Counters()
        self._watch = DropWatch()
        self._versions = 0  # the parameters' versions at the last training forward
        self._training_call: CallShape | None = None  # how the loop calls the model
        self._clock = _state.Clock()
        self._reported: set[str] = set()  # modules whose generic path was reported
        self._generic_seen = 0  # the keeper's generic calls already counted
        self._idle = _nothing_to_learn(sampler)
        if self._idle:
            warnings.warn(
                f"GAR has nothing to learn: the sampler has one source ({sampler.names[0]!r}) "
                f"and {self._idle}, so it computes no rewards. Give GARTransform "
                "learn_ops=True or learn_magnitudes=True to learn the augmentation, or "
                "sample from several sources to learn the mixture",
                UserWarning,
                stacklevel=2,
            )
        # A next-batch reference rewards a batch one delivery later: the sampler refuses, at
        # its first batch, a loader that reads too far ahead for its lag to wait for that.
        sampler.expect_reward_delay(0 if reference is not None else 1)

    def _make_keeper(self, core: nn.Module, estimator: str) -> Keeper:
        params, devices = self._source.params, cuda_devices(core)
        choose = self._schedule.choose_rows
        if estimator == "fd":
            warn_if_tied_padding(core, "fd")
            return FdKeeper(core, params, self._pause, choose, devices, self._source.shards)
        entries = plan(core, params, fallback=self.fallback)
        if not any(e.rule is not FALLBACK_RULE for e in entries):
            raise ValueError(
                f"GAR found no layer it covers in {type(core).__name__}: it needs at least one "
                f"of {registered_names()} with trainable parameters"
            )
        # A module whose output holds no batch may still be covered by its rule at the sum
        # its output is added to (found in the forward): fallback="raise" refuses the root's
        # replay when it happens, at a step.
        return KEEPERS[estimator](core, params, entries, self._pause, choose, devices)

    def _parts(self) -> _state.Parts:
        """The settings a saved state must agree with, and the parts that hold the state."""
        budget = self._budget
        settings = {  # without a budget, the explicit settings of a GAR before budget=
            "mode": "next batch" if self._reference is None else "held-out",
            "budget": self.budget,
            "every": budget.fixed_every,
            "reward": self.reward,
            "reference_refresh": budget.fixed_refresh,
            "rows": self.rows,
            "estimator": self.estimator,
        }
        return _state.Parts(
            settings, self._schedule, self._counts, self._clock, self._source, self._reference
        )

    def __repr__(self) -> str:
        mode = "next batch" if self._reference is None else "held-out"
        b = self._budget
        every = "" if b.fixed_every is None else f", every={b.fixed_every}"
        refresh = (
            f", reference_refresh={b.fixed_refresh}"
            if self._reference is not None and b.fixed_refresh is not None
            else ""
        )
        rows = "" if self.rows is None else f", rows={self.rows}"
        estimator = "" if self.estimator == "ghost" else f", estimator={self.estimator!r}"
        return (
            f"{type(self).__name__}(reference={mode}, budget={self.budget}{every}, "
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
        self._counts.drop("closed", len(self._schedule.pending))
        self._schedule.release(self._schedule.pending)
        self._schedule.pending.clear()
        self._keeper.close()

    def choose_rows(self, batch: int, n: int) -> Tensor:
        """The rows of batch ``batch`` (of ``n`` examples) that ``rows=`` rewards, sorted: a
        uniformly random subset drawn from ``(sampler seed, batch id, rank)``."""
        rows = self._schedule.choose_rows(batch, n)
        return torch.arange(n) if rows is None else rows

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root forward: pair it with the batch the loop received; keep it if it is rewarded."""
        if self._pause.active or self._idle or _rerouted(module):
            return
        self._keeper.stop()
        if not (torch.is_grad_enabled() and module.training):
            self._pairing.skipped(eval_mode=not module.training)
            return
        if self._training_call is None:
            self._training_call = CallShape(args, kwargs)
        batch = self._pairing.pair()
        kept = None if batch is None else self._schedule.keep(batch)
        if kept is not None:
            earlier = kept.earlier
            if earlier is not None:  # hold the latest earlier forward that had its backward
                if self._keeper.backward_seen(earlier):
                    older, earlier.earlier = earlier.earlier, None
                else:
                    older, kept.earlier, earlier.earlier = earlier, earlier.earlier, None
                if older is not None:
                    older.release()
            self._keeper.open(kept, args, kwargs)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After a training forward: the parameters' versions (a forward may edit them in
        place, as an ``nn.Embedding(max_norm=...)`` does), which ``step()`` finds unchanged
        unless the optimizer stepped before it."""
        if (
            not self._pause.active
            and torch.is_grad_enabled()
            and module.training
            and not _rerouted(module)
        ):
            self._versions = _versions(self._source.params)

    # ------------------------------------------------------------------ the step

    def step(self) -> Tensor | None:
        """Reward the kept batches whose reference is now known; call after ``backward()``.

        Returns the rewards applied (of the last batch rewarded), or ``None`` when no batch
        was rewarded at this step.
        """
        start = time.perf_counter()
        try:
            return self._step(start)
        finally:
            self._clock.add(start, time.perf_counter())

    def _step(self, start: float) -> Tensor | None:
        if not self._handles:
            raise RuntimeError("step() after close(): this GAR's hooks are removed")
        if self._idle:  # nothing to learn (said at construction)
            self._schedule.advance()
            return None
        # This step's batch is complete: no later forward is a training batch of it.
        self._keeper.stop()
        self._pairing.check()
        # FSDP2 leaves the root's gathered weights in place after a forward without a
        # backward (an evaluation): free them, so the parameters are the shards again.
        self._source.shards.reshard()
        # The full check walks every module: only when a batch is kept (its rewards would
        # use the parameters), or when the known ones have no .grad (to say why).
        params = self._source.params
        no_grad = all(p.grad is None for p in params.values())
        if self._schedule.pending or no_grad:
            params = self._source.check_parameters()  # the same ones, or it raises
        if self._pairing.last_batches and _versions(params) != self._versions:
            raise RuntimeError(
                "the model's parameters changed between this step's training forward and "
                "gar.step(): gar.step() was called after optimizer.step() (or the parameters "
                "were edited in place), so the rewards would pair the new weights with the "
                "old batch. Call gar.step() after loss.backward() and before optimizer.step()"
            )
        if no_grad:
            raise RuntimeError(
                "step() was called before any backward(): no parameter has a .grad. Call it "
                "after loss.backward() and before optimizer.step()"
            )
        if (
            self._schedule.pending
            and first_nonfinite(_grads(params, present=True), self._source.shards) is not None
        ):
            # .grad holds NaN or inf, as on the steps a GradScaler skips: skip this one too.
            self._drop("nonfinite_grad", self._schedule.drop_trained())
            self._counts.skipped_nonfinite += 1
            self._schedule.advance()
            return None
        if self._reference is None:
            due, stale = self._schedule.due(self._pairing.last_batches)
            self._drop("stale", stale)
            d = self._source.direction(_grads(params)) if due else None
        else:
            due, _ = self._schedule.due(self._pairing.last_batches)
            d = self._reference_direction() if due else None
        try:
            out = self._reward(due, d, start)
        finally:
            self._schedule.release(due)
        self._schedule.advance()
        return out

    def _reward(self, due: list[KeptBatch], d: Direction | None, start: float) -> Tensor | None:
        """Reward the kept batches ``due`` against ``D``; the rewards of the last one
        rewarded, or None."""
        out = None
        for kept in due:  # d is known whenever a batch is due
            # No backward reached a forward the loop ran after the backward (a training
            # accuracy): the batch's earlier forward that had one holds its rewards.
            kept = self._keeper.pick(kept)
            r = self._keeper.rewards(kept, d, self.reward == "cosine")  # type: ignore[arg-type]
            self._report_generic(time.perf_counter() - start)
            if r is None:
                self._drop("no_backward")
                continue
            groups = self._groups(kept.batch)
            # The updates a sparsely kept batch stands for (only when not 1).
            weighted: dict[str, Any] = {} if kept.weight == 1.0 else {"weight": kept.weight}
            if kept.rows is None:
                self.sampler.update(r, batch=kept.batch, **weighted)
            else:
                self.sampler.update(r, batch=kept.batch, rows=kept.rows, **weighted)
                groups = None if groups is None else [groups[i] for i in kept.rows.tolist()]
            self._observe_contrast(r, groups)
            finite = r[torch.isfinite(r)]
            if finite.numel():
                self._counts.rewarded += 1
                self._counts.last_mean = float(finite.mean())
                self._watch.rewarded()
            else:  # the sampler counts and drops them (metrics()["nonfinite_rewards"])
                self._drop("nonfinite_rewards")
            out = r
        return out

    def _drop(self, reason: str, count: int = 1) -> None:
        """``count`` kept batches brought no reward, for ``reason`` (counted; one warning
        when most recent ones do)."""
        if count:
            self._counts.drop(reason, count)
            self._watch.dropped(reason, count)

    def _groups(self, batch: int) -> list[int] | None:
        """What the budget tells apart in a batch's rewards: each row's source in a mixture,
        its augmentation over one source (None: nothing to tell apart, or no budget)."""
        if self._budget.budget is None:
            return None
        if len(self.sampler.names) > 1:
            return self.sampler.batch_sources(batch)
        return self.sampler.batch_augmentations(batch)

    def _observe_contrast(self, r: Tensor, groups: list[int] | None) -> None:
        """Give the budget the contrast of a rewarded batch, averaged over the ranks (which
        reward the same batches, so every rank chooses the same rows)."""
        if self._budget.budget is None:
            return
        phi = None if groups is None else per_row_contrast(r, groups)
        group = self.sampler.sync_group
        if group.active:
            mine = [0.0, 0.0] if phi is None else [phi, 1.0]
            total, count = group.all_reduce_sum(mine, "GAR's budget")
            phi = total / count if count else None
        self._budget.observe_contrast(phi, r.numel())

    def _report_generic(self, seconds: float) -> None:
        """Report the modules new to the generic path (``seconds`` so far in this step)."""
        total = sum(s.calls for s in self._keeper.slow.values())
        self._counts.generic_calls += total - self._generic_seen
        self._generic_seen = total
        _state.report_generic(self._keeper.slow, self._reported, self.fallback, seconds)

    def _reference_direction(self) -> Direction:
        """``D`` of the held-out mode: the reference gradient (recomputed when it is
        ``reference_refresh`` steps old, or the budget's interval, else the last one),
        preconditioned now."""
        source, budget = self._source, self._budget
        source.refresh = budget.reference_refresh()
        keep = budget.budget is not None  # the budget compares each fresh one with the last
        gradient = source.reused_gradient(self._schedule.steps, self._fresh_reference, keep)
        return source.direction(gradient)

    def _fresh_reference(self) -> Direction:
        gradient, n = self._reference_gradient()
        self._budget.charge_reference(n)
        self._budget.observe_reference(gradient, self._source.gradient, self._source.shards)
        return gradient

    def _reference_gradient(self) -> tuple[Direction, int]:
        """A fresh reference gradient, and the rows of the reference batch it came from."""
        if self._reference is None:
            raise RuntimeError("no reference iterator: GAR was built for the next-batch mode")
        try:
            x_ref, y_ref = split_batch(next(self._reference))
        except StopIteration:
            raise RuntimeError("the reference iterator is exhausted") from None
        args, kwargs = as_training_call(*call_args(x_ref), self._training_call)
        n = lead_batch_size(x_ref, "the reference batch's inputs")
        check_same_batch(y_ref, n)
        with self._pause():  # the reference pass is not a training batch: keep nothing
            explain = functools.partial(failed, args=args, kwargs=kwargs, call=self._training_call)
            return self._source.reference_gradient(args, kwargs, y_ref, n, explain), n

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """GAR's counters and the held-out reference stream's position; call between steps.

        With ``every > 1`` or reference batches, which batches are kept depends on these
        counters, so a resumed run that loads them (with the sampler's state) rewards the
        batches an uninterrupted one rewards. Batches kept but not yet rewarded at the
        checkpoint are not saved (they hold a step's activations): a resumed run counts them
        in ``metrics()["batches_dropped"]``. The reference iterator's position is saved when
        it has ``state_dict()`` (:class:`ReferenceBatches` has).
        """
        return _state.save(self._parts())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (load the sampler's state beside it). Raises if the
        state was saved by a GAR with another mode, ``every``, reward, ``reference_refresh``,
        ``rows`` or estimator."""
        _state.load(state, self._parts())
        self._keeper.stop()
        self._pairing.reset()

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise, naming the key, unless :meth:`load_state_dict` would take ``state``; changes
        nothing (to check a whole checkpoint before loading any part of it)."""
        _state.load(state, self._parts(), apply=False)

    # ------------------------------------------------------------------ reading

    def metrics(self) -> dict[str, float]:
        """A flat dict: ``steps``, ``batches_rewarded``, ``batches_dropped`` (kept but never
        rewarded: a forward without backward, a step skipped for a non-finite ``.grad``, or
        dropped by ``close()``), ``steps_skipped_nonfinite`` (steps skipped because ``.grad``
        held NaN or inf while a batch was kept), ``reward_mean`` (of the last rewarded batch),
        ``generic_calls`` (module calls rewarded by the generic path so far), and what the
        budget chose and estimates: ``budget``, ``budget/cost_per_step`` (the rewards'
        estimated work per step so far, in training steps), ``budget/rows`` and
        ``budget/reference_refresh`` (in force now), ``budget/contrast`` (the smoothed
        per-row contrast between the sources' mean rewards, in squared standard errors) and
        ``budget/reference_cosine`` (of the last two fresh reference gradients; NaN before
        two). Counted, not timed: a resumed run continues them exactly (:meth:`timing` has
        the wall time)."""
        steps = self._schedule.steps
        return {
            "steps": steps,
            "batches_rewarded": self._counts.rewarded,
            "batches_dropped": self._counts.dropped,
            **{f"batches_dropped/{k}": self._counts.dropped_by[k] for k in REASONS},
            "steps_skipped_nonfinite": self._counts.skipped_nonfinite,
            "reward_mean": self._counts.last_mean,
            "generic_calls": self._counts.generic_calls,
            **self._budget.metrics(steps),
        }

    def timing(self) -> dict[str, float]:
        """Wall time, for you to look at (nothing GAR decides depends on it):
        ``seconds_in_step`` spent in ``step()`` (the rewards, the reference gradient; the
        capture in the forward and backward is not in it), ``seconds`` of the loop since the
        first step began, and ``time_share``, their ratio. A resumed run adds its seconds to
        the checkpoint's."""
        in_step, span = self._clock.seconds()
        return {"seconds_in_step": in_step, "seconds": span, "time_share": self._clock.share()}


def _nothing_to_learn(sampler: GARSampler) -> str:
    """Why GAR has nothing to learn from ``sampler`` (one source and no augmentation policy
    that learns), or ``""``."""
    if len(sampler.names) > 1:
        return ""
    transform = sampler.transform
    if transform is None:
        return "no GARTransform"
    policy = transform.policy
    if policy.learn_ops or policy.learn_magnitudes:
        return ""
    return "its GARTransform's policy is frozen (learn_ops=False, learn_magnitudes=False)"


def _rerouted(module: nn.Module) -> bool:
    """Whether this call of ``module`` runs another method in its ``forward``'s place: under a
    strategy that wraps the model (DDP), Lightning calls the LightningModule through the
    wrapper with ``training_step``'s arguments, its ``forward`` replaced for that call by a
    function of its ``_ForwardRedirection``. That outer call is not the model's forward (the
    one ``training_step`` makes inside it is), so GAR lets it pass."""
    forward = module.__dict__.get("forward")
    return forward is not None and "_ForwardRedirection" in getattr(forward, "__qualname__", "")


def _versions(params: Mapping[str, nn.Parameter]) -> int:
    """The sum of the parameters' version counters: it grows with every in-place edit of
    one (an optimizer's step), and with nothing else."""
    return sum(p._version for p in params.values())


def _grads(params: Mapping[str, nn.Parameter], present: bool = False) -> Direction:
    """The parameters' ``.grad`` (zeros where there is none; left out with ``present``)."""
    if present:
        return {name: p.grad for name, p in params.items() if p.grad is not None}
    return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in params.items()}
