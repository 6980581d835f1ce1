"""Seeds derived from integers: every generator of the library is seeded through :func:`mix`."""

from __future__ import annotations

__all__ = ["mix"]

_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 steps); no global RNG involved."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)
