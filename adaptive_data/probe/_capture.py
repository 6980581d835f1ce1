"""The capture path of the covered layers, shared by a probe call (:class:`GhostRun`) and a
training forward (``GAR``): hooks that number each call of a covered module, snapshot the RNG
where a rule may replay the forward, match the call to the layout and hand over its outputs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _summands
from ._calls import Accumulator, Call, needs_rng
from ._layout import CallLayout, Layout
from ._model_state import RngSnapshot
from ._outputs import guard, output_actions
from ._plan import Entry
from ._summands import Loose
from .rules import FALLBACK_RULE

__all__: list[str] = []


def register_call_hooks(
    entries: Sequence[Entry], before: Callable[..., Any], after: Callable[..., Any]
) -> list[Any]:
    """On every covered module: ``before(entry, module, args)`` as a forward pre-hook (to
    snapshot the RNG for rules that replay the forward) and ``after(entry, module, args,
    kwargs, output)`` as a forward hook. Returns the handles."""
    handles: list[Any] = []
    for entry in entries:
        handles.append(entry.module.register_forward_pre_hook(functools.partial(before, entry)))
        handles.append(
            entry.module.register_forward_hook(functools.partial(after, entry), with_kwargs=True)
        )
    return handles


def check_outputs(
    entry: Entry, call_layout: CallLayout, leaves: Sequence[Any], n: int, who: str
) -> None:
    """Raise if an output leaf that requires grad does not hold the batch of ``n`` where the
    layout runs found it."""
    for i, leaf in enumerate(leaves):
        if not (isinstance(leaf, Tensor) and leaf.requires_grad):
            continue
        dim = call_layout.outputs[i] if i < len(call_layout.outputs) else None
        if dim is not None and dim >= 0 and (leaf.dim() <= dim or leaf.shape[dim] != n):
            raise ValueError(
                f"{who} cannot attribute module {entry.name!r} ({type(entry.module).__name__}) "
                f"to examples: its output of shape {list(leaf.shape)} does not hold the batch "
                f"(size {n}) in dim {dim}, where the runs on 2 and 3 examples found it"
            )


def open_call(
    entry: Entry,
    layout: Layout,
    index: int,
    args: tuple,
    kwargs: dict,
    output: Any,
    rng: RngSnapshot | None,
    n: int,
    who: str,
    exclude: Collection[str] = (),
) -> tuple[Call | None, list[Any], Any]:
    """The :class:`Call` for the ``index``-th call of ``entry`` (None if it accounts for no
    parameter in this layout, those named in ``exclude`` left out) and its output leaves with
    their spec; raises if the call does not match the layout."""
    leaves, spec = tree_flatten(output)
    params = {k: g for k, g in layout.params(entry).items() if g not in exclude}
    if not params:
        return None, leaves, spec
    calls = layout.calls.get(id(entry), [])
    if index >= len(calls):
        raise RuntimeError(
            f"module {entry.name!r} ran {index + 1} times in this forward, but "
            f"{len(calls)} times in the runs that found where the batch is; {who} needs a "
            "forward whose calls do not depend on the batch"
        )
    call_layout = calls[index]
    check_outputs(entry, call_layout, leaves, n, who)
    return Call(entry, params, call_layout, layout.shared, args, kwargs, rng), leaves, spec


class Pause:
    """While active, no forward is a training batch: the hooks of a front door and of its
    capture keep nothing (a rule replaying a forward, a reference pass, the layout runs, the
    finite difference's forwards). Nests; one per front door, shared with its parts."""

    def __init__(self) -> None:
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class CallCapture:
    """The capture path of the covered layers, shared by :class:`GhostRun` (a probe call)
    and :class:`GAR` (a training forward): the hooks that number each call of a covered
    module in the forward, snapshot the RNG before the calls whose rule may replay them,
    match each call to the layout (:func:`open_call`) and hand every output leaf that holds
    the batch to the owner's ``on_output(call, i, dim, n, register)`` (``register(fn)`` makes
    ``fn(gradient)`` run when the leaf's gradient is known). A leaf that does not hold the
    batch gets a hook that raises if a gradient reaches it (it cannot be attributed).

    The owner says which forwards are captured: :meth:`start` with the layout and batch size
    before one, :meth:`stop` after; while ``pause`` is active (a rule replays a forward, a
    reference pass runs) nothing is captured. ``on_call(call)`` returns the object
    the call's outputs belong to (or ``None`` to skip it). With ``anchor=True`` each watched
    leaf is replaced by ``leaf + anchor`` (a 0-dim zero leaf that requires grad) before it is
    handed over: see :class:`GhostRun`.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        who: str,
        devices: list[int],
        on_call: Callable[[Call], Any],
        on_output: Callable[[Any, int, int, int, Callable[[Any], Any]], None],
        wants_rng: Callable[[Entry], bool],
        detach: bool = False,
        anchor: bool = False,
        pause: Pause | None = None,
        params: frozenset[int] = frozenset(),
    ) -> None:
        self.who = who
        self.devices = devices
        self.on_call = on_call
        self.on_output = on_output
        self.wants_rng = wants_rng
        self.detach = detach  # keep detached inputs (held past the backward)
        self.anchors: dict[tuple[torch.dtype, torch.device], Tensor] | None = {} if anchor else None
        self.layout: Layout | None = None
        self.n = 0
        self.pause = Pause() if pause is None else pause
        self.params = params  # ids of the trainable parameters (the root's outputs' analysis)
        self._actions: dict[int, tuple[CallLayout, dict[int, Any]]] = {}  # by call layout
        self._counts: dict[int, int] = {}
        self._rng: dict[int, RngSnapshot] = {}
        # Calls whose output holds no batch, waiting for a sum that adds it to one that does
        # (:mod:`_summands`); the entries found so (by id), their parameters' global names;
        # and their outputs, which a probe's backward must reach.
        self._loose: list[Loose] = []
        self._resolved: dict[int, Collection[str]] = {}
        self.sinks: list[Tensor] = []
        self.handles: list[Any] = register_call_hooks(entries, self._before, self._after)

    def start(self, layout: Layout, n: int) -> None:
        """Capture the calls of the forward that follows, of a batch of ``n`` examples."""
        self.layout, self.n, self._counts = layout, n, {}
        self._loose, self._resolved, self.sinks = [], {}, []

    def stop(self) -> None:
        """Capture nothing until the next :meth:`start`."""
        self.layout = None
        self._rng.clear()
        self._loose = []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.stop()

    def _root_actions(self, call: Call, leaves: list[Any]) -> dict[int, Any]:
        """What to do with each output of the model's root (:func:`output_actions`: keep, skip
        one computed from kept outputs alone, or raise if a gradient reaches one that cannot
        be attributed), found once per layout."""
        cached = self._actions.get(id(call.layout))
        if cached is None or cached[0] is not call.layout:
            found = output_actions(leaves, call.layout.outputs, self.params)
            cached = self._actions[id(call.layout)] = (call.layout, found)
        return cached[1]

    def _anchor(self, like: Tensor) -> Tensor:
        anchors = cast(dict, self.anchors)
        key = (like.dtype, like.device)
        if key not in anchors:
            anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return anchors[key]

    def _before(self, entry: Entry, module: nn.Module, args: tuple) -> None:
        if self.layout is not None and not self.pause.active and self.wants_rng(entry):
            self._rng[id(entry)] = RngSnapshot(self.devices)

    def _after(
        self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> Any:
        layout = self.layout
        if layout is None or self.pause.active:
            return None
        index = self._counts.get(id(entry), 0)
        self._counts[id(entry)] = index + 1
        if self._loose:  # an input of this call may be the sum of a loose call's output
            calls = layout.calls.get(id(entry), [])
            if index < len(calls):
                self._resolve(layout, tree_flatten((args, kwargs))[0], calls[index])
        if self.detach:  # detached views share the version counters: in-place edits are caught
            args, kwargs = detach_tree(args), detach_tree(kwargs)
        rng = self._rng.pop(id(entry), None)
        exclude = {g for names in self._resolved.values() for g in names} if entry.root else ()
        call, leaves, spec = open_call(
            entry, layout, index, args, kwargs, output, rng, self.n, self.who, exclude
        )
        if call is None:
            self._note_loose(entry, layout, args, output, rng)
            return None
        owner = self.on_call(call)
        if owner is None:
            return None
        actions = self._root_actions(call, leaves) if entry.root else {}
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad):
                continue
            action = actions.get(i, "keep")
            if action != "keep":  # the root's: skipped, or a hook that raises
                guard(self.who, f"the model ({type(entry.module).__name__})", leaf, i, action)
                continue
            if self.anchors is not None:
                leaves[i] = leaf = leaf + self._anchor(leaf)
            dim = cast(int, call.layout.outputs[i])
            self.on_output(owner, i, dim, self.n, leaf.register_hook)
        return spec.unflatten(leaves) if self.anchors is not None else None

    def _note_loose(
        self, entry: Entry, layout: Layout, args: tuple, output: Any, rng: RngSnapshot | None
    ) -> None:
        """Keep a call the layout covers at the root (its output holds no batch) as a loose
        one, if a sum could take it: a module with a rule of its own, called once in the
        forward, one tensor out."""
        if (
            entry.root
            or entry.rule is FALLBACK_RULE
            or not any(e is entry for e in layout.rehomed)
            or len(layout.calls.get(id(entry), [])) != 1
            or not (isinstance(output, Tensor) and output.requires_grad)
        ):
            return
        self._loose.append(Loose(entry, output, args, rng))

    def _resolve(self, layout: Layout, inputs: list[Any], call_layout: CallLayout) -> None:
        """Find the loose calls whose output is added into one of ``inputs`` (a covered call's,
        laid out as ``call_layout``): each becomes a call on its inputs broadcast to the sum's
        examples, its share taken from the gradient at the sum, its parameters off the root."""
        for x, dim in zip(inputs, call_layout.inputs, strict=True):
            if not (isinstance(x, Tensor) and x.requires_grad and dim is not None and dim >= 0):
                continue
            for loose in list(self._loose):
                node = _summands.find_sum(loose, x)
                if node is None:
                    continue
                self._loose.remove(loose)
                entry = loose.entry
                found = _summands.broadcast_call(loose, x.shape, dim)
                if found is None or not entry.rule.moves_batch(entry.module, dim, x.dim()):
                    continue  # left to the root
                args, call_layout_b = found
                call = Call(entry, entry.params, call_layout_b, layout.shared, args, {}, loose.rng)
                owner = self.on_call(call)
                if owner is None:
                    continue
                self._resolved[id(entry)] = tuple(entry.params.values())
                self.sinks.append(loose.output)

                def register(fn: Callable[[Any], Any], node: Any = node) -> Any:
                    return node.register_prehook(lambda grads: fn(grads[0]))

                self.on_output(owner, 0, dim, self.n, register)


def detach_tree(tree: Any) -> Any:
    """``tree`` with every tensor detached (views sharing the version counters)."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GhostRun:
    """Hooks for one probe call: capture on forward, accumulate ``r`` as gradients arrive.

    Each covered module's output is replaced by ``output + anchor``, with ``anchor`` a 0-dim
    zero leaf that requires grad, and the gradient hook goes on that new tensor. A backward that
    asks only for the anchors' gradients then runs every covered module's output node (so the
    hooks fire) without computing any weight gradient, and the gradient each hook sees is that of
    the module's output as produced, even if a later op (``ReLU(inplace=True)``) overwrites it.
    """

    def __init__(
        self,
        entries: list[Entry],
        layout: Layout,
        direction: Mapping[str, Tensor],
        n: int,
        devices: list[int],
        device: torch.device,
        norms: bool = False,
        per_module: bool = False,
        params: frozenset[int] = frozenset(),
    ) -> None:
        self.layout = layout
        self.direction = direction
        self.n = n
        self.norms = norms
        self.acc = Accumulator(n, device, norms, per_module)
        self._waiting: list[Call] = []  # calls whose norms wait for all their gradients
        self._capture = CallCapture(
            entries,
            "estimator='ghost'",
            devices,
            on_call=lambda call: call,
            on_output=self._watch,
            wants_rng=lambda entry: needs_rng(entry, norms),
            anchor=True,
            params=params,
        )
        self._capture.start(layout, n)

    @property
    def anchors(self) -> dict[tuple[torch.dtype, torch.device], Tensor]:
        """The anchors the backward asks gradients of (one per dtype and device)."""
        return cast(dict, self._capture.anchors)

    @property
    def sinks(self) -> list[Tensor]:
        """The outputs of calls covered from the gradient at a sum they were added into (not
        hooked themselves): the backward must reach them, so that it runs the sums' nodes."""
        return self._capture.sinks

    def close(self) -> None:
        self._capture.close()

    def _watch(self, call: Call, i: int, dim: int, n: int, register: Callable[[Any], Any]) -> None:
        call.expected += 1
        if self.norms and call.expected == 1:
            self._waiting.append(call)
        register(functools.partial(self._on_grad, call, i))

    def _on_grad(self, call: Call, i: int, grad: Tensor) -> None:
        with self._capture.pause():  # a replayed forward must not be captured again
            if self.norms:  # the norms need every output's gradient at once
                call.grads[i] = grad
                if len(call.grads) == call.expected:
                    self._waiting.remove(call)
                    call.contribute(self.acc, call.grads, self.direction, True)
                    call.release()
            else:
                call.contribute(self.acc, {i: grad}, self.direction, False)
                call.expected -= 1
                if call.expected == 0:
                    call.release()

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """After the backward: the calls some of whose outputs got no gradient (unused
        attention weights) contribute with the gradients they got; returns ``(r, sq)``."""
        with self._capture.pause():
            for call in self._waiting:
                call.contribute(self.acc, call.grads, self.direction, self.norms)
                call.release()
            self._waiting = []
        return self.acc.result()
