"""gradaccum: exact gradient accumulation for TensorFlow.

Train with micro-batches of size b, update every n of them, and get the
weights of training with batches of n * b.

    >>> from gradaccum import accumulate
    >>> model = accumulate(model, 4)
"""

from ._version import __version__
from ._facade import accumulate, register_serializables as _register_serializables

__all__ = ["accumulate", "__version__"]

_register_serializables()
