"""The accumulation arithmetic every route shares, written once.

A *window* is the run of micro-batches between two real updates. Each
micro-batch gradient is added weighted by the micro-batch's size, so the
update applies

    sum_k b_k * g_k / sum_k b_k

which is exactly the gradient of the big batch made of those micro-batches
when the loss is a per-sample mean (Keras' default reduction). A short
micro-batch therefore counts for what it holds, and a short window at the end
of an epoch equals the big batch's short last batch.

The window also knows where the current epoch ends (when the route tells it)
so that a partial window can be applied in the same step as the epoch's last
micro-batch, before validation runs.

Only TensorFlow ops that exist on TF 1.15 and TF 2.x are used; every method
returns its op so that graph-mode callers can order them with control
dependencies (in a `tf.function`, program order is kept automatically).
"""

import tensorflow as tf

_FLOAT_ACCUMULATORS = (tf.float32, tf.float64)

# What a route does with a partial window when an epoch ends: apply it as one
# update weighted by its samples, or carry it into the next epoch.
APPLY = "apply"
CARRY = "carry"
EPOCH_END_CHOICES = (APPLY, CARRY)


class Window(object):
    """Weighted gradient sums and counters between two updates.

    The variables are created lazily, under `tf.init_scope`, so a route may
    call `build` from inside the first trace of its training function. They
    are deliberately not tracked by Keras: they are training machinery, not
    model weights, so `get_weights()` and saved weights do not contain them.
    """

    def __init__(self, n):
        self.n = n
        self._sums = {}  # variable.ref() -> accumulator variable
        self.count = None  # micro-batches in the open window
        self.weight = None  # samples in the open window
        self.epoch_step = None  # micro-batches seen in this epoch
        self.epoch_steps = None  # micro-batches in this epoch, -1 if unknown
        self.variables = []  # variables that received a gradient, in order

    @property
    def built(self):
        return self.count is not None

    def build(self, variables=()):
        """Creates the counters, and one accumulator per variable (idempotent)."""
        with tf.init_scope():
            if self.count is None:
                self.count = _counter("gradaccum/count", tf.int64, 0)
                self.weight = _counter("gradaccum/weight", tf.float32, 0.0)
                self.epoch_step = _counter("gradaccum/epoch_step", tf.int64, 0)
                self.epoch_steps = _counter("gradaccum/epoch_steps", tf.int64, -1)
            for var in variables:
                if var.ref() not in self._sums:
                    dtype = _accumulator_dtype(var)
                    self._sums[var.ref()] = tf.Variable(
                        tf.zeros(var.shape, dtype), trainable=False, name="gradaccum/sum")

    def add(self, grads_and_vars, batch_size):
        """Adds one micro-batch: sum += batch_size * grad, count += 1."""
        grads_and_vars = list(grads_and_vars)
        self.variables = [var for grad, var in grads_and_vars if grad is not None]
        weight = tf.cast(batch_size, tf.float32)
        updates = []
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            total = self._sums[var.ref()]
            scale = tf.cast(weight, total.dtype)
            if isinstance(grad, tf.IndexedSlices):
                # Embedding-style gradients touch few rows; add only those.
                updates.append(total.scatter_add(tf.IndexedSlices(
                    tf.cast(grad.values, total.dtype) * scale, grad.indices, grad.dense_shape)))
            else:
                updates.append(total.assign_add(tf.cast(grad, total.dtype) * scale))
        updates.append(self.weight.assign_add(weight))
        updates.append(self.count.assign_add(1))
        updates.append(self.epoch_step.assign_add(1))
        return tf.group(*updates)

    def due(self):
        """True when the open window must be applied now.

        That is when it holds n micro-batches, or when it holds the last
        micro-batch of an epoch whose length the route announced.
        """
        full = self.count >= self.n
        epoch_over = tf.logical_and(
            self.epoch_steps > 0, self.epoch_step >= self.epoch_steps)
        return tf.logical_and(self.count > 0, tf.logical_or(full, epoch_over))

    def mean(self):
        """(gradient, variable) pairs of the window's size-weighted mean gradient."""
        inverse = 1.0 / self.weight
        return [
            (tf.cast(self._sums[var.ref()] * tf.cast(inverse, self._sums[var.ref()].dtype), var.dtype), var)
            for var in self.variables
        ]

    def reset(self):
        """Empties the window (the epoch position is kept)."""
        updates = [total.assign(tf.zeros_like(total)) for total in self._sums.values()]
        updates.append(self.weight.assign(0.0))
        updates.append(self.count.assign(0))
        return tf.group(*updates)

    def start_epoch(self, steps):
        """Announces an epoch of `steps` micro-batches (None: unknown or not wanted)."""
        self.build()
        self.epoch_step.assign(0)
        self.epoch_steps.assign(-1 if steps is None else int(steps))

    def end_epochs(self):
        """Forgets the epoch length, e.g. before `train_on_batch` calls."""
        if self.built:
            self.epoch_steps.assign(-1)


def _accumulator_dtype(var):
    # Half-precision weights get float32 sums: small micro-batch gradients
    # would otherwise round away when added to a large running sum.
    dtype = var.dtype.base_dtype
    return dtype if dtype in _FLOAT_ACCUMULATORS else tf.float32


def _counter(name, dtype, initial_value):
    return tf.Variable(
        initial_value, dtype=dtype, trainable=False, name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
