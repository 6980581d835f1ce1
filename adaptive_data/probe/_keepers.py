"""The estimators' side of a training loop (``GAR``): what is kept of a kept batch while the
user's own forward and backward run, and its rewards once ``D`` is known.

A front door opens a :class:`KeptBatch` at the root forward of a batch it will reward
(:meth:`Keeper.open`); the keeper's hooks then keep what its estimator needs, for the rewarded
rows only where the layers allow: ``ghost`` the covered layers' inputs and output gradients,
``fd`` the model's inputs and the gradients at its outputs. :meth:`Keeper.rewards` turns them
into ``<g_i, D>`` (or the cosine) of each rewarded row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._batch import lead_batch_size
from . import _fd
from ._calls import Accumulator, Call, rows_independent
from ._capture import CallCapture, Pause, check_outputs, detach_tree
from ._direction import Direction, cosine_rewards
from ._layout import Layout, Layouts
from ._model_state import RngSnapshot
from ._outputs import output_actions
from ._plan import Entry, couples_examples
from ._sharding import Shards
from .rules import FALLBACK_RULE

__all__: list[str] = []


@dataclasses.dataclass
class KeptCall:
    """One forward call of a covered module in a kept batch, and its output gradients."""

    call: Call  # inputs, RNG state and the rule's tangents
    grads: dict[int, tuple[Tensor, int]] = dataclasses.field(default_factory=dict)  # leaf ->
    rows: Tensor | None = None  # the rows kept of the inputs and output gradients (None: all)


@dataclasses.dataclass
class KeptBatch:
    """What is kept of one training batch until its rewards are computed."""

    batch: int  # the sampler's batch id
    step: int  # the number of step() calls made before its forward
    n: int | None = None  # batch size, from the first output seen
    rows: Tensor | None = None  # the rows rewarded, sorted (None: all)
    weight: float = 1.0  # the updates its rewards stand for (the budget's stride)
    calls: list[KeptCall] = dataclasses.field(default_factory=list)  # estimator="ghost"
    fd: _fd.Kept | None = None  # estimator="fd": the root's inputs and output gradients
    # The last earlier forward of the same batch before the same step that had its backward
    # (a forward the loop ran again without backpropagating, e.g. for the training accuracy,
    # leaves the rewards to it).
    earlier: KeptBatch | None = None

    def release(self) -> None:
        """Let go of what was kept (this forward's and the earlier ones'): its rewards are
        computed or it is dropped. The gradient hooks on the forward's outputs hold what they
        fill, and the autograd graph, which the loop's ``loss`` keeps alive until its next
        forward, holds the hooks: without this, a batch's inputs and output gradients would
        stay in memory through the next step's forward and reference pass."""
        for out in self.calls:
            out.grads.clear()
            out.call.release()
        self.calls.clear()
        if self.fd is not None:
            self.fd.release()
            self.fd = None
        if self.earlier is not None:
            self.earlier.release()
            self.earlier = None


@dataclasses.dataclass
class SlowCalls:
    """The module calls a keeper rewarded by the generic path, by module name: its type, why,
    how many calls and their seconds."""

    kind: str
    why: str
    calls: int = 0
    seconds: float = 0.0


class Keeper:
    """Hooks on the model for the kept batches of a training loop; see the module docstring.

    Args:
        core: the model (DDP unwrapped).
        params: its trainable parameters.
        entries: the covered modules (the plan).
        pause: the front door's :class:`Pause`; the keeper's own forwards run under it.
        choose_rows: ``(batch id, n) -> sorted rows`` to reward, or ``None`` for all.
        devices: the CUDA devices whose RNG the forwards draw from.
    """

    def __init__(
        self,
        core: nn.Module,
        params: dict[str, nn.Parameter],
        entries: Sequence[Entry],
        pause: Pause,
        choose_rows: Callable[[int, int], Tensor | None],
        devices: list[int],
    ) -> None:
        self.core = core
        self.params = params
        self.entries = list(entries)
        self.pause = pause
        self.choose_rows = choose_rows
        self.devices = devices
        # Where each covered layer holds the batch, found per input signature (two small
        # forwards, once) at the first kept batch.
        self._layouts = Layouts(core, entries, "GAR")
        self.current: KeptBatch | None = None
        self.layout: Layout | None = None
        self.n = 0
        self.handles: list[Any] = []
        self.slow: dict[str, SlowCalls] = {}  # the generic path's calls so far, by module

    def open(self, kept: KeptBatch, args: tuple, kwargs: dict) -> None:
        """The root forward of ``kept`` starts: find the layout, choose the rows, keep."""
        self.n = n = lead_batch_size((args, kwargs), "the model's inputs")
        with self.pause():  # the layout runs are not training batches: keep nothing
            self.layout = self._layouts.get(args, kwargs, n)
        kept.rows = self.choose_rows(kept.batch, n)
        self.current = kept
        self.start()

    def start(self) -> None:
        """Keep the forward that follows (after :meth:`open` set the batch and layout)."""

    def stop(self) -> None:
        """No batch is being kept: the forwards that follow are not captured."""
        self.current = None

    def _note_slow(self, call: Call, seconds: float) -> None:
        entry = call.entry
        name = "<root>" if entry.root else entry.name
        seen = self.slow.get(name)
        if seen is None:
            kind = type(entry.module).__name__
            seen = self.slow[name] = SlowCalls(kind, cast(str, call.slow))
        seen.calls += 1
        seen.seconds += seconds

    def close(self) -> None:
        """Remove the hooks."""
        self.stop()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def backward_seen(self, kept: KeptBatch) -> bool:
        """Whether a backward reached ``kept``'s forward (some of its output gradients are
        kept)."""
        raise NotImplementedError

    def ready(self, kept: KeptBatch) -> bool:
        """Whether ``kept``'s forward holds what its rewards need (:meth:`rewards` returns
        None otherwise)."""
        raise NotImplementedError

    def pick(self, kept: KeptBatch) -> KeptBatch:
        """The forward of ``kept``'s batch to reward: the latest that is :meth:`ready` (a
        forward the loop ran again without backpropagating, e.g. for the training accuracy,
        leaves the rewards to an earlier one), else ``kept`` itself."""
        chosen: KeptBatch | None = kept
        while chosen is not None and not self.ready(chosen):
            chosen = chosen.earlier
        return kept if chosen is None else chosen

    def rewards(self, kept: KeptBatch, d: Direction, cosine: bool) -> Tensor | None:
        """The rewards of ``kept``'s rewarded rows (float32 ``[m]``), or None when its forward
        had no backward."""
        raise NotImplementedError


class GhostKeeper(Keeper):
    """``estimator="ghost"``: the covered layers' inputs and output gradients of the kept rows
    (whole where a layer mixes the examples, cut afterwards)."""

    def __init__(self, *args: Any) -> None:  # Keeper's arguments
        super().__init__(*args)
        self._capture = CallCapture(
            self.entries,
            "GAR",
            self.devices,
            on_call=self._keep,
            on_output=self._watch,
            wants_rng=lambda entry: True,
            detach=True,  # held until step(), past the backward
            pause=self.pause,
            params=frozenset(id(p) for p in self.params.values()),
        )

    def start(self) -> None:
        self._capture.start(cast(Layout, self.layout), self.n)

    def stop(self) -> None:
        super().stop()
        self._capture.stop()

    def close(self) -> None:
        super().close()
        self._capture.close()

    def _keep(self, call: Call) -> KeptCall | None:
        """A covered layer's call in a kept batch: keep it, with only the rewarded rows where
        its examples do not mix."""
        kept = self.current
        if kept is None:
            return None
        out = KeptCall(call)
        if kept.rows is not None and rows_independent(
            call.entry, call.layout, call.args or (), call.kwargs or {}
        ):
            call.select_rows(kept.rows)  # keep the chosen rows only
            out.rows = kept.rows
        kept.calls.append(out)
        return out

    def _watch(
        self, out: KeptCall, i: int, dim: int, n: int, register: Callable[[Any], Any]
    ) -> None:
        """Output ``i`` of a kept call holds the batch of ``n`` in ``dim``: keep its gradient."""
        kept = cast(KeptBatch, self.current)
        if kept.n is None:
            kept.n = n
        register(functools.partial(self._on_grad, out, i, dim))

    @staticmethod
    def _on_grad(out: KeptCall, i: int, dim: int, grad: Tensor) -> None:
        grad = grad.detach()
        if out.rows is not None:
            grad = grad.index_select(dim, out.rows.to(grad.device))
        out.grads[i] = (grad, dim)

    def backward_seen(self, kept: KeptBatch) -> bool:
        return any(c.grads for c in kept.calls)

    def ready(self, kept: KeptBatch) -> bool:
        return kept.n is not None and bool(kept.calls) and all(c.grads for c in kept.calls)

    def rewards(self, kept: KeptBatch, d: Direction, cosine: bool) -> Tensor | None:
        if not self.ready(kept):
            return None  # a forward without a backward: nothing to reward
        r = self._rewards(kept, d, cosine, 1.0)
        if not bool(torch.isfinite(r).all()):
            # A loss scaled far up (a GradScaler's 2^70) or down overflows the squared norms
            # of finite output gradients. Every share is linear in the output gradients:
            # scaled by a power of two (exact), the cosine is the same and the dot is scaled
            # back.
            top = max(
                float(g.detach().abs().amax()) if g.numel() else 0.0
                for c in kept.calls
                for g, _ in c.grads.values()
            )
            if math.isfinite(top) and top > 0:
                scale = 2.0 ** -math.frexp(top)[1]
                r = self._rewards(kept, d, cosine, scale)
                if not cosine:
                    r = r / scale
        return r

    def _rewards(self, kept: KeptBatch, d: Direction, cosine: bool, scale: float) -> Tensor:
        """The rewards from the output gradients multiplied by ``scale`` (a power of two)."""
        n = cast(int, kept.n)  # known: rewards() checked it
        device = next(iter(d.values())).device
        rows = None if kept.rows is None else kept.rows.to(device)
        acc = Accumulator(n if rows is None else len(rows), device, norms=cosine)
        with self.pause(), torch.no_grad():  # forwards replayed by the rules are not batches
            for out in kept.calls:
                grads = {
                    i: grad if scale == 1.0 else grad * scale for i, (grad, _) in out.grads.items()
                }
                start = time.perf_counter()
                if rows is None or out.rows is not None:
                    out.call.contribute(acc, grads, d, cosine)
                else:
                    # A call whose examples mix (batch statistics, a replay): the whole batch,
                    # then the chosen rows.
                    whole = Accumulator(n, device, norms=cosine)
                    out.call.contribute(whole, grads, d, cosine)
                    acc.add_rows(out.call.entry.name, whole, rows)
                if out.call.slow is not None:
                    self._note_slow(out.call, time.perf_counter() - start)
        r, sq = acc.result()
        return cosine_rewards(r, cast(Tensor, sq), d) if cosine else r


class FdKeeper(Keeper):
    """``estimator="fd"``: the model's inputs (the rewarded rows, or the whole batch where the
    rows cannot be forwarded alone), its RNG state if it drew random numbers, and the
    gradients at its outputs; the rewards by :func:`_fd.output_rewards`."""

    def __init__(
        self,
        core: nn.Module,
        params: dict[str, nn.Parameter],
        pause: Pause,
        choose_rows: Callable[[int, int], Tensor | None],
        devices: list[int],
        shards: Shards | None = None,
    ) -> None:
        # The root alone: where its inputs and outputs hold the batch.
        self._root = Entry("<root>", core, FALLBACK_RULE, {}, root=True)
        super().__init__(core, params, [self._root], pause, choose_rows, devices)
        self._param_set = frozenset(id(p) for p in params.values())
        self.shards = Shards(core, params) if shards is None else shards
        self._couples = couples_examples(core)
        # Per layout: what to do with each output leaf (found once per input signature).
        self._actions: dict[int, tuple[Layout, dict[int, Any]]] = {}
        self._rng: RngSnapshot | None = None
        self.handles.append(core.register_forward_hook(self._after, with_kwargs=True))

    def start(self) -> None:
        self._rng = RngSnapshot(self.devices)  # the RNG state the root forward starts from

    def stop(self) -> None:
        super().stop()
        self._rng = None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """After the root forward of a kept batch: keep its inputs, RNG state and hooks for
        its outputs' gradients."""
        if self.pause.active:
            return
        kept, layout, rng = self.current, self.layout, self._rng
        self._rng = None
        if kept is None or layout is None or rng is None:
            return
        (call,) = layout.calls[id(self._root)]
        leaves = tree_flatten(output)[0]
        if len(leaves) != len(call.outputs):
            raise RuntimeError(
                f"the model returned {len(leaves)} output tensors, but {len(call.outputs)} in "
                "the runs that found where the batch is; GAR(estimator='fd') needs a forward "
                "whose outputs do not depend on the batch"
            )
        check_outputs(self._root, call, leaves, self.n, "GAR(estimator='fd')")
        random = _fd.rng_changed(rng)
        rows = kept.rows
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
        fd = _fd.Kept(args, kwargs, whole, rng if random else None, call.outputs)
        fd.versions = versions
        cached = self._actions.get(id(layout))
        if cached is None or cached[0] is not layout:
            cached = (layout, output_actions(leaves, call.outputs, self._param_set))
            self._actions[id(layout)] = cached
        _fd.register(fd, leaves, cached[1], rows)
        for i, action in cached[1].items():
            if action == "keep" and kept.n is None:
                kept.n = leaves[i].shape[cast(int, call.outputs[i])]
        kept.fd = fd

    def backward_seen(self, kept: KeptBatch) -> bool:
        return kept.fd is not None and bool(kept.fd.grads)

    def ready(self, kept: KeptBatch) -> bool:
        return kept.n is not None and kept.fd is not None and bool(kept.fd.grads)

    def rewards(self, kept: KeptBatch, d: Direction, cosine: bool) -> Tensor | None:
        # FSDP2: the difference's forwards are collectives; every rank runs them, or none.
        if not self.shards.agree(self.ready(kept)):
            return None  # a forward without a backward (here or on another rank)
        fd, n = cast(_fd.Kept, kept.fd), cast(int, kept.n)
        with self.pause():  # the difference's forwards are not training batches
            return _fd.output_rewards(self.core, fd, self.params, d, kept.rows, n, self.shards)


# The estimators that read a training loop's own forward and backward, by name: what GAR's
# estimator= takes. (jvp, per_sample and head compute the rewards of a batch they run
# themselves: GradientProbe.)
KEEPERS: dict[str, type[Keeper]] = {"ghost": GhostKeeper, "fd": FdKeeper}
