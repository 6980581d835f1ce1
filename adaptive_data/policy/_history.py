"""A table of floats, one row per policy update, bounded, cheap to put in a state dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._check import check_int
from . import _fields as f

__all__: list[str] = []


class History:
    """Rows of ``width`` floats, one per update, kept exactly (float64); at most ``limit``.

    With ``limit=None`` every update's row is kept. With a ``limit`` the table holds the rows
    of updates ``every, 2 * every, 3 * every, ...`` (counted from 1): ``every`` starts at 1
    and doubles each time the table would exceed ``limit`` rows, dropping every other row, so
    the rows stay evenly spread over the whole run and their memory is at most
    ``limit * width * 8`` bytes. Invariant: ``len(self) == seen // every``.

    A ``StatefulDataLoader`` with workers asks the sampler for its state at every batch, so
    :meth:`state` must not copy every row: full blocks of ``block`` rows are frozen into
    float64 tensors that are never modified, and every state shares them; only the last,
    partial block is converted per call. Cost of :meth:`state`: O(rows / block + block).
    """

    def __init__(self, width: int, block: int = 256, limit: int | None = None) -> None:
        check_int("limit", limit, minimum=2, none_ok=True, what="None or an int >= 2")
        self.width = width
        self.block = block
        self.limit = limit
        self.every = 1  # the rows are those of updates every, 2 * every, ...
        self.seen = 0  # updates offered to append()
        self._frozen: list[Tensor] = []  # [block, width] each, never modified
        self._tail: list[list[float]] = []

    def __len__(self) -> int:
        return len(self._frozen) * self.block + len(self._tail)

    def append(self, row: Sequence[float]) -> None:
        """The row of the next update: kept if its number is a multiple of :attr:`every`."""
        if len(row) != self.width:
            raise ValueError(f"a history row should hold {self.width} numbers, got {len(row)}")
        self.seen += 1
        if self.seen % self.every:
            return
        self._tail.append([float(v) for v in row])
        if len(self._tail) == self.block:
            self._frozen.append(torch.tensor(self._tail, dtype=torch.float64))
            self._tail = []
        if self.limit is not None and len(self) > self.limit:
            self._set(self._table()[1::2])  # the rows of updates 2 * every, 4 * every, ...
            self.every *= 2

    def _table(self) -> Tensor:
        tail = torch.tensor(self._tail, dtype=torch.float64).reshape(len(self._tail), self.width)
        return torch.cat([*self._frozen, tail])

    def _set(self, rows: Tensor) -> None:
        full = len(rows) // self.block * self.block
        self._frozen = [b.clone() for b in rows[:full].split(self.block)] if full else []
        self._tail = rows[full:].tolist()

    def rows(self) -> list[list[float]]:
        """Every row kept, oldest first, as lists of Python floats."""
        out: list[list[float]] = []
        for t in self._frozen:
            out += t.tolist()
        return out + [list(r) for r in self._tail]

    def state(self) -> list[Tensor]:
        """The rows as float64 tensors ``[n_i, width]`` (the frozen blocks themselves, then the
        last partial block); :meth:`load` takes it back (with :attr:`every`, :attr:`seen`)."""
        tail = torch.tensor(self._tail, dtype=torch.float64).reshape(len(self._tail), self.width)
        return [*self._frozen, tail]

    def parse(
        self, state: Any, path: str, seen: int, every: int | None, counted: str = "the state"
    ) -> tuple[Tensor, int]:
        """Check a :meth:`state` of a table that saw ``seen`` updates and kept every
        ``every``-th (``None``: a state saved before the bound, which kept every row): the
        rows ``[n, width]`` and ``every`` that :meth:`load` sets, thinned to :attr:`limit`.
        Changes nothing; raises ``ValueError`` naming ``path`` (and ``counted``, where
        ``seen`` comes from)."""
        what = f"a list of float64 Tensors [n, {self.width}]"
        if not isinstance(state, list | tuple) or not all(
            isinstance(t, Tensor)
            and t.dtype == torch.float64
            and t.dim() == 2
            and t.shape[1] == self.width
            for t in state
        ):
            raise f.refuse(path, what, state)
        rows = torch.cat(list(state)) if state else torch.empty(0, self.width, dtype=torch.float64)
        legacy = every is None
        every = 1 if every is None else every
        if len(rows) != seen // every:
            raise ValueError(
                f"{path} holds {len(rows)} rows, but {counted} counts {seen} updates, one row "
                f"kept every {every}: it should hold {seen // every}"
            )
        if legacy:  # saved without a bound: thinned as the bound would have thinned it
            while self.limit is not None and len(rows) > self.limit:
                rows, every = rows[1::2], every * 2
        elif self.limit is not None and len(rows) > self.limit:
            raise ValueError(
                f"{path} holds {len(rows)} rows, more than this history's limit={self.limit}"
            )
        return rows, every

    def load(self, state: Any, seen: int | None = None, every: int | None = None) -> None:
        """Replace the rows with those of a :meth:`state` (of ``seen`` updates, every
        ``every``-th kept; ``seen=None``: one row per update)."""
        if seen is None:
            seen = (
                sum(len(t) for t in state)
                if isinstance(state, list | tuple)
                and all(isinstance(t, Tensor) and t.dim() == 2 for t in state)
                else 0
            )
        rows, every = self.parse(state, "history", seen, every)
        self._set(rows)
        self.every, self.seen = every, seen
