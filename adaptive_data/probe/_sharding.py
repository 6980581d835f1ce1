"""Models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): what the rewards need of
parameters that are ``DTensor`` shards, each rank holding a slice of every weight.

Only the forward-only estimator (``"fd"``) runs on them, and never on a gathered parameter or
gradient:

* the reference gradient is the ``.grad`` that FSDP's own backward leaves on each shard
  (reduce-scattered, so already the ranks' average), with the training ``.grad`` set aside
  and put back;
* ``D`` is preconditioned shard by shard, from the optimizer's sharded state;
* the two forwards at ``theta +- eps D`` move each rank's shards in place (FSDP's all-gather
  brings the moved weights to every rank) and put them back bit for bit, and each rank's
  per-example scalars stay on the rank whose examples they are;
* norms, finiteness and the reference cosine are sums of each rank's local shards, in one
  all-reduce each.

Every collective here is called by every rank the same number of times: ranks that have no
rewards to compute at a step still join them (:meth:`Shards.agree`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._distributed import Group, current_group

__all__: list[str] = []


def _dtensor() -> type | None:
    """``torch.distributed.tensor.DTensor`` if a program imported it (FSDP2 does), else None:
    a model can only hold DTensors if it is imported, and looking it up imports nothing."""
    kind = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return kind if isinstance(kind, type) else None


def is_shard(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or state of a sharded model)."""
    kind = _dtensor()
    return kind is not None and isinstance(t, kind)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: its local shard for a ``DTensor``, else ``t`` itself."""
    return t.to_local() if is_shard(t) else t  # type: ignore[attr-defined]


def row_offset(t: Any) -> int:
    """The global index of the first row (dim 0) of this rank's shard of the DTensor ``t``
    (``torch.chunk``'s split, as FSDP2's ``Shard(0)`` makes it, on each mesh dimension that
    shards dim 0)."""
    mesh, coordinate = t.device_mesh, t.device_mesh.get_coordinate()
    offset, size = 0, t.shape[0]
    for i, placement in enumerate(t.placements):
        if placement.is_shard(0):
            chunk = -(-size // mesh.size(i))  # ceil
            offset += coordinate[i] * chunk
            size = max(0, min(chunk, size - coordinate[i] * chunk))
    return offset


def _copies(t: Any) -> int:
    """How many ranks hold each shard of the DTensor ``t``: the sizes of the mesh dimensions
    it is replicated on (HSDP's), multiplied."""
    copies = 1
    for i, placement in enumerate(t.placements):
        if placement.is_replicate():
            copies *= t.device_mesh.size(i)
    return copies


def _fsdp2_type() -> type | None:
    kind = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return kind if isinstance(kind, type) else None


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (``FSDPModule``)."""
    kind = _fsdp2_type()
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def check_sharding(model: nn.Module, estimator: str, who: str) -> bool:
    """Whether ``model`` is sharded by FSDP2 (and ``estimator`` can reward it); raises for
    FSDP1's ``FullyShardedDataParallel`` and DeepSpeed, and for an estimator other than
    ``"fd"`` on an FSDP2 model (they need each parameter whole on a rank)."""
    found = None
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if isinstance(fsdp1, type) and any(isinstance(m, fsdp1) for m in model.modules()):
        found = "FSDP1 (FullyShardedDataParallel)"
    deepspeed = sys.modules.get("deepspeed")  # only a program that uses DeepSpeed imports it
    if found is None and deepspeed is not None:
        engine = getattr(deepspeed, "DeepSpeedEngine", None)
        if isinstance(engine, type) and isinstance(model, engine):
            found = f"DeepSpeed ({type(model).__name__})"
        elif any(hasattr(p, "ds_id") for p in model.parameters()):
            found = "DeepSpeed ZeRO-3 partitioned parameters"
    if found is not None:
        raise TypeError(
            f"model is sharded by {found}, whose flattened parameters {who} cannot read; shard "
            "it with FSDP2 instead (torch.distributed.fsdp.fully_shard) and pass "
            f"estimator='fd', or use DistributedDataParallel"
        )
    fsdp2 = bool(fsdp2_modules(model))
    if not fsdp2 and any(is_shard(p) for p in model.parameters()):
        raise TypeError(
            "model has DTensor parameters outside FSDP2 (tensor parallelism?), whose "
            f"placements {who} does not read; shard it with FSDP2 alone "
            "(torch.distributed.fsdp.fully_shard), or use DistributedDataParallel"
        )
    if fsdp2 and estimator != "fd":
        raise ValueError(
            f"{who}(estimator={estimator!r}) needs each parameter whole on a rank, but the model "
            "is sharded by FSDP2 (fully_shard, DTensor parameters); pass estimator='fd' (and "
            "reward='dot'): its two forwards move each rank's shards in place, so no parameter "
            "or gradient is gathered"
        )
    return fsdp2


class Shards:
    """The sharded side of one model's trainable parameters: which are ``DTensor`` shards
    (the others are replicated on every rank), the FSDP modules to reshard after a forward
    of the rewards, and the collectives over the ranks. Inactive (every method the
    one-process identity) for a model that FSDP2 does not shard.

    Args:
        model: the model (DDP unwrapped).
        params: its trainable parameters.
        group: the ranks' collectives, which raise after their timeout rather than hang
            (default: the process group's, :func:`current_group`).
    """

    def __init__(
        self, model: nn.Module, params: Mapping[str, Tensor], group: Group | None = None
    ) -> None:
        self.modules = fsdp2_modules(model)
        self.sharded = frozenset(name for name, p in params.items() if is_shard(p))
        self.active = bool(self.modules or self.sharded)
        # A shard held by several ranks (HSDP's replicated mesh dimension) counts once in sums.
        self._copies = {name: _copies(p) for name, p in params.items() if is_shard(p)}
        self.group = current_group(None, None) if group is None else group

    # ------------------------------------------------------------------ collectives

    def _sum(self, values: Tensor, what: str) -> Tensor:
        """``values`` (float64) summed over the ranks: one all-reduce of the project's
        collectives, an error naming ``what`` after their timeout instead of a hang."""
        return torch.tensor(self.group.all_reduce_sum(values.tolist(), what), dtype=torch.float64)

    def agree(self, ready: bool) -> bool:
        """Whether every rank is ``ready`` (one all-reduce): the forwards that follow are
        collectives, so either every rank runs them or none does."""
        if not self.active:
            return ready
        not_ready = torch.tensor([0.0 if ready else 1.0], dtype=torch.float64)
        return float(self._sum(not_ready, "GAR's rewards on the shards")[0]) == 0.0

    def sums(self, parts: Mapping[str, Tensor]) -> Tensor:
        """``[k]`` float64 global sums of ``parts[name]`` (a ``[k]`` vector per parameter,
        computed from its local part): summed over the ranks for sharded parameters, once for
        replicated ones. One all-reduce."""
        names = list(parts)
        if not names:
            return torch.zeros(0, dtype=torch.float64)
        rows = torch.stack(
            [parts[n].detach().double().cpu() / self._copies.get(n, 1) for n in names]
        )
        mine = torch.tensor([n in self.sharded for n in names], dtype=torch.bool)
        if not self.active or not bool(mine.any()):
            return rows.sum(0)
        total = self._sum(rows[mine].sum(0), "the sums over the shards")
        return total + rows[~mine].sum(0)

    def first_nonfinite(self, tensors: Mapping[str, Tensor]) -> str | None:
        """:func:`first_nonfinite` over every rank's shards (the same answer on every rank)."""
        if not tensors:
            return None
        sums = torch.stack([local(t).sum().double().cpu() for t in tensors.values()])
        flags = (~torch.isfinite(sums)).double()
        if self.active:
            flags = self._sum(flags, "the finiteness check of the shards")
        if not bool(flags.any()):
            return None
        # A NaN or inf in a sum: check each tensor elementwise (a float64 overflow of a
        # finite tensor's sum is not a NaN or inf in it).
        bad = torch.tensor(
            [0.0 if bool(torch.isfinite(local(t)).all()) else 1.0 for t in tensors.values()],
            dtype=torch.float64,
        )
        if self.active:
            bad = self._sum(bad, "the finiteness check of the shards")
        for name, flag in zip(tensors, bad.tolist(), strict=True):
            if flag:
                return name
        return None

    def dots(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, float, float]:
        """``<a, b>``, ``||a||^2`` and ``||b||^2`` over every rank's shards (one all-reduce)."""
        parts = {}
        for name, t in a.items():
            x, o = local(t).flatten(), local(b[name]).flatten()
            parts[name] = torch.stack([torch.dot(x, o), torch.dot(x, x), torch.dot(o, o)])
        dot, na, nb = self.sums(parts).tolist()
        return dot, na, nb

    def reshard(self) -> None:
        """Free every FSDP module's gathered weights: the root keeps its own after a forward
        that no backward follows, and a rewards forward must not leave moved weights there
        for the next training forward."""
        for module in self.modules:
            module.reshard()  # type: ignore[operator]

    # ------------------------------------------------------------------ the rewards' passes

    def mean_loss_gradient(
        self, forward: Callable[[], Tensor], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """The gradient of ``forward()`` (a scalar loss) as FSDP's backward leaves it on each
        shard (the ranks' average), the training ``.grad`` set aside and put back."""
        held = {name: p.grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
        try:
            with torch.enable_grad():
                forward().backward()
            return {
                name: torch.zeros_like(p) if p.grad is None else p.grad.detach()
                for name, p in params.items()
            }
        finally:
            for name, p in params.items():
                p.grad = held[name]
            self.reshard()

    @contextlib.contextmanager
    def moved(
        self, params: Sequence[Tensor], d: Sequence[Tensor], steps: Sequence[float]
    ) -> Iterator[Callable[[int], None]]:
        """Move the parameters' local shards to ``theta + steps[k] D`` in place (``move(k)``,
        ``theta`` as it was on entry), and back to ``theta`` bit for bit on exit; FSDP's
        gathered weights are freed after each move, so the next forward gathers the moved
        ones. The shards are copied once (a rank's share of the parameters)."""
        shards = [local(p).detach() for p in params]
        deltas = [local(t).detach() for t in d]
        saved = [s.clone() for s in shards]

        def move(k: int) -> None:
            with torch.no_grad():
                for s, s0, delta in zip(shards, saved, deltas, strict=True):
                    s.copy_(s0).add_(delta.to(s.dtype), alpha=steps[k])
            self.reshard()

        try:
            yield move
        finally:
            with torch.no_grad():
                for s, s0 in zip(shards, saved, strict=True):
                    s.copy_(s0)
            self.reshard()
