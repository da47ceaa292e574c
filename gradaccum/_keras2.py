"""The Keras 2 route: a Keras model that accumulates, in eager or graph mode.

Keras 2 is `tf.keras` on TF 1.x and on TF 2.x before 2.16, or the tf-keras
package after. This module is imported only on such a runtime (see
`_compat.keras2_module`).

In eager mode (TF 2.x) the model's `train_step` accumulates. In graph mode
(TF 1.x, or TF 2.x with eager disabled) Keras builds one training op from
`optimizer.get_updates`, and the model has the graph route (`_graph`) build
that op instead. One class serves both modes, so a model saved in one loads
and trains in the other. What Keras 2 and 3 models share is in `_model`.

A real update happens inside the training step, gated by `tf.cond`: on the
other micro-steps the optimizer is not called at all, so its iterations,
slots and learning-rate schedule move once per update.
"""

import tensorflow as tf

from . import _batchnorm, _compat, _graph, _model

keras = _compat.keras2_module()


def wrap(model, n, **options):
    """The accumulating model for `model` (see `gradaccum.accumulate`)."""
    return _model.wrap(model, n, options, AccumModel, AccumWrapper, _compile_args)


class _Keras2Training(_model.Accumulating):
    """Keras 2's training step, eager (`train_step`) and graph (`_make_train_function`)."""

    _keras = keras
    _accum_assets_load = _compat.keras2_loads_assets()

    def _init_accumulation(self, n, options):
        super(_Keras2Training, self)._init_accumulation(n, options)
        self._accum_flush_op = None  # graph mode: applies a partial window

    def _accum_check_fit(self):
        # Graph-mode Keras trains under a strategy with its own distributed
        # loop, which never builds the training op from get_updates: the
        # model would train plain, one update per micro-batch.
        strategy = _compat.keras2_compiled_strategy(self)
        if (not self._accum_keras_step and not _compat.executing_eagerly()
                and (strategy is not None or tf.distribute.has_strategy())):
            raise NotImplementedError(
                "accumulate: tf.distribute strategies are supported in eager mode (TF 2), not "
                "with eager execution disabled, where Keras trains under a strategy without "
                "the accumulating training op. Received: a model compiled under strategy "
                "{}".format(type(strategy or tf.distribute.get_strategy()).__name__))

    def train_step(self, data):
        if self._accum_keras_step:
            return super(_Keras2Training, self).train_step(data)
        optimizer = self.optimizer
        _model.refuse_accumulating_optimizer(optimizer, self._accum_n)
        window = self._accum_window
        # Mixed precision (see Window.scale_loss): the loss is scaled by
        # scale / n, and the gradients unscaled before they are added.
        scaling = isinstance(optimizer, _compat.loss_scale_optimizer_classes(keras))
        if scaling:
            _model.refuse_skipping_with_loss_scaling(self)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        size = _model.batch_size(x)
        with tf.GradientTape() as tape:
            with self._accum_pooling():
                y_pred = self(x, training=True)
            loss = self._accum_loss(x, y, y_pred, sample_weight)
            # (After the forward pass, which builds the variables.)
            prescaled = not scaling and window.prescales(self.trainable_variables)
            if scaling:
                loss = window.scale_loss(loss, optimizer.get_scaled_loss)
            elif prescaled:  # one scalar multiply, not a pass over each gradient
                loss = window.prescale_loss(loss, size)
        variables = self.trainable_variables
        grads_and_vars = zip(tape.gradient(loss, variables), variables)
        if scaling:
            grads_and_vars = window.unscale(grads_and_vars, unscale_fn=optimizer.get_unscaled_gradients)
        with tf.init_scope():
            optimizer.iterations  # created outside the cond branch
        window.accumulate(grads_and_vars, size, optimizer.apply_gradients, prescaled=prescaled)
        return self._accum_metrics(x, y, y_pred, sample_weight)

    def _make_train_function(self):
        # Graph mode only (TF 1.x, or eager disabled): Keras builds the
        # training op once, from optimizer.get_updates(loss, params). For that
        # one call, the graph route builds the accumulating op instead.
        if self._accum_keras_step:
            return super(_Keras2Training, self)._make_train_function()
        _model.refuse_loss_scaling(self.optimizer, keras)
        optimizer = self.optimizer

        own = set()  # BatchNormalization's own moving-average updates, left out

        def get_updates(loss, params):
            adds = []
            if self.batchnorm == _batchnorm.POOLED:
                adds, found = _batchnorm.graph_statistics(self, keras, self._accum_window)
                own.update(found)
            update, self._accum_flush_op = _graph.keras_updates(
                optimizer, self._accum_window, loss, params, _model.batch_size(self.inputs), adds)
            return [update]

        # Keras asks for the model's updates after the optimizer's.
        get_updates_for = self.get_updates_for

        def updates_but_own(inputs):
            return [update for update in get_updates_for(inputs) if id(update) not in own]

        existing = set(id(var) for var in self._accum_window.all_variables())
        optimizer.get_updates = get_updates
        self.get_updates_for = updates_but_own
        try:
            super(_Keras2Training, self)._make_train_function()
        finally:
            del optimizer.get_updates
            del self.get_updates_for
        # Keras' session initializes only the variables Keras made.
        created = [var for var in self._accum_window.all_variables() if id(var) not in existing]
        if created:
            _run_in_keras_session(tf.compat.v1.variables_initializer(created))

    def _accum_flush_now(self):
        if self._accum_flush_op is not None:  # graph mode
            _run_in_keras_session(self._accum_flush_op)
        elif tf.executing_eagerly():
            super(_Keras2Training, self)._accum_flush_now()

    def _accum_set(self, pairs):
        keras.backend.batch_set_value(pairs)  # in Keras' session in graph mode

    def _accum_read(self, variable):
        return int(keras.backend.get_value(variable))

    def _accum_progress_bar(self, callbacks, verbose):
        # `updates` is a running count, not a per-batch value to average.
        # (Only when something is printed: a progress bar costs a Python call
        # per batch. Graph mode logs no per-batch `updates`: Keras' own bar.)
        if (verbose != 0 and _compat.executing_eagerly()
                and not any(isinstance(cb, keras.callbacks.ProgbarLogger) for cb in callbacks)):
            callbacks.insert(0, _ProgbarLogger(count_mode="steps"))
        return callbacks

    def _accum_loss(self, x, y, y_pred, sample_weight):
        if hasattr(self, "compute_loss"):  # Keras >= 2.9
            return self.compute_loss(x, y, y_pred, sample_weight)
        return self.compiled_loss(y, y_pred, sample_weight, regularization_losses=self.losses)

    def _accum_metrics(self, x, y, y_pred, sample_weight):
        if hasattr(self, "compute_metrics"):  # Keras >= 2.9
            return self.compute_metrics(x, y, y_pred, sample_weight)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {metric.name: metric.result() for metric in self.metrics}


def _register(cls):
    # TF 1.x's Keras has no registry by package; the bare name is added below.
    register = getattr(keras.utils, "register_keras_serializable", None)
    return register(package="gradaccum")(cls) if register is not None else cls


class _WindowCallback(_model.WindowCallback, keras.callbacks.Callback):
    pass


class _SchedulerCallback(_model.SchedulerCallback, keras.callbacks.Callback):
    pass


class _ProgbarLogger(_model.CountsProgbarLogger, keras.callbacks.ProgbarLogger):
    pass


_Keras2Training._window_callback = _WindowCallback
_Keras2Training._scheduler_callback = _SchedulerCallback


@_register
class AccumModel(_model.FunctionalMixin, _Keras2Training, keras.Model):
    """A functional Keras model that applies its optimizer once every `n` batches.

    Built by `gradaccum.accumulate` from a functional or Sequential model; it
    shares that model's layers and weights.

    Example:
        >>> model = gradaccum.accumulate(functional_model, 4)
        >>> model.compile("adam", "mse")
        >>> model.fit(x, y, batch_size=8)  # same weights as batch_size=32
    """


@_register
class AccumWrapper(_model.WrapperMixin, _Keras2Training, keras.Model):
    """Wraps a subclassed Keras model; applies its optimizer once every `n` batches.

    Example:
        >>> model = gradaccum.accumulate(MySubclassedModel(), 4)
    """


def _run_in_keras_session(op):
    """Runs a graph-mode op in the session Keras trains in."""
    # get_value runs a tensor in Keras' session on every Keras 2, whose
    # get_session is not public everywhere (tf-keras).
    with tf.control_dependencies([op]):
        done = tf.constant(True)
    keras.backend.get_value(done)


def _compile_args(model):
    """The arguments `model` was compiled with, to compile its wrapper alike (or None)."""
    return _compat.keras2_compile_args(model, keras)


_model.register_bare_names(keras, (AccumModel, AccumWrapper))
