"""GradientAccumulator's import paths, kept working by gradaccum (deprecated).

    from GradientAccumulator.GAModelWrapper import GAModelWrapper

re-exports `gradaccum.migration.GAModelWrapper`, which builds gradaccum's
accumulating model and warns once that `gradaccum.accumulate` is the new
spelling. Nothing is implemented here.
"""

from .GAModelWrapper import GAModelWrapper  # binds the name over the submodule

__all__ = ["GAModelWrapper"]
