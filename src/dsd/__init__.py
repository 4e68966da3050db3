"""Dense-Sparse-Dense training: per-tensor magnitude masks, phase recipes, and the paper's pipeline."""

from dsd.masks import Pruner, magnitude_mask, prunable_parameters
from dsd.schedule import Phase, Recipe

__all__ = ["Phase", "Pruner", "Recipe", "magnitude_mask", "prunable_parameters"]
__version__ = "0.1.0"
