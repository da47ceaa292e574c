"""gradaccum: exact gradient accumulation for TensorFlow.

Train with micro-batches of size b, update every n of them, and get the
weights of training with batches of n * b.

    >>> from gradaccum import accumulate
    >>> model = accumulate(model, 4)

Session-based graph code wraps its optimizer instead:

    >>> opt = gradaccum.AccumOptimizer(tf.compat.v1.train.AdamOptimizer(), 4)
"""

from ._version import __version__
from ._facade import accumulate, register_serializables as _register_serializables
from ._graph import AccumOptimizer

__all__ = ["accumulate", "AccumOptimizer", "__version__"]

_register_serializables()
