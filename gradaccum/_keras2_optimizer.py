"""`AccumOptimizer` around a Keras 2 optimizer (tf.keras up to TF 2.15, tf-keras), eager.

Keras 2 has two optimizer families: OptimizerV2 (every Keras 2; under
`keras.optimizers.legacy` from 2.11) and the new `Optimizer` (2.9-2.10 under
`experimental`, the default from 2.11). A wrapper must be an instance of the
wrapped optimizer's family for `Model.compile` to take it, so there is one
class per family, declared the way Keras' own LossScaleOptimizer declares its
two: it does not run the base class's constructor, and it checkpoints as the
optimizer it wraps (TensorFlow's `DelegatingTrackableMixin`), with the window
as one more dependency, "gradaccum". A checkpoint of an AccumOptimizer
therefore restores into the plain optimizer, and the other way round.

This module is imported on TF 2.x only: TF 1.x's Keras optimizers train in
graph mode, where `AccumOptimizer` takes `tf.compat.v1.train` optimizers.
"""

import tensorflow as tf

from . import _compat, _optimizer
from ._window import MEAN

keras = _compat.keras2_module()
_BASES = _compat.keras2_optimizer_bases(keras)
_LOSS_SCALE_OPTIMIZERS = _compat.loss_scale_optimizer_classes(keras)


def wrap(optimizer, n, reduction=MEAN, name=None, skip_nonfinite=False, agc=None, agc_eps=1e-3):
    """The AccumOptimizer of `optimizer`'s family (see `gradaccum.AccumOptimizer`)."""
    for base, cls in zip(_BASES, _CLASSES):
        if isinstance(optimizer, base):
            return cls(optimizer, n, reduction=reduction, name=name, skip_nonfinite=skip_nonfinite,
                       agc=agc, agc_eps=agc_eps)
    raise TypeError("AccumOptimizer: not a Keras 2 optimizer: {!r}".format(optimizer))


class _Keras2Accumulating(_optimizer.AccumulatingOptimizer):
    """The Keras 2 wrapper, whichever optimizer family it belongs to."""

    @_compat.no_automatic_dependency_tracking
    def __init__(self, optimizer, n, reduction=MEAN, name=None, skip_nonfinite=False, agc=None,
                 agc_eps=1e-3):
        # Like LossScaleOptimizer: the base constructor is not run; every
        # piece of optimizer state is the wrapped optimizer's.
        self._optimizer = optimizer
        self._accum_name = name or "AccumOptimizer"
        _compat.delegating_trackable_mixin().__init__(self, optimizer)
        self._init_accumulation(n, reduction, skip_nonfinite, agc, agc_eps)
        self._accum_refuse_skipping_with_loss_scaling(isinstance(optimizer, _LOSS_SCALE_OPTIMIZERS))
        _compat.track(self, self._accum_window.state, "gradaccum")

    @property
    def inner_optimizer(self):
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def name(self):
        return self._accum_name

    @property
    def iterations(self):
        """The wrapped optimizer's step counter: it counts updates, not micro-batches."""
        return self._optimizer.iterations

    @iterations.setter
    def iterations(self, variable):
        self._optimizer.iterations = variable

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._optimizer.learning_rate = value

    lr = learning_rate

    @_compat.not_converted
    def apply_gradients(self, grads_and_vars, batch_size=None, **kwargs):
        _refuse_graph_mode()
        return super(_Keras2Accumulating, self).apply_gradients(grads_and_vars, batch_size, **kwargs)

    apply_gradients.__doc__ = _optimizer.AccumulatingOptimizer.apply_gradients.__doc__

    @_compat.not_converted
    def minimize(self, loss, var_list, grad_loss=None, name=None, tape=None, batch_size=None):
        """Computes one micro-batch's gradients and adds them (see `apply_gradients`).

        Keras 2's `Model.train_step` calls this, so a model compiled with an
        AccumOptimizer accumulates. `loss` may be a tensor computed under
        `tape`, or a callable (then `var_list` may be one too).
        """
        grads_and_vars = self.compute_gradients(loss, var_list, tape=tape, grad_loss=grad_loss)
        return self.apply_gradients(grads_and_vars, batch_size=batch_size)

    @_compat.not_converted
    def compute_gradients(self, loss, var_list, tape=None, grad_loss=None):
        """One micro-batch's (gradient, variable) pairs; under a LossScaleOptimizer, unscaled."""
        tape = tape if tape is not None else tf.GradientTape()
        if callable(loss):
            with tape:
                if not callable(var_list):
                    tape.watch(var_list)
                loss = loss()
        if callable(var_list):
            var_list = var_list()
        var_list = tf.nest.flatten(var_list)
        scaling = isinstance(self._optimizer, _LOSS_SCALE_OPTIMIZERS)
        if scaling:
            with tape:
                loss = self.get_scaled_loss(loss)
        grads = tape.gradient(loss, var_list, grad_loss)
        if scaling:
            grads = self.get_unscaled_gradients(grads)
        return list(zip(grads, var_list))

    @_compat.not_converted
    def get_scaled_loss(self, loss):
        """A micro-batch's loss scaled for mixed precision: by the loss scale / n.

        Only when the wrapped optimizer is a LossScaleOptimizer, as Keras
        documents for custom loops: scale the loss with this, unscale the
        gradients with `get_unscaled_gradients`, and pass them to
        `apply_gradients`. The window is then checked for overflow once.
        """
        inner = self._loss_scale_optimizer("get_scaled_loss")
        if callable(loss):
            return lambda: self._accum_window.scale_loss(loss(), inner.get_scaled_loss)
        return self._accum_window.scale_loss(loss, inner.get_scaled_loss)

    @_compat.not_converted
    def get_unscaled_gradients(self, grads):
        """Gradients of a loss scaled by `get_scaled_loss`, unscaled (times n / the loss scale)."""
        inner = self._loss_scale_optimizer("get_unscaled_gradients")
        pairs = self._accum_window.unscale([(grad, None) for grad in grads],
                                           unscale_fn=inner.get_unscaled_gradients)
        return [grad for grad, _ in pairs]

    def _loss_scale_optimizer(self, caller):
        if not isinstance(self._optimizer, _LOSS_SCALE_OPTIMIZERS):
            raise ValueError(
                "AccumOptimizer.{}: only for a wrapped LossScaleOptimizer (mixed precision). "
                "Received: an AccumOptimizer around {}".format(caller, type(self._optimizer).__name__))
        return self._optimizer

    def get_updates(self, loss, params):
        _refuse_graph_mode()
        raise NotImplementedError("AccumOptimizer: get_updates is graph-mode Keras")

    def _accum_apply(self, mean):
        return self._optimizer.apply_gradients(mean)

    @property
    def _is_wrapped_by_loss_scale_optimizer(self):
        return False

    @_is_wrapped_by_loss_scale_optimizer.setter
    def _is_wrapped_by_loss_scale_optimizer(self, value):
        # Keras 2's LossScaleOptimizer marks the optimizer it wraps with this
        # attribute, in its constructor: refuse there, before any training.
        if value:
            self._accum_refuse_outer_loss_scaling()

    def get_config(self):
        config = {"optimizer": keras.optimizers.serialize(self._optimizer), "name": self._accum_name}
        config.update(self._accum_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = _deserialize(config.pop("optimizer"), custom_objects, cls)
        return cls(optimizer, **config)


def _refuse_graph_mode():
    if not _compat.executing_eagerly():
        raise NotImplementedError(
            "AccumOptimizer: a Keras 2 optimizer is wrapped for eager execution and "
            "tf.function. In graph mode (eager execution disabled) wrap a "
            "tf.compat.v1.train optimizer, or use gradaccum.accumulate(model, n). "
            "Received: a call with eager execution disabled")


class _V2Family(object):
    """The OptimizerV2 surface, delegated as LossScaleOptimizer delegates it."""

    def variables(self):
        return self._optimizer.variables()

    @property
    def weights(self):
        return self._optimizer.weights

    def get_weights(self):
        return self._optimizer.get_weights()

    def set_weights(self, weights):
        return self._optimizer.set_weights(weights)

    def get_slot_names(self):
        return self._optimizer.get_slot_names()

    def get_slot(self, var, slot_name):
        return self._optimizer.get_slot(var, slot_name)

    def add_slot(self, var, slot_name, initializer="zeros"):
        return self._optimizer.add_slot(var, slot_name, initializer)

    # Keras and checkpoint restoration call these on the optimizer they hold.
    def _create_all_weights(self, var_list):
        return self._optimizer._create_all_weights(var_list)

    def _restore_slot_variable(self, slot_name, variable, slot_variable):
        return self._optimizer._restore_slot_variable(slot_name, variable, slot_variable)

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable):
        return self._optimizer._create_or_restore_slot_variable(slot_variable_position, slot_name, variable)


class _NewFamily(object):
    """The surface of Keras >= 2.9's new optimizer, delegated as LossScaleOptimizerV3 delegates it."""

    @property
    def variables(self):
        return self._optimizer.variables

    def build(self, var_list):
        return self._optimizer.build(var_list)

    def finalize_variable_values(self, var_list):
        # Keras' fit calls it at its end: EMA swaps the averages in.
        return self._optimizer.finalize_variable_values(var_list)


def _deserialize(config, custom_objects, cls):
    # Keras >= 2.11 builds new optimizers from configs unless told otherwise.
    legacy = cls is _CLASSES[0] and len(_BASES) > 1
    try:
        return keras.optimizers.deserialize(config, custom_objects=custom_objects,
                                            use_legacy_optimizer=legacy)
    except TypeError:  # Keras before 2.11 has no use_legacy_optimizer
        return keras.optimizers.deserialize(config, custom_objects=custom_objects)


def _declare(family, base, name):
    cls = type(name, (_Keras2Accumulating, family, _compat.delegating_trackable_mixin(), base), {
        "__module__": __name__,
        "__doc__": "gradaccum.AccumOptimizer around a Keras 2 {} (see gradaccum.AccumOptimizer).".format(
            base.__name__),
    })
    register = getattr(keras.utils, "register_keras_serializable", None)
    return register(package="gradaccum")(cls) if register is not None else cls


_CLASSES = [_declare(_V2Family, _BASES[0], "AccumOptimizerV2")]
if len(_BASES) > 1:
    _CLASSES.append(_declare(_NewFamily, _BASES[1], "AccumOptimizer"))
