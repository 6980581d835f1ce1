"""GAR: the one line in the training loop that pairs each forward with its batch and rewards it."""

from ._gar import GAR

__all__ = ["GAR"]
