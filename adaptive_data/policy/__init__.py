"""Learned categorical distributions, which mixtures and augmentation ops are drawn from."""

from ._categorical import CategoricalPolicy, ChoiceStatistics
from ._history import History

__all__ = ["CategoricalPolicy", "ChoiceStatistics", "History"]
