"""The graph-mode route: TF 1.x, and TF 2.x under `tf.compat.v1` with eager disabled.

In a graph there is no `train_step` to override: the training op is built
once and run once per micro-batch. So accumulation lives in that op:

    add this micro-batch to the window
    -> if the window is due: apply its mean with the inner optimizer, empty it

The inner optimizer is called only inside the `tf.cond` branch, so its slots,
step counter and learning-rate schedule move once per real update. Its slots
are still created outside the branch (optimizers create them under
`init_scope`), so `global_variables_initializer` and `Saver` see ordinary
variables.

Two users of that op live here: `AccumOptimizer`, which wraps any
`tf.compat.v1.train.Optimizer` for Session scripts and Estimators, and
`keras_updates`, which Keras 2 models use in graph mode (see `_keras2`).
"""

import tensorflow as tf

from ._compat import executing_eagerly
from ._window import Window

_V1Optimizer = tf.compat.v1.train.Optimizer


def wrap(optimizer, n, micro_batch_size=None, name="AccumOptimizer", skip_nonfinite=False, agc=None,
         agc_eps=1e-3):
    """The AccumOptimizer of a `tf.compat.v1.train` optimizer (see `gradaccum.AccumOptimizer`)."""
    return AccumOptimizer(optimizer, n, micro_batch_size=micro_batch_size, name=name,
                          skip_nonfinite=skip_nonfinite, agc=agc, agc_eps=agc_eps)


class AccumOptimizer(_V1Optimizer):
    """Wraps a `tf.compat.v1.train.Optimizer`; applies it once every `n` runs.

    Each run of the training op takes one micro-batch; every `n`-th run
    applies the mean of the `n` micro-batch gradients with the wrapped
    optimizer, so the variables equal those of training with `n`-times bigger
    batches. `global_step` (when given to `minimize` or `apply_gradients`),
    slots, Adam's beta powers and decaying learning rates move only then.

    The accumulators are ordinary non-trainable global variables: a
    `tf.compat.v1.train.Saver` saves them, and a script restored from a
    checkpoint taken mid-window continues that window.

    Args:
        optimizer: The `tf.compat.v1.train.Optimizer` that applies the updates.
        n: Micro-batches per update, an integer >= 1.
        micro_batch_size: Optional scalar tensor, the number of samples in the
            current micro-batch (e.g. `tf.shape(x)[0]`). Given, each micro-batch
            counts by its size, so a short last micro-batch is weighted as it
            would be inside the big batch. Omitted, all micro-batches count
            equally, which is exact when they are all the same size.
        name: Name prefix of the ops this optimizer creates.
        skip_nonfinite: True skips a window whose gradients hold an inf or a
            nan, whole, and counts it in `skipped`.
        agc, agc_eps: Adaptive gradient clipping of the window's mean (see
            `gradaccum.accumulate`).

    Example:
        >>> opt = gradaccum.AccumOptimizer(tf.compat.v1.train.AdamOptimizer(1e-3), 4)
        >>> train_op = opt.minimize(loss, global_step=global_step)
        >>> for x_batch, y_batch in micro_batches:
        ...     sess.run(train_op, {x: x_batch, y: y_batch})
    """

    def __init__(self, optimizer, n, micro_batch_size=None, name="AccumOptimizer", skip_nonfinite=False,
                 agc=None, agc_eps=1e-3):
        # gradaccum.AccumOptimizer checked the arguments.
        super(AccumOptimizer, self).__init__(use_locking=False, name=name)
        self._optimizer = optimizer
        self._n = n
        self._skip_nonfinite = skip_nonfinite
        self._agc = {"agc": agc, "agc_eps": agc_eps}
        self._micro_batch_size = micro_batch_size
        self._windows = []

    @property
    def n(self):
        """Micro-batches per real update."""
        return self._n

    @n.setter
    def n(self, value):
        raise NotImplementedError(
            "AccumOptimizer.n: around a tf.compat.v1.train optimizer, n is built into the "
            "training op; make a new AccumOptimizer, or set n on accumulate(model, n)'s model "
            "or on an AccumOptimizer around a Keras optimizer (TF 2, eager). Received: n={!r}"
            .format(value))

    @property
    def skip_nonfinite(self):
        """Whether a window with a non-finite gradient is skipped (see `skipped`)."""
        return self._skip_nonfinite

    @property
    def skipped(self):
        """Windows skipped for a non-finite gradient: a tensor of the current graph (0 before any)."""
        counters = [tf.identity(window.skipped) for window in self._current_windows()]
        return tf.add_n(counters) if counters else tf.constant(0, tf.int64)

    def _current_windows(self):
        graph = tf.compat.v1.get_default_graph()
        return [window for window in self._windows if window.built and window.skipped.graph is graph]

    @property
    def optimizer(self):
        """The wrapped optimizer."""
        return self._optimizer

    def compute_gradients(self, *args, **kwargs):
        """The wrapped optimizer's gradients for one micro-batch."""
        return self._optimizer.compute_gradients(*args, **kwargs)

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        """Adds one micro-batch's gradients; every `n`-th run applies their mean.

        Returns:
            The training op. Its run applies the wrapped optimizer (and
            increments `global_step`) only when it completes a window.
        """
        if executing_eagerly():
            raise RuntimeError(
                "AccumOptimizer: builds its accumulation into a graph, run once per "
                "micro-batch by a Session; it is not for eager execution or tf.function. "
                "In eager mode wrap a Keras optimizer (gradaccum.AccumOptimizer("
                "keras.optimizers.Adam(), n)) or use gradaccum.accumulate(model, n). "
                "Received: a call with eager execution enabled")
        if tf.distribute.has_strategy():
            raise NotImplementedError(
                "AccumOptimizer: tf.distribute strategies are not supported in graph mode "
                "(the update would all-reduce inside a graph-mode tf.cond, which deadlocked "
                "the Session when tried). Use eager mode (TF 2) with gradaccum.accumulate"
                "(model, n) under the strategy. Received: strategy {}".format(
                    type(tf.distribute.get_strategy()).__name__))
        grads_and_vars = tuple(grads_and_vars)
        if not any(grad is not None for grad, _ in grads_and_vars):
            raise ValueError(
                "AccumOptimizer: no gradients provided for any variable. Received: {}".format(
                    [var.name for _, var in grads_and_vars]))
        window = Window(self._n, skip_nonfinite=self._skip_nonfinite, epochs=False, **self._agc)
        self._windows.append(window)
        if self._micro_batch_size is None:
            batch_size = tf.constant(1.0)
        else:
            batch_size = self._micro_batch_size

        def apply_fn(mean):
            return self._optimizer.apply_gradients(mean, global_step=global_step, name=name)

        with tf.name_scope(self._name):
            applied = window.accumulate(grads_and_vars, batch_size, apply_fn)
        return tf.group(applied, name=name)

    def get_slot(self, var, name):
        return self._optimizer.get_slot(var, name)

    def get_slot_names(self):
        return self._optimizer.get_slot_names()

    def variables(self):
        """The wrapped optimizer's variables, then the accumulators, of the current graph."""
        own = []
        for window in self._current_windows():
            own += window.all_variables()
        return self._optimizer.variables() + own

    # Called by the base class's minimize() only through apply_gradients,
    # which is overridden; these keep the abstract interface honest.
    def _apply_dense(self, grad, var):
        raise NotImplementedError("AccumOptimizer applies through apply_gradients")

    _apply_sparse = _resource_apply_dense = _resource_apply_sparse = _apply_dense


def keras_updates(optimizer, window, loss, params, batch_size, adds=()):
    """The accumulating training op for a Keras 2 model in graph mode.

    Stands in for `optimizer.get_updates(loss, params)`, which Keras calls
    once when it builds the training function.

    `adds` are the model's other ops for the window (its BatchNormalization
    statistics), run before the update.

    Returns:
        (train_update, flush): the op to run every micro-batch, and the op
        that applies a partial window (for epochs of unknown length).
    """
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, AccumOptimizer):
        raise ValueError(
            "accumulate: the model's optimizer is an AccumOptimizer (n={}), and the model "
            "accumulates already (n={}): the windows would multiply. Compile with the "
            "optimizer it wraps. Received: optimizer={!r}".format(inner.n, window.n, inner))
    if isinstance(inner, _V1Optimizer):  # Keras' TFOptimizer around a tf.compat.v1 optimizer
        grads_and_vars = inner.compute_gradients(loss, params)

        def apply_fn(mean):
            return inner.apply_gradients(mean, global_step=optimizer.iterations)
    elif hasattr(optimizer, "get_gradients") and hasattr(optimizer, "apply_gradients"):
        _refuse_clipping(optimizer)
        grads_and_vars = list(zip(optimizer.get_gradients(loss, params), params))

        def apply_fn(mean):
            return optimizer.apply_gradients(mean)
    else:
        raise TypeError(
            "accumulate: in graph mode the optimizer must be a Keras optimizer with "
            "get_gradients (on TF >= 2.11: tf.keras.optimizers.legacy.*, or a string such "
            "as 'adam') or a tf.compat.v1.train.Optimizer. Received: optimizer={!r}".format(optimizer))
    with tf.init_scope():
        optimizer.iterations  # created outside the update branch
    train_update = window.accumulate(grads_and_vars, batch_size, apply_fn, adds)
    return train_update, window.flush(apply_fn)


def _refuse_clipping(optimizer):
    # Keras clips in get_gradients, i.e. per micro-batch, not the accumulated
    # gradient as the big batch would: say so rather than train differently.
    clipping = {name: getattr(optimizer, name, None) for name in ("clipnorm", "clipvalue", "global_clipnorm")}
    clipping = {name: value for name, value in clipping.items() if value is not None}
    if clipping:
        raise NotImplementedError(
            "accumulate: gradient clipping is not supported in graph mode (Keras would clip "
            "each micro-batch, not the accumulated gradient). Clip in eager mode, or remove "
            "it. Received: optimizer {} with {}".format(type(optimizer).__name__, clipping))
