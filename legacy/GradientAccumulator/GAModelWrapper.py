"""`from GradientAccumulator.GAModelWrapper import GAModelWrapper` (deprecated alias)."""

from gradaccum.migration import GAModelWrapper

__all__ = ["GAModelWrapper"]
