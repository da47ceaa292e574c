"""`AccumOptimizer` around a Keras 3 optimizer (TensorFlow backend).

Declared as Keras 3 declares its LossScaleOptimizer: a Keras optimizer that
holds the wrapped one (`inner_optimizer`), passes `iterations` and
`learning_rate` through to it, and calls its `apply` only on real steps. So
`model.compile(optimizer=AccumOptimizer(...))` takes it, and Keras' own
`train_step` (or a model's own) accumulates through it.
"""

import sys

import tensorflow as tf

from . import _compat, _optimizer
from ._window import MEAN, multiplied

keras = _compat.keras3_module()
_INNER_FACTOR = "the wrapped optimizer's"


def wrap(optimizer, n, reduction=MEAN, name=None, skip_nonfinite=False, agc=None, agc_eps=1e-3):
    """The AccumOptimizer of a Keras 3 optimizer (see `gradaccum.AccumOptimizer`)."""
    _optimizer.refuse_own_accumulation(
        optimizer, "AccumOptimizer", "Create the optimizer without gradient_accumulation_steps.")
    return AccumOptimizer(optimizer, n, reduction=reduction, name=name, skip_nonfinite=skip_nonfinite,
                          agc=agc, agc_eps=agc_eps)


@keras.saving.register_keras_serializable(package="gradaccum")
class AccumOptimizer(_optimizer.AccumulatingOptimizer, keras.optimizers.Optimizer):
    """gradaccum.AccumOptimizer around a Keras 3 optimizer (see gradaccum.AccumOptimizer)."""

    def __init__(self, inner_optimizer, n, reduction=MEAN, name=None, skip_nonfinite=False, agc=None,
                 agc_eps=1e-3, **kwargs):
        super(AccumOptimizer, self).__init__(learning_rate=0.0, name=name or "AccumOptimizer", **kwargs)
        self.inner_optimizer = inner_optimizer
        self._init_accumulation(n, reduction, skip_nonfinite, agc, agc_eps)
        self._accum_refuse_skipping_with_loss_scaling(self._accum_loss_scaling())
        self._gradaccum = self._accum_window.state  # a checkpoint dependency
        self._accum_scaled_loss = False

    def build(self, var_list):
        # Keras 3 before 3.7: a LossScaleOptimizer sets nothing on the
        # optimizer it wraps (see loss_scale_factor) and first calls it here,
        # from its own build, before any update.
        caller = sys._getframe(1).f_locals.get("self")
        if isinstance(caller, keras.optimizers.LossScaleOptimizer) and caller.inner_optimizer is self:
            self._accum_refuse_outer_loss_scaling()
        self.inner_optimizer.build(var_list)
        super(AccumOptimizer, self).build(var_list)

    @property
    def variables(self):
        """The wrapped optimizer's variables (the window's are in `tf.train.Checkpoint`)."""
        return self.inner_optimizer.variables

    @property
    def iterations(self):
        """The wrapped optimizer's step counter: it counts updates, not micro-batches."""
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if not hasattr(self, "inner_optimizer"):  # the base constructor's own, ignored
            return
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def loss_scale_factor(self):
        # The wrapped optimizer's factor applies (in its apply). Not None:
        # Keras' AutoTrackable skips assigning a value that `is` the current
        # one, and a LossScaleOptimizer assigns None (see the setter).
        return _INNER_FACTOR

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # The base constructor sets it (ignored: the wrapped optimizer's
        # applies); later, only a LossScaleOptimizer wrapping this one does,
        # in its constructor: refuse there, before any training.
        if hasattr(self, "_accum_window"):
            self._accum_refuse_outer_loss_scaling()

    @_compat.not_converted
    def apply(self, grads, trainable_variables=None):
        """Adds one micro-batch (Keras 3's spelling of `apply_gradients`)."""
        if trainable_variables is None:
            raise ValueError(
                "AccumOptimizer.apply: pass trainable_variables with the gradients. "
                "Received: trainable_variables=None")
        return self.apply_gradients(zip(grads, trainable_variables))

    @_compat.not_converted
    def apply_gradients(self, grads_and_vars, batch_size=None):
        grads_and_vars = list(grads_and_vars)
        if not self.built:
            with tf.init_scope():
                self.build([var for _, var in grads_and_vars])
        return super(AccumOptimizer, self).apply_gradients(grads_and_vars, batch_size)

    apply_gradients.__doc__ = _optimizer.AccumulatingOptimizer.apply_gradients.__doc__

    @_compat.not_converted
    def scale_loss(self, loss):
        """The loss to differentiate: scaled by the loss scale / n under a LossScaleOptimizer.

        Keras' `train_step` calls it; in a custom loop under mixed precision,
        differentiate `opt.scale_loss(loss)` and pass the gradients as they
        are to `apply_gradients`, as Keras documents for its LossScaleOptimizer.
        """
        inner = self.inner_optimizer
        if not self._accum_loss_scaling():
            return inner.scale_loss(loss)
        if not inner.built:
            raise ValueError(
                "AccumOptimizer.scale_loss: build the optimizer first, "
                "opt.build(model.trainable_variables), so that the loss scale exists. "
                "Received: an unbuilt AccumOptimizer around a LossScaleOptimizer")
        self._accum_scaled_loss = True
        return self._accum_window.scale_loss(loss, inner.scale_loss)

    def minimize(self, *args, **kwargs):
        raise TypeError(
            "AccumOptimizer.minimize: Keras 3 optimizers have no minimize(loss, var_list); "
            "compute the gradients with tf.GradientTape and call opt.apply_gradients(zip("
            "grads, variables)). Received: minimize({})".format(
                ", ".join([type(arg).__name__ for arg in args] + sorted(kwargs))))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("AccumOptimizer: stateless_apply is for the JAX backend")

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def _accum_loss_scaling(self):
        return isinstance(self.inner_optimizer, keras.optimizers.LossScaleOptimizer)

    def _accum_unscale(self, grads_and_vars):
        if not self._accum_scaled_loss:
            raise ValueError(
                "AccumOptimizer.apply_gradients: the wrapped LossScaleOptimizer expects "
                "gradients of opt.scale_loss(loss), and scale_loss was not called. Received: "
                "gradients of an unscaled loss")
        return self._accum_window.unscale(grads_and_vars, self.inner_optimizer.dynamic_scale)

    def _accum_apply(self, mean):
        if self._accum_loss_scaling():
            # The LossScaleOptimizer unscales what it is given.
            mean = multiplied(mean, self.inner_optimizer.dynamic_scale)
        return self.inner_optimizer.apply_gradients(mean)

    def get_config(self):
        config = {"inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                  "name": self.name}
        config.update(self._accum_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)
