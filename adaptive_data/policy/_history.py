"""An append-only table of floats, one row per policy update, cheap to put in a state dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


class History:
    """Rows of ``width`` floats, appended one at a time, kept exactly (float64).

    A ``StatefulDataLoader`` with workers asks the sampler for its state at every batch, and a
    long run makes hundreds of thousands of updates, so :meth:`state` must not copy every row:
    full blocks of ``block`` rows are frozen into float64 tensors that are never modified, and
    every state shares them; only the last, partial block is converted per call. Cost of
    :meth:`state`: O(rows / block + block).
    """

    def __init__(self, width: int, block: int = 256) -> None:
        self.width = width
        self.block = block
        self._frozen: list[Tensor] = []  # [block, width] each, never modified
        self._tail: list[list[float]] = []

    def __len__(self) -> int:
        return len(self._frozen) * self.block + len(self._tail)

    def append(self, row: Sequence[float]) -> None:
        if len(row) != self.width:
            raise ValueError(f"a history row should hold {self.width} numbers, got {len(row)}")
        self._tail.append([float(v) for v in row])
        if len(self._tail) == self.block:
            self._frozen.append(torch.tensor(self._tail, dtype=torch.float64))
            self._tail = []

    def rows(self) -> list[list[float]]:
        """Every row, oldest first, as lists of Python floats."""
        out: list[list[float]] = []
        for t in self._frozen:
            out += t.tolist()
        return out + [list(r) for r in self._tail]

    def state(self) -> list[Tensor]:
        """The rows as float64 tensors ``[n_i, width]`` (the frozen blocks themselves, then the
        last partial block); :meth:`load` takes it back."""
        tail = torch.tensor(self._tail, dtype=torch.float64).reshape(len(self._tail), self.width)
        return [*self._frozen, tail]

    def load(self, state: Any) -> None:
        """Replace the rows with those of a :meth:`state`."""
        if not isinstance(state, (list, tuple)) or not all(
            isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == self.width for t in state
        ):
            raise ValueError(
                f"history state should be a list of float64 Tensors [n, {self.width}], but got "
                f"{type(state).__name__}"
            )
        rows = torch.cat([t.to(torch.float64) for t in state]) if state else torch.empty(0)
        rows = rows.reshape(-1, self.width)
        full = len(rows) // self.block * self.block
        self._frozen = [b.clone() for b in rows[:full].split(self.block)] if full else []
        self._tail = rows[full:].tolist()
