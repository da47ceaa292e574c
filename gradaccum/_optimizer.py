"""The TF2 optimizer wrapper, as far as it is the same on Keras 2 and Keras 3.

`gradaccum.AccumOptimizer(optimizer, n)` on a Keras optimizer returns the
wrapper of that optimizer's Keras (`_keras2_optimizer`, `_keras3_optimizer`),
which each declare their class from the mixin here and the optimizer base
class of their Keras, as Keras' own LossScaleOptimizer wraps an optimizer:

- each `apply_gradients` call adds one micro-batch to the window; the call
  that completes a window applies the window's mean with the wrapped
  optimizer, inside `tf.cond`, so that the wrapped optimizer's iterations,
  slots, learning-rate schedule, clipping, weight decay and EMA move once per
  update, on the accumulated gradient;
- `iterations` and `learning_rate` are the wrapped optimizer's, so
  `iterations` counts updates, and Keras callbacks that set the learning rate
  set the wrapped one's;
- the window's variables are tracked as the wrapper's checkpoint dependency
  "gradaccum", so `tf.train.Checkpoint(optimizer=opt)` saves and restores an
  open window; `model.get_weights()` never contains them. A `.keras` file
  (Keras' `saving_lib`, Keras >= 2.13 and Keras 3) saves them too, as the
  wrapper's own variables; the wrapped optimizer saves its own as the
  wrapper's child `inner_optimizer`.

The arithmetic is `Window`'s; the Keras-specific parts are the route's hooks:
`inner_optimizer` (the wrapped optimizer), `_accum_loss_scaling()`,
`_accum_unscale(pairs)` and `_accum_apply(mean)`.
"""

import numbers

import numpy as np
import tensorflow as tf

from ._compat import not_converted
from ._window import Window


class AccumulatingOptimizer(object):
    """What the Keras 2 and Keras 3 optimizer wrappers share."""

    def _init_accumulation(self, n, reduction, skip_nonfinite, agc=None, agc_eps=1e-3):
        self._accum_n = n
        # (Its owner never announces epochs: a custom loop's, or Keras' fit's,
        # windows run on across epochs.)
        self._accum_window = Window(n, reduction, skip_nonfinite, agc=agc, agc_eps=agc_eps,
                                    epochs=False)
        # Made with n = 1, apply_gradients is the wrapped optimizer's, as
        # `accumulate(model, 1)` is Keras' own step: through the window, a
        # custom loop on the benchmark's MLP ran at 0.87 of plain training's
        # speed (the window writes each gradient and forms its mean). A
        # window holds nothing then, so there is none to grow (see the n
        # setter), skip or clip. A route whose loss scaling the window's path
        # owns (`_accum_loss_scaling`: the route set its wrapped optimizer
        # already) keeps the window.
        self._accum_direct = (n == 1 and not skip_nonfinite and agc is None
                              and not self._accum_loss_scaling())

    @property
    def n(self):
        """Micro-batches per real update; settable between steps (see `accumulate`'s n)."""
        return self._accum_n

    @n.setter
    def n(self, value):
        from ._facade import check_n  # (the facade imports this module's routes)
        value = check_n(value, "AccumOptimizer.n")
        if value != self._accum_n and self._accum_direct:
            raise ValueError(
                "AccumOptimizer.n: this optimizer was made with n=1, so its apply_gradients is the "
                "wrapped optimizer's, with no window to grow. Make it with the largest n you will "
                "use, e.g. AccumOptimizer(optimizer, {}), and set n=1 from there. Received: "
                "n={}".format(value, value))
        self._accum_n = value
        for variable, new in self._accum_window.n_values(value):
            variable.assign(new)

    @property
    def skip_nonfinite(self):
        """Whether a window with a non-finite gradient is skipped (see `skipped`)."""
        return self._accum_window.skip_nonfinite

    @property
    def skipped(self):
        """Windows skipped for a non-finite gradient (with `skip_nonfinite=True`): a variable."""
        self._accum_window.build()
        return self._accum_window.skipped

    @not_converted
    def apply_gradients(self, grads_and_vars, batch_size=None, **kwargs):
        """Adds one micro-batch's gradients; the call that completes a window applies their mean.

        Args:
            grads_and_vars: (gradient, variable) pairs of one micro-batch.
            batch_size: Optional, the micro-batch's number of samples (an int
                or a scalar tensor). Given, micro-batches count by their size,
                so a short one weighs what it holds, as inside the big batch.
                Omitted, they count equally, which is exact when they are
                equal. Under a `tf.distribute` strategy, give the global
                micro-batch size (the size your loss is averaged over).
            **kwargs: Keras' own options of `apply_gradients` (name, gradient
                aggregation), accepted and left to the update.

        Returns:
            A boolean tensor: whether this call applied an update.
        """
        grads_and_vars = list(grads_and_vars)
        if not any(grad is not None for grad, _ in grads_and_vars):
            raise ValueError(
                "AccumOptimizer.apply_gradients: no gradients provided for any variable. "
                "Received: {}".format([getattr(var, "name", var) for _, var in grads_and_vars]))
        weight = _check_batch_size(batch_size)
        if self._accum_direct:
            with tf.control_dependencies([weight]):
                applied = self._accum_apply(grads_and_vars)
            with tf.control_dependencies([applied] if isinstance(applied, (tf.Operation, tf.Tensor)) else []):
                return tf.constant(True)
        if self._accum_loss_scaling():
            grads_and_vars = self._accum_unscale(grads_and_vars)
        with tf.init_scope():
            self.iterations  # the wrapped optimizer's, created outside the update branch
        return self._accum_window.accumulate(grads_and_vars, weight, self._accum_apply)

    @not_converted
    def flush(self, var_list=None):
        """Applies the open window now, if it holds a micro-batch: the end of your data.

        Does nothing when the window is empty. Call it eagerly, in a
        `tf.function`, in `strategy.run`, or in a strategy's scope.

        Args:
            var_list: Only after restoring a checkpoint taken mid-window, and
                before any `apply_gradients` in this process: the variables the
                window accumulates for (else gradaccum learns them from the
                first gradients).

        Returns:
            A boolean tensor: whether an update was applied.
        """
        window = self._accum_window
        if var_list is not None:
            window.build(list(var_list))
        if (window.built and not window.variables and tf.executing_eagerly()
                and int(window.count.numpy()) > 0):
            raise ValueError(
                "AccumOptimizer.flush: the window holds micro-batches restored from a "
                "checkpoint, but no gradients were given in this process, so the window's "
                "variables are unknown. Call flush(var_list=model.trainable_variables). "
                "Received: var_list=None")
        return window.flush(self._accum_apply)

    # Keras' saving_lib (`.keras` files, `save_weights`) saves each object's
    # own variables, then visits its children, `inner_optimizer` among them.
    # A wrapper's own variables are the window's, by name ("/" would make
    # HDF5 groups: "|" stands for it).

    def save_own_variables(self, store):
        """Saves the open window, so that a model saved mid-window resumes it."""
        for name, value in self._accum_window.values().items():
            store[name.replace("/", "|")] = value

    def load_own_variables(self, store):
        """Restores the window that `save_own_variables` saved."""
        # (Copied: Keras 2's store gives HDF5 datasets, unreadable once the
        # file is closed, and a sum is assigned only when it is made.)
        self._accum_window.restore(
            {key.replace("|", "/"): np.array(store[key]) for key in store.keys()})

    def _accum_refuse_skipping_with_loss_scaling(self, loss_scaling):
        """Raises if `skip_nonfinite` is set around a LossScaleOptimizer (route's constructor calls it)."""
        if self.skip_nonfinite and loss_scaling:
            raise ValueError(refusal_of_skipping_with_loss_scaling("AccumOptimizer", "the wrapped"))

    def _accum_refuse_outer_loss_scaling(self):
        """Raises: a LossScaleOptimizer is wrapping this AccumOptimizer (route's hook calls it)."""
        raise ValueError(
            "AccumOptimizer: a LossScaleOptimizer around an AccumOptimizer would check and "
            "skip each micro-batch on its own, not the window. Wrap the other way round: "
            "AccumOptimizer(LossScaleOptimizer(optimizer), n) in a custom loop, or use "
            "gradaccum.accumulate(model, n) for model.fit under a mixed_float16 policy (Keras "
            "wraps the compiled optimizer in a LossScaleOptimizer itself). Received: "
            "LossScaleOptimizer(AccumOptimizer(n={}))".format(self._accum_n))

    def _accum_loss_scaling(self):
        """Whether the wrapped optimizer is a LossScaleOptimizer (route hook)."""
        return False

    def _accum_config(self):
        return {"n": self._accum_n, "reduction": self._accum_window.reduction,
                "skip_nonfinite": self.skip_nonfinite, "agc": self._accum_window.agc,
                "agc_eps": self._accum_window.agc_eps}


def refusal_of_skipping_with_loss_scaling(caller, whose):
    """The message refusing skip_nonfinite=True with a LossScaleOptimizer."""
    return (
        "{}: skip_nonfinite=True is for float32 training; {} optimizer is a LossScaleOptimizer "
        "(mixed precision), which skips a window with non-finite gradients itself and lowers its "
        "loss scale, which skipping it first would never do. Leave skip_nonfinite=False. "
        "Received: skip_nonfinite=True with a LossScaleOptimizer".format(caller, whose))


def refuse_own_accumulation(optimizer, caller, advice):
    """Raises if `optimizer` (or the one a LossScaleOptimizer wraps) accumulates itself.

    Keras 3's `gradient_accumulation_steps`: with gradaccum's window the
    windows would multiply, and Keras' option moves learning-rate schedules on
    every micro-batch.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    if steps:
        raise ValueError(
            "{}: the optimizer accumulates gradients itself (gradient_accumulation_steps={}), "
            "and gradaccum accumulates already: the windows would multiply. {} Received: "
            "optimizer={}(gradient_accumulation_steps={})".format(
                caller, steps, advice, type(optimizer).__name__, steps))


def _check_batch_size(batch_size):
    """A micro-batch's weight, as a float32 tensor."""
    if batch_size is None:
        return tf.constant(1.0)
    if not tf.is_tensor(batch_size):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
            raise ValueError(
                "AccumOptimizer.apply_gradients: batch_size must be None, an integer >= 1 or a "
                "scalar tensor: the micro-batch's number of samples. Received: batch_size={!r}"
                .format(batch_size))
        return tf.constant(float(batch_size))
    if batch_size.shape.rank not in (None, 0):
        raise ValueError(
            "AccumOptimizer.apply_gradients: batch_size must be a scalar. Received: a tensor "
            "of shape {}".format(batch_size.shape))
    # A tensor is checked when it runs; 0 is allowed: a replica that got no
    # samples adds nothing. The check's data are strings and int32 only: TF
    # guards an Assert that holds a float (as assert_non_negative's does)
    # with a tf.cond (measured alone, on the benchmark's MLP: the wrapper's
    # micro-step cost over the bare window's fell from 0.073 to 0.021 ms).
    # An int32 size (tf.shape's, the usual one) is shown as it is, which
    # spares a string conversion every micro-step; others as a string.
    weight = tf.cast(batch_size, tf.float32)
    shown = batch_size if batch_size.dtype == tf.int32 else tf.strings.as_string(weight, shortest=True)
    with tf.control_dependencies([tf.debugging.Assert(weight >= 0.0, [
            "AccumOptimizer.apply_gradients: batch_size must be >= 0, a number of samples. "
            "Received: batch_size", shown])]):
        return tf.identity(weight)
