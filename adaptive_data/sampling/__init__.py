"""The sampler and its parts: sources behind one key space, drawing, passes, tracking, learning."""

from ._mixture_dataset import MixtureDataset
from ._reference import ReferenceBatches
from ._sampler import GARSampler

__all__ = ["GARSampler", "MixtureDataset", "ReferenceBatches"]
