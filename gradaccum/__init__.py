"""gradaccum: exact gradient accumulation for TensorFlow.

Train with micro-batches of size b, update every n of them, and get the
weights of training with batches of n * b.

    >>> from gradaccum import accumulate
    >>> model = accumulate(model, 4)

Custom training loops, models with their own `train_step`, and Session-based
graph code wrap their optimizer instead:

    >>> opt = gradaccum.AccumOptimizer(keras.optimizers.Adam(), 4)
    >>> opt = gradaccum.AccumOptimizer(tf.compat.v1.train.AdamOptimizer(), 4)
"""

from ._version import __version__
from ._facade import AccumOptimizer, AccumulationScheduler, accumulate
from ._facade import register_serializables as _register_serializables

__all__ = ["accumulate", "AccumOptimizer", "AccumulationScheduler", "__version__"]

_register_serializables()
