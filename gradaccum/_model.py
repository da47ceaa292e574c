"""The accumulating Keras model, as far as it is the same on Keras 2 and Keras 3.

The Keras routes (`_keras2`, `_keras3`) are siblings: each brings its Keras
module and its training step, and declares its model and callback classes
from the mixins here, which hold what does not depend on the Keras version:

- `wrap`: which class wraps which model, and refusing what would be trained
  wrongly (a model that accumulates already, or has its own training step);
- `Accumulating`: `n`, `epoch_end`, fit's window callback, the update count
  in the logs, applying a partial window at an epoch's end;
- `FunctionalMixin` and `WrapperMixin`: construction, saving and loading;
- `WindowCallback`: tells the window where each epoch ends.

Two model classes per route, because Keras models come in two kinds:

- `AccumModel` is a functional model rebuilt from the given model's input
  and output tensors. It shares every layer, so the caller's model is the one
  trained, output names (and so dict losses) stay as they were, and it saves
  to every format a functional model saves to.
- `AccumWrapper` holds a subclassed (or unbuilt Sequential) model and calls it.
"""

import contextlib
import io
import math
import os

import numpy as np
import tensorflow as tf

from . import _batchnorm
from ._compat import built_input_shape, is_graph_network, loss_scale_optimizer_classes, track
from ._optimizer import AccumulatingOptimizer
from ._window import APPLY, Window

# accumulate()'s options besides n, with their defaults; a model's config
# holds each, so that a saved model loads with them.
OPTIONS = {"epoch_end": APPLY, "skip_nonfinite": False, "batchnorm": _batchnorm.POOLED,
           "agc": None, "agc_eps": 1e-3}

# The hooks that Keras' default training step calls on the model. A model
# that overrides one of them has its own training logic, which gradaccum's
# step would silently bypass.
_TRAINING_HOOKS = ("train_step", "compute_loss", "compute_metrics", "make_train_function")
# Where Keras' own classes live (TF 1.x and 2.0-2.5 ship Keras inside TF).
_KERAS_PACKAGES = ("keras", "tf_keras", "tensorflow", "tensorflow_core")
# Positional indices in Model.fit(x, y, batch_size, epochs, verbose, callbacks, ...),
# the same on Keras 2 and 3.
_FIT_VERBOSE_INDEX = 4
_FIT_CALLBACKS_INDEX = 5
# What an accumulating model logs besides Keras' metrics: counts, not averages.
COUNTS = ("updates", "skipped", "n")


def wrap(model, n, options, functional_class, wrapper_class, compile_args):
    """The accumulating model for `model` (see `gradaccum.accumulate`).

    `options` are accumulate's keyword arguments (epoch_end, skip_nonfinite).

    `compile_args(model)` returns the arguments `model` was compiled with, or
    None if it was not compiled; the route knows where its Keras keeps them.
    """
    if isinstance(model, Accumulating):
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
    if _is_functional(model):
        inputs, outputs = _ends(model)
        accumulating = functional_class(
            inputs=inputs, outputs=outputs, name=model.name, n=n, **options)
    else:
        accumulating = wrapper_class(model, n=n, **options)
    arguments = compile_args(model)
    if arguments is not None:
        accumulating.compile(**arguments)
    return accumulating


def _is_functional(model):
    """Whether `model` is a graph of layers: functional, or a Sequential with an Input."""
    flag = is_graph_network(model)  # Keras 2 says so
    if flag is not None:
        return bool(flag)
    try:  # Keras 3: only those know their symbolic inputs and outputs
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _ends(model):
    """A functional model's input and output tensors, as its own `input`/`output` give them."""
    try:
        return model.input, model.output
    except AttributeError:  # a Keras 3 Sequential has only the lists
        def single(tensors):
            return tensors[0] if len(tensors) == 1 else tensors
        return single(model.inputs), single(model.outputs)


def _overrides(model, hook):
    """Whether a class outside Keras defines `hook` for `model`."""
    for cls in type(model).__mro__:
        if hook in vars(cls):
            return cls.__module__.split(".", 1)[0] not in _KERAS_PACKAGES
    return False


def batch_size(x):
    """A micro-batch's number of samples: the first dimension of its first input tensor."""
    # (Keras 3 allows None among optional inputs; skip those.)
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def strategy_of(model):
    """The `tf.distribute` strategy `model` trains under (TF 1.x's Keras does not say)."""
    return getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()


def refuse_accumulating_optimizer(optimizer, n):
    """Raises if the model's optimizer accumulates too: the windows would multiply."""
    inner = getattr(optimizer, "inner_optimizer", None)  # inside a LossScaleOptimizer
    for candidate in (optimizer, inner):
        if isinstance(candidate, AccumulatingOptimizer):
            raise ValueError(
                "accumulate: the model's optimizer is an AccumOptimizer (n={}), and the model "
                "accumulates already (n={}): the windows would multiply. Compile the model "
                "that accumulate() returns with the optimizer the AccumOptimizer wraps, or "
                "compile the original model with the AccumOptimizer. Received: optimizer={}"
                .format(candidate.n, n, type(candidate).__name__))


def refuse_skipping_with_loss_scaling(model):
    """Raises if the model skips non-finite windows and trains under a LossScaleOptimizer."""
    from ._optimizer import refusal_of_skipping_with_loss_scaling
    if model.skip_nonfinite:
        raise ValueError(refusal_of_skipping_with_loss_scaling("accumulate", "the model's"))


def refuse_loss_scaling(optimizer, keras):
    # The graph route (Keras 2 with eager disabled) has no micro-batch loss
    # scaling; say so rather than train float16 gradients unscaled.
    if isinstance(optimizer, loss_scale_optimizer_classes(keras)):
        raise NotImplementedError(
            "accumulate: mixed precision with a LossScaleOptimizer (the mixed_float16 "
            "policy wraps one around your optimizer) is supported in eager mode (TF 2), "
            "not in graph mode. Received: optimizer={} with eager execution disabled".format(
                type(optimizer).__name__))


def register_bare_names(keras, classes):
    """Makes the classes loadable by their bare names too.

    The .h5 writers (Keras 2 up to 2.12 at least, and Keras 3's legacy one)
    record the bare class name, not the registered "gradaccum>..." one. A
    user's own object of that name is not overridden.
    """
    for cls in classes:
        keras.utils.get_custom_objects().setdefault(cls.__name__, cls)


class Accumulating(object):
    """What every accumulating model does besides its training step.

    A route's training mixin sets `_keras` (its Keras module),
    `_window_callback` (its `WindowCallback` class) and `_scheduler_callback`
    (its `SchedulerCallback` class), and may replace
    `_accum_set`, `_accum_read` and `_accum_flush_now` where its Keras trains
    in a graph.
    """

    _keras = None
    _window_callback = None
    _scheduler_callback = None
    # Whether this Keras loads back a .keras file that holds assets (the window).
    _accum_assets_load = True

    def _init_accumulation(self, n, options):
        options = dict(OPTIONS, **options)
        self._accum_n = n
        # Made with n = 1, the model trains with Keras' own step, which has no
        # window to make n larger later (see the n setter), nor to skip or clip.
        self._accum_keras_step = n == 1 and not options["skip_nonfinite"] and options["agc"] is None
        self._accum_epoch_end = options["epoch_end"]
        self._accum_batchnorm = options["batchnorm"]
        if self._accum_batchnorm == _batchnorm.POOLED:
            _batchnorm.check(self, self._keras)
        # A plain attribute, so that Keras does not take its variables for
        # weights: they must not appear in get_weights() or weight files. Its
        # state is a checkpoint dependency instead, so tf.train.Checkpoint
        # (and what Keras builds on it) saves and restores an open window.
        self._accum_window = Window(n, skip_nonfinite=options["skip_nonfinite"],
                                    agc=options["agc"], agc_eps=options["agc_eps"])
        track(self, self._accum_window.state, "gradaccum")

    @property
    def batchnorm(self):
        """How BatchNormalization layers move their statistics: "pooled" (once per window) or "micro"."""
        return self._accum_batchnorm

    def _accum_pooling(self):
        """The context in which the training step's forward pass pools BatchNormalization statistics."""
        if self._accum_batchnorm != _batchnorm.POOLED:
            return contextlib.nullcontext()
        return _batchnorm.pooling(self, self._keras, self._accum_window)

    @property
    def n(self):
        """Micro-batches per real optimizer update; settable between steps (a batch-size schedule).

        n is a variable of the training graph: setting it traces nothing
        again. The open window is due once it holds the new n micro-batches
        (at once if it holds as many already); under epoch_end="apply" an
        epoch's start is a window boundary.
        """
        return self._accum_n

    @n.setter
    def n(self, value):
        from ._facade import check_n  # (the facade imports this module's routes)
        value = check_n(value, "{}.n".format(type(self).__name__))
        if value == self._accum_n:
            return
        if self._accum_keras_step:
            raise ValueError(
                "{}.n: this model was made with n=1, so it trains with Keras' own step, "
                "which has no window to grow. Make it with the largest n you will use, "
                "e.g. accumulate(model, {}), and set n=1 from there. Received: n={}".format(
                    type(self).__name__, value, value))
        self._accum_n = value
        with strategy_of(self).scope():
            self._accum_set(self._accum_window.n_values(value))

    @property
    def epoch_end(self):
        """What happens to a partial window when an epoch ends: "apply" or "carry"."""
        return self._accum_epoch_end

    @property
    def skip_nonfinite(self):
        """Whether a window with a non-finite gradient is skipped (counted in the logs' `skipped`)."""
        return self._accum_window.skip_nonfinite

    def _accumulation_config(self):
        return {"n": self._accum_n, "epoch_end": self._accum_epoch_end,
                "skip_nonfinite": self.skip_nonfinite, "batchnorm": self._accum_batchnorm,
                "agc": self._accum_window.agc, "agc_eps": self._accum_window.agc_eps}

    def _accum_counts(self):
        """The counts that a step's logs lack: name -> function returning the count now.

        A training step returns Keras' logs only, no counts: each tensor more
        a step returns costs every step time (measured on the benchmark's MLP
        at n = 8: 1.4% of a step for `updates` alone). The counts are read
        where they are shown: the progress bar reads these when it prints,
        and `WindowCallback` writes them into the epoch's logs (with `n`).
        """
        counts = {"updates": lambda: self._accum_read(self.optimizer.iterations)}
        if self.skip_nonfinite:
            counts["skipped"] = lambda: self._accum_read(self._accum_window.skipped)
        return counts

    def fit(self, *args, **kwargs):
        self._accum_check_fit()
        args = list(args)
        verbose = args[_FIT_VERBOSE_INDEX] if len(args) > _FIT_VERBOSE_INDEX else kwargs.get("verbose", "auto")
        if len(args) > _FIT_CALLBACKS_INDEX:
            args[_FIT_CALLBACKS_INDEX] = self._accum_callbacks(args[_FIT_CALLBACKS_INDEX], verbose)
        else:
            kwargs["callbacks"] = self._accum_callbacks(kwargs.get("callbacks"), verbose)
        try:
            return super(Accumulating, self).fit(*args, **kwargs)
        except BaseException:
            # Interrupted (an error, Ctrl-C) mid-window. Under "apply" the
            # open micro-batches belong to a big batch cut off half-way,
            # which is lost, as it would be without accumulation: the next
            # fit starts a window of its own. ("carry" keeps it, as it keeps
            # windows across epochs and fits.)
            if self._accum_epoch_end == APPLY and self._accum_window.built:
                with strategy_of(self).scope():
                    self._accum_set(self._accum_window.empty_values())
            raise

    def _accum_callbacks(self, callbacks, verbose):
        if isinstance(callbacks, getattr(self._keras.callbacks, "CallbackList", ())):
            raise TypeError(
                "accumulate: fit(callbacks=...) must be a list of callbacks for an "
                "accumulating model. Received: a CallbackList")
        from ._facade import AccumulationScheduler  # (the facade imports this module's routes)
        callbacks = [self._scheduler_callback(cb) if isinstance(cb, AccumulationScheduler) else cb
                     for cb in callbacks or []]
        callbacks = self._accum_progress_bar(callbacks, verbose)
        if not self._accum_keras_step:
            callbacks = self._accum_backups(callbacks)
        # First: at an epoch's end it applies a partial window and sets
        # `updates`, and every other callback (a checkpoint, a logger, a
        # progress bar, early stopping) must see the epoch's final weights.
        # (With Keras' own step, n = 1, it only sets the counts.)
        callbacks.insert(0, self._window_callback())
        return callbacks

    # `.keras` files (Keras' saving_lib, Keras >= 2.13 and 3): the window
    # rides as the model's asset, a file that full saves write and
    # weights-only saves (`save_weights`, `.weights.h5`) do not, so that
    # weights files still load into the plain model. An old file without it
    # loads with an empty window.

    def save_assets(self, dir_path):
        """Saves the open window with the model (Keras' saving_lib calls it)."""
        if self._accum_window.built and self._accum_assets_load:
            write_window(self._accum_window, os.path.join(dir_path, WINDOW_FILE))

    def load_assets(self, dir_path):
        """Restores the window that `save_assets` saved, if the file has one."""
        path = os.path.join(dir_path, WINDOW_FILE) if dir_path else None
        if path is not None and tf.io.gfile.exists(path):
            with strategy_of(self).scope():
                self._accum_window.restore(read_window(path))

    def _accum_check_fit(self):
        """Raises if this model cannot train with accumulation here (route hook)."""

    def _accum_progress_bar(self, callbacks, verbose):
        """The callbacks, with a progress bar that shows `updates` as a count (route hook)."""
        return callbacks

    def _accum_backups(self, callbacks):
        """The callbacks, with what a BackupAndRestore needs to keep the window (route hook)."""
        return callbacks

    def _accum_flush(self):
        """Applies a partial window now (epoch end when its length is unknown)."""
        if self._accum_epoch_end == APPLY and self._accum_window.built:
            self._accum_flush_now()

    def _accum_flush_now(self):
        self._accum_window.flush(self.optimizer.apply_gradients)

    def _accum_set(self, pairs):
        """Assigns (variable, value) pairs outside the training function."""
        for variable, value in pairs:
            variable.assign(value)

    def _accum_read(self, variable):
        return int(variable.numpy())


class WindowCallback(object):
    """Tells the window where epochs end, and flushes when that was unknown.

    A route declares `class _WindowCallback(WindowCallback, keras.callbacks.Callback)`.
    """

    def set_params(self, params):
        super(WindowCallback, self).set_params(params)
        # Graph-mode Keras lists the logged names in params["metrics"], one
        # list that every callback shares; TF 1.x's progress bar shows only
        # those. Listed, the counts show there too.
        metrics = params.get("metrics") if isinstance(params, dict) else None
        if isinstance(metrics, list):
            skipping = getattr(self.model, "skip_nonfinite", False)
            metrics.extend(key for key in COUNTS if key not in metrics and (key != "skipped" or skipping))

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        if model._accum_keras_step:  # no window to tell
            return
        steps = epoch_steps(self.params) if model.epoch_end == APPLY else None
        # The window's counters are made on first use: under the model's
        # strategy, which Keras 3 does not enter around callbacks.
        with strategy_of(model).scope():
            model._accum_set(model._accum_window.epoch_start_values(steps))

    def on_test_begin(self, logs=None):
        # fit() validates after the epoch's last step: with a known epoch
        # length the window was applied in that step; otherwise apply it here,
        # so that validation sees the weights big-batch training would have.
        self.model._accum_flush()

    def on_epoch_end(self, epoch, logs=None):
        self.model._accum_flush()
        if logs is not None:
            counts = {key: read() for key, read in self.model._accum_counts().items()}
            logs["updates"] = counts.pop("updates")
            logs["n"] = self.model.n
            logs.update(counts)  # (`skipped`, where the model skips)
            # Keras 3 before 3.7 hands over epoch logs whose keys differ from
            # its metrics' as the step's tensors (they did while each step
            # returned `updates`, until cd03ead), which CSVLogger cannot
            # write; every later callback sees what this one leaves.
            for key, value in list(logs.items()):
                if tf.is_tensor(value) and value.shape.rank == 0:
                    logs[key] = value.numpy().item()

    def on_train_end(self, logs=None):
        self.model._accum_set(self.model._accum_window.epochs_end_values())


class SchedulerCallback(object):
    """A gradaccum.AccumulationScheduler, as a callback of the model's Keras.

    A route declares `class _SchedulerCallback(SchedulerCallback, keras.callbacks.Callback)`.
    """

    def __init__(self, scheduler):
        super(SchedulerCallback, self).__init__()
        self.scheduler = scheduler

    def on_epoch_begin(self, epoch, logs=None):
        n = self.scheduler.n_for(epoch, self.model.n)
        self.model.n = n
        if self.scheduler.verbose:
            print("\nEpoch {}: AccumulationScheduler setting n to {}.".format(epoch + 1, n))


class CountsProgbarLogger(object):
    """Keras' progress bar, showing the COUNTS as integers ("updates: 8", not "8.0000").

    A route declares `class _ProgbarLogger(CountsProgbarLogger, keras.callbacks.ProgbarLogger)`.
    Keras' Progbar averages each value over the epoch, unless it is a
    stateful metric, and prints it with 4 decimals; a value that is not a
    list it prints as it is. So the counts are handed to it as `_Count`s,
    which print as integers (and unpack as a stateful value, for the bar of
    verbose=2 in Keras 3).
    """

    def _maybe_init_progbar(self):
        super(CountsProgbarLogger, self)._maybe_init_progbar()
        bar = self.progbar
        if bar is None or getattr(bar, "_gradaccum_counts", False):
            return
        update = bar.update
        live = {key: _Count(read) for key, read in self.model._accum_counts().items()}

        def update_with_counts(current, values=None, *args, **kwargs):
            rest, counts = [], {}
            for key, value in values or []:
                if key in COUNTS:
                    counts[key] = _Count(value)
                else:
                    rest.append((key, value))
            # A step's logs hold no counts (Accumulating._accum_counts): the
            # bar reads them when it prints. The epoch's logs hold them.
            for key, count in live.items():
                counts.setdefault(key, count)
            for key, _ in rest:  # (Keras' values first, in their order)
                if key not in bar._values_order:
                    bar._values_order.append(key)
            for key, count in counts.items():
                if key not in bar._values_order:
                    bar._values_order.append(key)
                bar._values[key] = count
            return update(current, rest, *args, **kwargs)

        bar.update = update_with_counts
        bar._gradaccum_counts = True


class _Count(object):
    """A count for Keras' Progbar: prints as an integer; unpacks as (value, 1).

    `value` is the count, or a function that reads it, called when the bar
    prints it.
    """

    def __init__(self, value):
        self._value = value

    @property
    def value(self):
        return _CountValue(int(self._value() if callable(self._value) else self._value))

    def __getitem__(self, index):
        return (self.value, 1)[index]

    def __iter__(self):
        return iter((self.value, 1))

    def __str__(self):
        return str(int(self.value))

    __repr__ = __str__


class _CountValue(float):
    """A count that stays one when a Progbar divides it by 1, averages it (np.mean) and formats it."""

    def __truediv__(self, other):
        return self if other == 1 else float(self) / other

    def mean(self, *args, **kwargs):  # what np.mean calls on an object that has it
        return self

    def __format__(self, spec):
        return str(int(self))


WINDOW_FILE = "gradaccum_window.npz"


def write_window(window, path):
    """Writes the window's values (`Window.values`) to an .npz file at `path` (any tf.io.gfile path).

    Written whole, then renamed into place: a process killed while writing
    leaves the previous file, not half of one.
    """
    buffer = io.BytesIO()
    np.savez(buffer, **{name.replace("/", "|"): value for name, value in window.values().items()})
    partial = path + ".partial"
    with tf.io.gfile.GFile(partial, "wb") as handle:
        handle.write(buffer.getvalue())
    tf.io.gfile.rename(partial, path, overwrite=True)


def read_window(path):
    """The window's values that `write_window` wrote, by name."""
    with tf.io.gfile.GFile(path, "rb") as handle:
        saved = np.load(io.BytesIO(handle.read()))
        return {name.replace("|", "/"): np.array(saved[name]) for name in saved.files}


def epoch_steps(params):
    """Micro-batches per epoch from fit's callback params, or None if unknown."""
    if params.get("steps"):
        return params["steps"]
    # Graph-mode fit on arrays reports samples and batch size instead.
    samples, batch_size = params.get("samples"), params.get("batch_size")
    if samples and batch_size:
        return int(math.ceil(samples / float(batch_size)))
    return None


class FunctionalMixin(object):
    """Construction, saving and loading of `AccumModel` (a functional model)."""

    def __init__(self, *args, n, **kwargs):
        options = {key: kwargs.pop(key) for key in OPTIONS if key in kwargs}
        super(FunctionalMixin, self).__init__(*args, **kwargs)  # keras.Model's, functional
        self._init_accumulation(n, options)

    def get_config(self):
        # A plain functional view of the same graph gives the functional
        # config on every Keras: tf-keras >= 2.13 and Keras 3 write one only
        # for classes whose constructor is exactly Functional's.
        plain = self._keras.Model(inputs=self.input, outputs=self.output, name=self.name)
        config = plain.get_config()
        config.update(self._accumulation_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        options = {key: config.pop(key) for key in ("n",) + tuple(OPTIONS) if key in config}
        plain = cls._keras.Model.from_config(config, custom_objects)
        return cls(inputs=plain.input, outputs=plain.output, name=plain.name, **options)


class WrapperMixin(object):
    """Construction, calling, saving and loading of `AccumWrapper` (around a subclassed model)."""

    def __init__(self, model, n, **kwargs):
        options = {key: kwargs.pop(key) for key in OPTIONS if key in kwargs}
        kwargs.setdefault("name", model.name)
        super(WrapperMixin, self).__init__(**kwargs)  # keras.Model's, subclassed
        self.wrapped = model
        self._init_accumulation(n, options)
        # A model built before wrapping gives a built wrapper, so that its
        # weights save and load before any training (Keras refuses both on an
        # unbuilt subclassed model).
        if model.built:
            shape = built_input_shape(model)
            if shape is not None:
                self.build(shape)
            elif is_graph_network(model) is not None:
                # Keras 2 in graph mode records no input shape; its variables
                # are the wrapped model's, which exist.
                self.built = True

    def call(self, inputs, training=None):
        return self.wrapped(inputs, training=training)

    def get_config(self):
        config = {"model": self._keras.utils.serialize_keras_object(self.wrapped), "name": self.name}
        config.update(self._accumulation_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = cls._keras.utils.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)
