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
Its `scale_loss`, which Keras' step calls on the loss before the backward
pass, is stood in for too: it multiplies the loss by the micro-batch's
weight in the window (`Window.prescales`), so that the gradients come
scaled as the window adds them.
What Keras 2 and 3 models share is in `_model`.

Why stand-ins, now that an AccumOptimizer exists that Keras could be compiled
with (as it wraps a LossScaleOptimizer around yours): the model route sees
each micro-batch's data, so it weights a short micro-batch by its size and
applies a partial window at an epoch's end; an optimizer compiled into Keras'
step sees neither. And `model.optimizer` stays the user's optimizer, which
callbacks, saved configs and the compile arguments kept by `accumulate` refer
to. The stand-ins are checked: a trace that did not call a stood-in method
raises, rather than training every micro-batch.
"""

import os

import tensorflow as tf

from . import _compat, _model, _optimizer
from ._standins import method as _method, standing_in
from ._window import CARRY, multiplied

keras = _compat.keras3_module()


def wrap(model, n, **options):
    """The accumulating model for `model` (see `gradaccum.accumulate`)."""
    return _model.wrap(model, n, options, AccumModel, AccumWrapper, _compile_args)


class _Keras3Training(_model.Accumulating):
    """Keras 3's training step, with the window in place of the optimizer's update."""

    _keras = keras

    def _accum_backups(self, callbacks):
        # Keras 3's BackupAndRestore writes a .weights.h5 file, which holds
        # no window: each gets a companion that keeps it beside that file.
        with_windows = []
        for callback in callbacks:
            with_windows.append(callback)
            if isinstance(callback, keras.callbacks.BackupAndRestore):
                with_windows.append(_BackupWindow(callback))
        return with_windows

    def _accum_progress_bar(self, callbacks, verbose):
        # (Only when something is printed, and not over the user's own bar.)
        if verbose != 0 and not any(isinstance(cb, keras.callbacks.ProgbarLogger) for cb in callbacks):
            callbacks.insert(0, _ProgbarLogger())
        return callbacks

    def train_step(self, data):
        if self._accum_keras_step:
            return super(_Keras3Training, self).train_step(data)
        optimizer = self.optimizer
        _optimizer.refuse_own_accumulation(
            optimizer, "accumulate", "Create the optimizer without gradient_accumulation_steps "
            "and pass n to accumulate(model, n) instead.")
        _model.refuse_accumulating_optimizer(optimizer, self._accum_n)
        window = self._accum_window
        # The class's methods: another replica's thread may be standing in now.
        apply_gradients = _method(optimizer, "apply_gradients")
        size = _model.batch_size(keras.utils.unpack_x_y_sample_weight(data)[0])
        loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        called = []
        stand_ins = {}
        unscale = rescale = list
        prescaled = []  # (whether the stand-in for scale_loss folded the weight into the loss)
        if loss_scaling:
            _model.refuse_skipping_with_loss_scaling(self)
            # Mixed precision (see Window.scale_loss): each micro-batch's loss
            # is scaled by scale / n, so that its float16 gradients have the
            # big batch's magnitudes, and the gradients are unscaled before
            # they are added. The mean is handed back scaled by the scale,
            # which is what the LossScaleOptimizer's apply expects.
            if not optimizer.built:
                with tf.init_scope():
                    optimizer.build(self.trainable_variables)
            scale = optimizer.dynamic_scale
            scale_loss = _method(optimizer, "scale_loss")

            def scale_micro_batch_loss(loss):
                called.append("scale_loss")
                return window.scale_loss(loss, scale_loss)

            stand_ins["scale_loss"] = scale_micro_batch_loss

            def unscale(pairs):
                return window.unscale(pairs, scale)

            def rescale(pairs):
                return multiplied(pairs, scale)
        else:
            # One scalar multiply of the loss instead of a pass over each
            # gradient (see Window.prescales). Keras' step calls scale_loss
            # after the forward pass, which builds the variables; a step that
            # did not call it adds its gradients scaled, as before.
            scale_loss = _method(optimizer, "scale_loss")

            def prescale_micro_batch_loss(loss):
                if window.prescales(self.trainable_variables):
                    prescaled.append(True)
                    loss = window.prescale_loss(loss, size)
                return scale_loss(loss)

            stand_ins["scale_loss"] = prescale_micro_batch_loss

        def accumulate_gradients(grads_and_vars):
            called.append("apply_gradients")
            return window.accumulate(
                unscale(grads_and_vars), size,
                lambda mean: apply_gradients(rescale(mean)), prescaled=bool(prescaled))

        stand_ins["apply_gradients"] = accumulate_gradients
        with standing_in(optimizer, stand_ins), self._accum_pooling():
            logs = super(_Keras3Training, self).train_step(data)
        # (Under loss scaling both must run; scale_loss alone may not otherwise.)
        required = ["apply_gradients"] + (["scale_loss"] if loss_scaling else [])
        missing = [name for name in required if name not in called]
        if missing:
            # Without its stand-in the step would apply every micro-batch
            # (apply_gradients) or scale float16 gradients n times too large
            # (scale_loss): refuse rather than train wrong.
            raise RuntimeError(
                "accumulate: Keras {}'s train_step did not call optimizer.{}, which gradaccum "
                "stands in for to accumulate. Please report this with your Keras "
                "version.".format(keras.__version__, " or optimizer.".join(missing)))
        return logs


class _WindowCallback(_model.WindowCallback, keras.callbacks.Callback):
    pass


class _SchedulerCallback(_model.SchedulerCallback, keras.callbacks.Callback):
    pass


class _ProgbarLogger(_model.CountsProgbarLogger, keras.callbacks.ProgbarLogger):
    pass


class _BackupWindow(keras.callbacks.Callback):
    """Keeps the window beside a BackupAndRestore's files, in its backup_dir.

    Saved right after each save of the BackupAndRestore, restored where it
    restores: at the start of the fit, after it (this callback follows it in
    the list). Keras 3
    resumes a run at the start of the epoch it stopped in, so under "apply",
    whose windows end with their epoch, the open window is emptied (a big
    batch cut off half-way is lost, as in an interrupted fit); "carry"
    resumes it. The counts (`skipped`) are restored either way. The
    BackupAndRestore deletes its backup_dir, this file with it, when the fit
    ends.
    """

    def __init__(self, backup):
        super(_BackupWindow, self).__init__()
        self.path = os.path.join(backup.backup_dir, _model.WINDOW_FILE)
        _compat.keras3_after_backup_saves(backup, self._save)

    def _save(self):
        _model.write_window(self.model._accum_window, self.path)

    def on_train_begin(self, logs=None):
        if not tf.io.gfile.exists(self.path):
            return
        model = self.model
        with _model.strategy_of(model).scope():
            model._accum_window.restore(_model.read_window(self.path), open_window=model.epoch_end == CARRY)


_Keras3Training._window_callback = _WindowCallback
_Keras3Training._scheduler_callback = _SchedulerCallback


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
    """The arguments `model` was compiled with, to compile its wrapper alike (or None)."""
    return _compat.keras3_compile_args(model, keras)
