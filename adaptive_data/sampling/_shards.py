"""ShardOrder: where a GARSampler stands in each source, on this rank.

Each map-style source is read in a shuffled order, a new one every round (pass over the
source), seeded from ``(seed, source, round)`` and the same on every rank; rank ``r`` of ``W``
takes positions ``r, r + W, r + 2W, ...`` of it (as ``DistributedSampler`` does), so ranks
never draw the same example in one round. A stream source holds one key, "its next example",
read by the process that fetches the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._mix import mix

__all__ = ["ShardOrder"]


class ShardOrder:
    """The per-source cursors and rounds of one rank: :meth:`take` hands out keys of the
    ``MixtureDataset`` (offsets added); :meth:`position` and :meth:`restore` save and rewind."""

    def __init__(
        self,
        sizes: Sequence[int | None],
        offsets: Sequence[int],
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.sizes = list(sizes)  # None: a stream
        self.offsets = list(offsets)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard_sizes = [0 if n is None else len(range(rank, n, world_size)) for n in self.sizes]
        self.cursors = [0] * len(self.sizes)
        self.rounds = [0] * len(self.sizes)
        self._perms: dict[int, tuple[int, list[int]]] = {}  # source -> (round, its shard)

    def _order(self, s: int) -> list[int]:
        """This rank's shard of source ``s``'s keys in the current round's order."""
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.rounds[s]:
            g = torch.Generator().manual_seed(mix(self.seed, 1, s, self.rounds[s]))
            perm = torch.randperm(self.sizes[s], generator=g) + self.offsets[s]  # type: ignore[arg-type]
            cached = (self.rounds[s], perm[self.rank :: self.world_size].tolist())
            self._perms[s] = cached
        return cached[1]

    def take(self, s: int, n: int) -> list[int]:
        """The next ``n`` keys of source ``s`` (a new round's order when this one is used up);
        a stream's ``n`` slots all hold its one key."""
        if self.sizes[s] is None:
            return [self.offsets[s]] * n
        c, size = self.cursors[s], self.shard_sizes[s]
        if c + n < size:  # the common case: one slice
            self.cursors[s] = c + n
            return self._order(s)[c : c + n]
        out: list[int] = []
        while n:
            c = self.cursors[s]
            m = min(n, size - c)
            out += self._order(s)[c : c + m]
            n -= m
            c += m
            if c == size:
                self.rounds[s] += 1
                c = 0
            self.cursors[s] = c
        return out

    def position(self) -> tuple[list[int], list[int]]:
        """``(cursors, rounds)``: where every source stands (copies)."""
        return list(self.cursors), list(self.rounds)

    def restore(self, cursors: Sequence[int], rounds: Sequence[int]) -> None:
        """Go back (or forward) to a :meth:`position`."""
        if len(cursors) != len(self.sizes) or len(rounds) != len(self.sizes):
            raise ValueError(
                f"a position holds one cursor and one round per source ({len(self.sizes)}), "
                f"but got {len(cursors)} cursors and {len(rounds)} rounds"
            )
        self.cursors = [int(v) for v in cursors]
        self.rounds = [int(v) for v in rounds]
