"""Batch identity: which of a GARSampler's batches the training loop holds.

``sampler.track(loader)`` wraps the iterable the loop consumes. Every stack a loop can sit
on (DataLoader workers and their prefetch, torchdata's StatefulDataLoader, accelerate's
prepared loaders, which read one batch ahead) delivers the sampler's batches in the order it
drew them, so the k-th batch the wrapper hands to the loop in one pass is the k-th batch the
sampler yielded in that pass. Nothing below reads a private attribute or a stack frame:
the wrapper counts what it hands out, and it inspects the loader's public ``batch_sampler``
chain once per pass to refuse stacks it cannot match (a batch sampler that wraps this one)
and to account for the ones it can (accelerate's ``SkipBatchSampler``, ``skip_batches``;
``BatchSamplerShard``, whose second sharding is switched off through its public attributes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import Sampler

if TYPE_CHECKING:
    from ._passes import Pass, Passes

__all__ = ["TrackedLoader"]


def _inspect(sampler: Sampler[Any], loader: Any) -> tuple[int, int, int]:
    """``(batches skipped before the first delivery, num_workers, prefetch depth)`` of a
    DataLoader-like ``loader`` over ``sampler``, from public attributes only; raises for
    stacks whose batches cannot be matched to the sampler's. Iterables that are not loaders
    give ``(0, 0, 0)``."""
    skip = int(getattr(loader, "skip_batches", 0) or 0)  # accelerate's skipping loaders
    workers = getattr(loader, "num_workers", 0)
    workers = workers if isinstance(workers, int) else 0
    if workers and getattr(loader, "in_order", True) is False:
        raise ValueError(
            "GARSampler needs the DataLoader to deliver batches in order to attribute rewards, "
            "but got in_order=False"
        )
    prefetch = getattr(loader, "prefetch_factor", None)
    depth = (prefetch if isinstance(prefetch, int) else 2) * workers
    if not hasattr(loader, "batch_sampler"):
        return skip, workers, depth
    node = loader.batch_sampler
    if node is None:  # a DataLoader that batches by itself
        raise ValueError(
            "the tracked loader does not draw its batches from this GARSampler (its "
            "batch_sampler is None); build it as DataLoader(sampler.dataset, batch_sampler=sampler)"
        )
    for _ in range(16):
        if node is sampler:
            return skip, workers, depth
        inner = getattr(node, "batch_sampler", None)
        name = type(node).__name__
        if inner is None:
            raise ValueError(
                f"the tracked loader draws its batches from a {name}, not from this GARSampler; "
                "build it as DataLoader(sampler.dataset, batch_sampler=sampler)"
            )
        if name == "SkipBatchSampler" and hasattr(node, "skip_batches"):
            skip += int(node.skip_batches)
        elif name == "BatchSamplerShard" and hasattr(node, "num_processes"):
            # accelerate shards a batch sampler across processes; the GARSampler already
            # draws per rank, so a second sharding would drop W - 1 of every W batches.
            if node.num_processes != 1:
                node.num_processes, node.process_index = 1, 0
        else:
            raise ValueError(
                f"a {name} wraps this GARSampler inside the tracked loader; its batches cannot be "
                "matched to the ones the sampler drew. Pass the GARSampler itself as the "
                "DataLoader's batch_sampler"
            )
        node = inner
    raise ValueError("the tracked loader's batch_sampler chain is too deep to inspect")


class TrackedLoader:
    """What :meth:`GARSampler.track` returns: the loop's iterable, counting its deliveries.

    Iterating it iterates the wrapped object and tells the sampler each time a batch reaches
    the loop, so ``sampler.update(r)``, ``sampler.last_batch``, ``sampler.state_dict()`` and
    :class:`GAR` know which batch the loop holds. Everything else (``len``, ``state_dict``,
    ``set_epoch``, attributes read or written) is the wrapped object's; ``len`` after the
    same inspection as a pass (so that accelerate's per-process sharding is already off). See
    docs/howto-mixture.md, "Which batch the loop holds".
    """

    def __init__(self, sampler: Sampler[Any], iterable: Iterable[Any], passes: Passes) -> None:
        if not hasattr(iterable, "__iter__"):
            raise TypeError(
                f"track() needs the iterable the training loop consumes (a DataLoader or what "
                f"wraps it), but got {type(iterable).__name__}"
            )
        if isinstance(iterable, TrackedLoader):
            raise TypeError("this iterable is already tracked; track the loader once")
        self.sampler = sampler
        self.iterable = iterable
        self._passes = passes

    def __iter__(self) -> Iterator[Any]:
        skip, workers, depth = _inspect(self.sampler, self.iterable)
        p = self._passes.open_pass(skip, workers, depth)
        return _TrackedIterator(self._passes, p, iter(self.iterable))

    def __len__(self) -> int:
        # A Trainer sizes its epochs from len() before it iterates: accelerate's second
        # sharding must be switched off (and a stack that cannot be matched refused) first.
        _inspect(self.sampler, self.iterable)
        return len(self.iterable)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("sampler", "iterable", "_passes"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.iterable, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Writes go where reads come from: a trainer that sets ``worker_init_fn`` on the
        # loader it was given (Lightning's seed_everything(workers=True)) sets the DataLoader's.
        if name in ("sampler", "iterable", "_passes"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.iterable, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.iterable!r})"


class _TrackedIterator:
    __slots__ = ("_inner", "_pass", "_passes")

    def __init__(self, passes: Passes, p: Pass, inner: Iterator[Any]) -> None:
        self._passes, self._pass, self._inner = passes, p, inner

    def __iter__(self) -> _TrackedIterator:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._inner)
        except StopIteration:
            self._pass.ended = True
            raise
        self._passes.deliver(self._pass)
        return batch
