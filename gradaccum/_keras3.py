"""The Keras 3 route (TensorFlow backend): a Keras 3 model that accumulates.

Keras 3 is `tf.keras` on TF >= 2.16 unless `TF_USE_LEGACY_KERAS=1` selects
tf-keras. This module is imported only when a Keras 3 model is wrapped or a
Keras 3 process imports gradaccum (see `_compat.keras3_module`).

The training step is Keras' own, so the loss, its scaling, the loss tracker
and the metrics are computed exactly as Keras computes them in this version.
For the one trace of the step, the optimizer's `apply_gradients` is stood in
for by the window: it adds the micro-batch's gradients and applies their mean
with the real `apply_gradients` when the window is due, inside `tf.cond`. On
the other micro-steps the optimizer is not called at all, so its iterations,
slots, learning-rate schedule, gradient clipping, weight decay and EMA act
once per update, on the accumulated gradient, as on the big batch.
What Keras 2 and 3 models share is in `_model`.
"""

from . import _compat, _model

keras = _compat.keras3_module()


def wrap(model, n, epoch_end):
    """The accumulating model for `model` (see `gradaccum.accumulate`)."""
    return _model.wrap(model, n, epoch_end, AccumModel, AccumWrapper, _compile_args)


class _Keras3Training(_model.Accumulating):
    """Keras 3's training step, with the window in place of the optimizer's update."""

    _keras = keras

    def train_step(self, data):
        if self._accum_n == 1:
            return self._with_update_count(super(_Keras3Training, self).train_step(data))
        optimizer = self.optimizer
        _check_optimizer(optimizer)
        window = self._accum_window
        apply_gradients = optimizer.apply_gradients
        x = keras.utils.unpack_x_y_sample_weight(data)[0]
        called = []

        def accumulate_gradients(grads_and_vars):
            called.append(True)
            return window.accumulate(grads_and_vars, _model.batch_size(x), apply_gradients)

        # An instance attribute shadows the method for this trace only; the
        # traced function keeps what it called.
        optimizer.apply_gradients = accumulate_gradients
        try:
            logs = super(_Keras3Training, self).train_step(data)
        finally:
            del optimizer.apply_gradients
        if not called:
            raise RuntimeError(
                "accumulate: Keras {}'s train_step did not call optimizer.apply_gradients, "
                "which gradaccum stands in for to accumulate. Please report this with your "
                "Keras version.".format(keras.__version__))
        return self._with_update_count(logs)


def _check_optimizer(optimizer):
    _model.refuse_loss_scaling(optimizer, keras)
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    if steps:
        raise ValueError(
            "accumulate: the optimizer accumulates gradients itself "
            "(gradient_accumulation_steps={}), and the model accumulates already: the "
            "windows would multiply. Create the optimizer without "
            "gradient_accumulation_steps and pass n to accumulate(model, n) instead. "
            "Received: optimizer={}(gradient_accumulation_steps={})".format(
                steps, type(optimizer).__name__, steps))


class _WindowCallback(_model.WindowCallback, keras.callbacks.Callback):
    pass


_Keras3Training._window_callback = _WindowCallback


@keras.saving.register_keras_serializable(package="gradaccum")
class AccumModel(_model.FunctionalMixin, _Keras3Training, keras.Model):
    """A functional Keras 3 model that applies its optimizer once every `n` batches.

    Built by `gradaccum.accumulate` from a functional or Sequential model; it
    shares that model's layers and weights.

    Example:
        >>> model = gradaccum.accumulate(functional_model, 4)
        >>> model.compile("adam", "mse")
        >>> model.fit(x, y, batch_size=8)  # same weights as batch_size=32
    """


@keras.saving.register_keras_serializable(package="gradaccum")
class AccumWrapper(_model.WrapperMixin, _Keras3Training, keras.Model):
    """Wraps a subclassed Keras 3 model; applies its optimizer once every `n` batches.

    Example:
        >>> model = gradaccum.accumulate(MySubclassedModel(), 4)
    """


_model.register_bare_names(keras, (AccumModel, AccumWrapper))


def _compile_args(model):
    """The arguments `model` was compiled with, to compile its wrapper alike."""
    if not getattr(model, "compiled", False):
        return None
    try:
        args = dict(model._compile_config.config)
    except AttributeError as err:
        raise RuntimeError(
            "accumulate: cannot read the compile() arguments of this already compiled "
            "model on Keras {} ({}). Call accumulate(model, n) before model.compile(...)."
            .format(keras.__version__, err)) from err
    args["optimizer"] = model.optimizer  # the instance, with its state
    return args
