"""The reward engine: per-layer rules, the direction, the estimators, and GradientProbe."""

from ._probe import METHODS, REWARDS, GradientProbe

__all__ = ["METHODS", "REWARDS", "GradientProbe"]
