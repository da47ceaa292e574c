"""The Keras 2 route: a Keras model that accumulates, in eager or graph mode.

Keras 2 is `tf.keras` on TF 1.x and on TF 2.x before 2.16, or the tf-keras
package after. This module is imported only on such a runtime (see
`_compat.keras2_module`).

In eager mode (TF 2.x) the model's `train_step` accumulates. In graph mode
(TF 1.x, or TF 2.x with eager disabled) Keras builds one training op from
`optimizer.get_updates`, and the model has the graph route (`_graph`) build
that op instead. One class serves both modes, so a model saved in one loads
and trains in the other.

Two classes share one training mixin:

- `AccumModel` is a functional model rebuilt from the given model's input
  and output tensors. It shares every layer, so the caller's model is the one
  trained, output names (and so dict losses) stay as they were, and it saves
  to every format a functional model saves to, `.h5` included.
- `AccumWrapper` holds a subclassed (or unbuilt Sequential) model and calls
  it; Keras offers SavedModel, not `.h5`, for those.

A real update happens inside the training step, gated by `tf.cond`: on the
other micro-steps the optimizer is not called at all, so its iterations,
slots and learning-rate schedule move once per update.
"""

import math

import tensorflow as tf

from . import _compat, _graph
from ._window import APPLY, Window

keras = _compat.keras2_module()

# The hooks that Keras' default training step calls on the model. A model
# that overrides one of them has its own training logic, which gradaccum's
# step would silently bypass.
_TRAINING_HOOKS = ("train_step", "compute_loss", "compute_metrics", "make_train_function")
# Positional indices in Keras 2's Model.fit(x, y, batch_size, epochs, verbose, callbacks, ...).
_FIT_VERBOSE_INDEX = 4
_FIT_CALLBACKS_INDEX = 5


def wrap(model, n, epoch_end):
    """The accumulating model for `model` (see `gradaccum.accumulate`)."""
    if isinstance(model, _Accumulating):
        raise ValueError(
            "accumulate: the model already accumulates gradients (n={}); wrapping it "
            "again would multiply the windows. Call accumulate on the original model "
            "instead. Received: model={!r}".format(model.n, model.name))
    overridden = [hook for hook in _TRAINING_HOOKS if _overrides(model, hook)]
    if overridden:
        raise ValueError(
            "accumulate: {} overrides {} of keras.Model, so it has training logic of "
            "its own that gradaccum's accumulating train_step would bypass. Remove the "
            "override (move custom loss terms into `add_loss`) or accumulate inside "
            "your own train_step. Received: model of type {}".format(
                model.name, ", ".join(overridden), type(model).__name__))
    if getattr(model, "_is_graph_network", False):
        accumulating = AccumModel(
            inputs=model.input, outputs=model.output, name=model.name, n=n, epoch_end=epoch_end)
    else:
        accumulating = AccumWrapper(model, n=n, epoch_end=epoch_end)
    compile_args = _compile_args(model)
    if compile_args is not None:
        accumulating.compile(**compile_args)
    return accumulating


def _overrides(model, hook):
    """Whether a class outside Keras defines `hook` for `model`."""
    for cls in type(model).__mro__:
        if hook in vars(cls):
            return cls.__module__.split(".", 1)[0] not in _KERAS_PACKAGES
    return False


# Where Keras 2's own classes live (TF 1.x and 2.0-2.5 ship Keras inside TF).
_KERAS_PACKAGES = ("keras", "tf_keras", "tensorflow", "tensorflow_core")


class _Accumulating(object):
    """The training behaviour both accumulating model classes share."""

    def _init_accumulation(self, n, epoch_end):
        self._accum_n = n
        self._accum_epoch_end = epoch_end
        # A plain object, so that Keras tracks none of its variables: they are
        # not weights, and must not appear in get_weights() or weight files.
        self._accum_window = Window(n)
        self._accum_flush_op = None  # graph mode: applies a partial window

    @property
    def n(self):
        """Micro-batches per real optimizer update."""
        return self._accum_n

    @property
    def epoch_end(self):
        """What happens to a partial window when an epoch ends: "apply" or "carry"."""
        return self._accum_epoch_end

    def _accumulation_config(self):
        return {"n": self._accum_n, "epoch_end": self._accum_epoch_end}

    def train_step(self, data):
        if self._accum_n == 1:
            return self._with_update_count(super(_Accumulating, self).train_step(data))
        _refuse_loss_scaling(self.optimizer)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._accum_loss(x, y, y_pred, sample_weight)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        window = self._accum_window
        window.build(variables)
        with tf.init_scope():
            self.optimizer.iterations  # created outside the cond branch below
        window.add(zip(grads, variables), _batch_size(x))
        tf.cond(window.due(), self._accum_apply, lambda: tf.constant(False))
        return self._with_update_count(self._accum_metrics(x, y, y_pred, sample_weight))

    def _make_train_function(self):
        # Graph mode only (TF 1.x, or eager disabled): Keras builds the
        # training op once, from optimizer.get_updates(loss, params). For that
        # one call, the graph route builds the accumulating op instead.
        if self._accum_n == 1:
            return super(_Accumulating, self)._make_train_function()
        _refuse_loss_scaling(self.optimizer)
        optimizer = self.optimizer

        def get_updates(loss, params):
            update, self._accum_flush_op = _graph.keras_updates(
                optimizer, self._accum_window, loss, params, _batch_size(self.inputs))
            return [update]

        existing = set(id(var) for var in self._accum_window.all_variables())
        optimizer.get_updates = get_updates
        try:
            super(_Accumulating, self)._make_train_function()
        finally:
            del optimizer.get_updates
        # Keras' session initializes only the variables Keras made.
        created = [var for var in self._accum_window.all_variables() if id(var) not in existing]
        if created:
            _run_in_keras_session(tf.compat.v1.variables_initializer(created))

    def _accum_apply(self):
        window = self._accum_window
        self.optimizer.apply_gradients(window.mean())
        window.reset()
        return tf.constant(True)

    def _accum_flush(self):
        """Applies a partial window now (epoch end when its length is unknown)."""
        window = self._accum_window
        if self._accum_epoch_end != APPLY or not window.built:
            return
        if self._accum_flush_op is not None:  # graph mode
            _run_in_keras_session(self._accum_flush_op)
        elif tf.executing_eagerly() and int(window.count.numpy()) > 0:
            self._accum_apply()

    def _accum_loss(self, x, y, y_pred, sample_weight):
        if hasattr(self, "compute_loss"):  # Keras >= 2.9
            return self.compute_loss(x, y, y_pred, sample_weight)
        return self.compiled_loss(y, y_pred, sample_weight, regularization_losses=self.losses)

    def _accum_metrics(self, x, y, y_pred, sample_weight):
        if hasattr(self, "compute_metrics"):  # Keras >= 2.9
            return self.compute_metrics(x, y, y_pred, sample_weight)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {metric.name: metric.result() for metric in self.metrics}

    def _with_update_count(self, logs):
        logs = dict(logs)
        logs["updates"] = tf.identity(self.optimizer.iterations)
        return logs

    def fit(self, *args, **kwargs):
        args = list(args)
        verbose = args[_FIT_VERBOSE_INDEX] if len(args) > _FIT_VERBOSE_INDEX else kwargs.get("verbose", "auto")
        if len(args) > _FIT_CALLBACKS_INDEX:
            args[_FIT_CALLBACKS_INDEX] = self._accum_callbacks(args[_FIT_CALLBACKS_INDEX], verbose)
        else:
            kwargs["callbacks"] = self._accum_callbacks(kwargs.get("callbacks"), verbose)
        return super(_Accumulating, self).fit(*args, **kwargs)

    def _accum_callbacks(self, callbacks, verbose):
        if isinstance(callbacks, getattr(keras.callbacks, "CallbackList", ())):
            raise TypeError(
                "accumulate: fit(callbacks=...) must be a list of callbacks for an "
                "accumulating model. Received: a CallbackList")
        callbacks = list(callbacks or [])
        # (Graph mode logs no per-batch `updates`, so it keeps Keras' own bar.)
        if verbose != 0 and _compat.executing_eagerly() and not any(isinstance(cb, keras.callbacks.ProgbarLogger) for cb in callbacks):
            # `updates` is a running count, not a per-batch value to average.
            # (Only when something is printed: a progress bar costs a Python
            # call per batch.)
            callbacks.insert(0, keras.callbacks.ProgbarLogger(
                count_mode="steps", stateful_metrics=["updates"]))
        if self._accum_n > 1:
            callbacks.append(_WindowCallback())
        return callbacks


def _register(cls):
    # TF 1.x's Keras has no registry by package; the bare name is added below.
    register = getattr(keras.utils, "register_keras_serializable", None)
    return register(package="gradaccum")(cls) if register is not None else cls


class _WindowCallback(keras.callbacks.Callback):
    """Tells the window where epochs end, and flushes when that was unknown."""

    def on_epoch_begin(self, epoch, logs=None):
        steps = _epoch_steps(self.params) if self.model.epoch_end == APPLY else None
        keras.backend.batch_set_value(self.model._accum_window.epoch_start_values(steps))

    def on_test_begin(self, logs=None):
        # fit() validates after the epoch's last step: with a known epoch
        # length the window was applied in that step; otherwise apply it here,
        # so that validation sees the weights big-batch training would have.
        self.model._accum_flush()

    def on_epoch_end(self, epoch, logs=None):
        self.model._accum_flush()
        if logs is not None:
            logs["updates"] = int(keras.backend.get_value(self.model.optimizer.iterations))

    def on_train_end(self, logs=None):
        keras.backend.batch_set_value(self.model._accum_window.epochs_end_values())


def _epoch_steps(params):
    """Micro-batches per epoch from fit's callback params, or None if unknown."""
    if params.get("steps"):
        return params["steps"]
    # Graph-mode fit on arrays reports samples and batch size instead.
    samples, batch_size = params.get("samples"), params.get("batch_size")
    if samples and batch_size:
        return int(math.ceil(samples / float(batch_size)))
    return None


@_register
class AccumModel(_Accumulating, keras.Model):
    """A functional Keras model that applies its optimizer once every `n` batches.

    Built by `gradaccum.accumulate` from a functional or Sequential model; it
    shares that model's layers and weights.

    Example:
        >>> model = gradaccum.accumulate(functional_model, 4)
        >>> model.compile("adam", "mse")
        >>> model.fit(x, y, batch_size=8)  # same weights as batch_size=32
    """

    def __init__(self, *args, n, epoch_end=APPLY, **kwargs):
        super(AccumModel, self).__init__(*args, **kwargs)
        self._init_accumulation(n, epoch_end)

    def get_config(self):
        # A plain functional view of the same graph gives the functional
        # config on every Keras 2: tf-keras >= 2.13 writes one only for
        # classes whose constructor is exactly Functional's.
        config = keras.Model(inputs=self.input, outputs=self.output, name=self.name).get_config()
        config.update(self._accumulation_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        options = {key: config.pop(key) for key in ("n", "epoch_end") if key in config}
        plain = keras.Model.from_config(config, custom_objects)
        return cls(inputs=plain.input, outputs=plain.output, name=plain.name, **options)


@_register
class AccumWrapper(_Accumulating, keras.Model):
    """Wraps a subclassed Keras model; applies its optimizer once every `n` batches.

    Example:
        >>> model = gradaccum.accumulate(MySubclassedModel(), 4)
    """

    def __init__(self, model, n, epoch_end=APPLY, **kwargs):
        kwargs.setdefault("name", model.name)
        super(AccumWrapper, self).__init__(**kwargs)
        self.wrapped = model
        self._init_accumulation(n, epoch_end)

    def call(self, inputs, training=None):
        return self.wrapped(inputs, training=training)

    def get_config(self):
        config = {"model": keras.utils.serialize_keras_object(self.wrapped), "name": self.name}
        config.update(self._accumulation_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.utils.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)


def _refuse_loss_scaling(optimizer):
    # Loss scaling must happen per micro-batch and its finiteness check once
    # per window; until that is built and proven against the big batch, say so
    # rather than train float16 gradients unscaled.
    if isinstance(optimizer, _compat.loss_scale_optimizer_classes(keras)):
        raise NotImplementedError(
            "accumulate: mixed precision with a LossScaleOptimizer (the mixed_float16 "
            "policy wraps one around your optimizer) is not supported yet. Train in "
            "float32, or with n=1. Received: optimizer={}".format(type(optimizer).__name__))


def _run_in_keras_session(op):
    """Runs a graph-mode op in the session Keras trains in."""
    # get_value runs a tensor in Keras' session on every Keras 2, whose
    # get_session is not public everywhere (tf-keras).
    with tf.control_dependencies([op]):
        done = tf.constant(True)
    keras.backend.get_value(done)


def _batch_size(x):
    return tf.shape(tf.nest.flatten(x)[0])[0]


def _compile_args(model):
    """The arguments `model` was compiled with, to compile its wrapper alike."""
    if not getattr(model, "_is_compiled", False):
        return None
    if getattr(model, "compiled_loss", None) is None:  # graph mode: Keras' v1 training
        return {"optimizer": model.optimizer, "loss": model.loss, "loss_weights": model.loss_weights,
                "metrics": model._compile_metrics, "weighted_metrics": model._compile_weighted_metrics,
                "sample_weight_mode": model.sample_weight_mode}
    try:
        args = {
            "optimizer": model.optimizer,
            "loss": model.compiled_loss._user_losses,
            "loss_weights": model.compiled_loss._user_loss_weights,
            "metrics": model.compiled_metrics._user_metrics,
            "weighted_metrics": model.compiled_metrics._user_weighted_metrics,
            "run_eagerly": model._run_eagerly,
        }
    except AttributeError as err:
        raise RuntimeError(
            "accumulate: cannot read the compile() arguments of this already compiled "
            "model on {} ({}). Call accumulate(model, n) before model.compile(...)."
            .format(keras.__name__, err)) from err
    steps = getattr(model, "_steps_per_execution", None)
    if steps is not None:
        args["steps_per_execution"] = int(steps.numpy())
    jit_compile = getattr(model, "_jit_compile", None)
    if jit_compile is not None:
        args["jit_compile"] = jit_compile
    return args


# Keras 2's .h5 writer (up to 2.12 at least) records the bare class name, not
# the registered "gradaccum>..." one; make the bare names loadable too,
# without overriding a user's own object of that name.
for _cls in (AccumModel, AccumWrapper):
    keras.utils.get_custom_objects().setdefault(_cls.__name__, _cls)
