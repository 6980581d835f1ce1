"""The torch.distributed collectives the sampler needs, with errors instead of hangs."""

from __future__ import annotations

import datetime
from typing import Any

import torch

from ._check import check_int

__all__ = ["Group", "current_group"]

# How long a rank waits for the others in one policy update before it gives up and says why.
DEFAULT_TIMEOUT_S = 60.0


class Group:
    """The ranks a sampler synchronises with: ``rank``, ``world_size`` and two collectives.

    ``world_size == 1`` (no process group): every collective is the identity.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s

    @property
    def active(self) -> bool:
        return self.world_size > 1 and _initialized()

    def all_reduce_sum(self, values: list[float], what: str) -> list[float]:
        """Sum ``values`` (float64) over the ranks; raise after ``timeout_s`` rather than hang."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        self._all_reduce(t, what)
        return t.tolist()

    def all_reduce_mean(self, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """The mean of each tensor over the ranks, in one all-reduce; raise after
        ``timeout_s`` rather than hang."""
        if not self.active:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._all_reduce(flat, what)
        flat /= self.world_size
        parts = flat.split([t.numel() for t in tensors])
        return [p.view_as(t) for p, t in zip(parts, tensors, strict=True)]

    def _all_reduce(self, t: torch.Tensor, what: str) -> None:
        import torch.distributed as dist

        work = dist.all_reduce(t, async_op=True)
        failure: Exception | None = None
        try:
            done = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            done, failure = False, e
        if done is False:
            raise RuntimeError(
                f"rank {self.rank}: {what} waited more than {self.timeout_s:g} s for the other "
                f"{self.world_size - 1} rank(s). Every rank must call it the same number of times"
                + ("" if failure is None else f" (the collective failed with: {failure})")
            ) from failure

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every rank unless all ranks hold an equal ``value``."""
        if not self.active:
            return
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(
                f"ranks disagree on {what}: rank 0 has {values[0]!r}, "
                + ", ".join(f"rank {r} has {values[r]!r}" for r in differ)
            )


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_group(rank: int | None, world_size: int | None) -> Group:
    """The process group's rank and size (or the given ones; both or neither)."""
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"pass both rank and world_size or neither, but got rank={rank!r}, "
            f"world_size={world_size!r}"
        )
    if rank is None or world_size is None:
        if _initialized():
            import torch.distributed as dist

            return Group(dist.get_rank(), dist.get_world_size())
        return Group(0, 1)
    if _initialized():
        import torch.distributed as dist

        if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(
                f"rank={rank}, world_size={world_size} disagree with the initialised process "
                f"group (rank {dist.get_rank()} of {dist.get_world_size()}); leave them out"
            )
    for name, v in (("rank", rank), ("world_size", world_size)):
        check_int(name, v)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank should lie in [0, world_size), but got rank={rank}, world_size={world_size}"
        )
    return Group(rank, world_size)
