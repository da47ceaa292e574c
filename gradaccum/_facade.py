"""The public calls: validate, route, delegate. Nothing else lives here.

`accumulate(model, n)` wraps a model, `AccumOptimizer(optimizer, n)` an
optimizer; each checks its arguments, asks `_compat` which route applies, and
hands over to that route's module.
"""

import abc
import importlib
import math
import numbers

from . import _compat
from ._batchnorm import CHOICES as BATCHNORM_CHOICES, POOLED
from ._window import APPLY, EPOCH_END_CHOICES, MEAN, REDUCTIONS

# Runtime kind -> route module, relative to this package (`_route`). Keras 2
# models train in eager mode through their train_step, and in graph mode (TF
# 1.x, or eager disabled) through the graph route's in-graph accumulation; one
# class serves both, so a model saved in one mode loads in the other. Keras 3
# has its own train_step route.
_ROUTES = {
    _compat.KERAS2_EAGER: "._keras2",
    _compat.GRAPH: "._keras2",
    _compat.KERAS3: "._keras3",
}


def _route(name):
    """The route module `name` ("._keras3"), of this package.

    Relative, so that a copy of the package under another name (as
    tools/ab.py imports a past revision beside the working tree's) runs its
    own routes, not the installed package's.
    """
    return importlib.import_module(name, __package__)


def accumulate(model, n, epoch_end=APPLY, skip_nonfinite=False, batchnorm=POOLED, agc=None, agc_eps=1e-3):
    """Makes `model` train with gradient accumulation over `n` micro-batches.

    Training the returned model with batches of size `b` applies the optimizer
    once every `n` batches, with the size-weighted mean of their gradients: the
    weights equal those of training `model` with batches of `n * b`. The
    optimizer's iterations, slots and learning-rate schedule move once per
    update. The returned model shares the given model's layers and weights, and
    keeps its compile() settings if it was already compiled.

    Args:
        model: A Keras model (functional, Sequential or subclassed).
        n: Micro-batches per update, an integer >= 1. `n=1` is plain training.
        epoch_end: What `fit` does with a partial window at the end of an
            epoch (data size not a multiple of `n * batch_size`). "apply"
            (default) applies it as one update weighted by its true sample
            count, exactly like big-batch training's short last batch.
            "carry" keeps it open into the next epoch, for data streamed with
            `steps_per_epoch`.
        skip_nonfinite: False (default): a window whose gradients hold an inf
            or a nan is applied as it is, as the big batch's would be. True:
            such a window is skipped whole (no update; the optimizer's state
            does not move) and counted in the logs as `skipped`. For float32
            training: under mixed precision the LossScaleOptimizer skips
            overflowing windows itself.
        batchnorm: "pooled" (default): each BatchNormalization layer moves its
            moving mean and variance once per window, with the statistics of
            the window's micro-batches pooled (the big batch's, where the
            layer's inputs are the big batch's). "micro": Keras' own update
            on every micro-batch, with that micro-batch's statistics.
        agc: Adaptive gradient clipping (NFNets): a clip factor (e.g. 0.01)
            applied unit-wise to the window's mean gradient, once per update,
            as it would be to the big batch's gradient. None (default): off.
        agc_eps: AGC's floor on the weights' unit-wise norm (default 1e-3).

    Returns:
        A Keras model to compile (if `model` was not) and fit.

    Raises:
        TypeError: `model` is no Keras model, `n` is no integer, or
            `skip_nonfinite` no bool.
        ValueError: `n < 1`, an unknown `epoch_end` or `batchnorm`, or an
            `agc` or `agc_eps` that is no positive number.
        NotImplementedError: a Keras 3 model on a backend other than
            TensorFlow, or (with batchnorm="pooled") a BatchNormalization
            layer with renorm, virtual_batch_size or synchronized statistics.

    Example:
        >>> model = accumulate(model, 4)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, batch_size=8)  # trains like batch_size=32
    """
    n = check_n(n, "accumulate")
    check_choice(epoch_end, "epoch_end", EPOCH_END_CHOICES, "accumulate")
    check_flag(skip_nonfinite, "skip_nonfinite", "accumulate")
    check_choice(batchnorm, "batchnorm", BATCHNORM_CHOICES, "accumulate")
    agc, agc_eps = check_agc(agc, agc_eps, "accumulate")
    runtime = _compat.runtime_of(model)
    return _route(_ROUTES[runtime.kind]).wrap(
        model, n, epoch_end=epoch_end, skip_nonfinite=skip_nonfinite, batchnorm=batchnorm, agc=agc,
        agc_eps=agc_eps)


# Optimizer kind -> the module whose `wrap` makes its AccumOptimizer.
_OPTIMIZER_ROUTES = {
    _compat.GRAPH: "._graph",
    _compat.KERAS2_EAGER: "._keras2_optimizer",
    _compat.KERAS3: "._keras3_optimizer",
}


class AccumOptimizer(metaclass=abc.ABCMeta):
    """Wraps any TensorFlow optimizer; applies it once every `n` micro-batches.

    Each `apply_gradients` call adds one micro-batch's gradients; the call
    that completes a window of `n` applies their size-weighted mean with the
    wrapped optimizer. Its iterations, slots, learning-rate schedule,
    clipping, weight decay and EMA move once per update, on the accumulated
    gradient, so training equals training with `n`-times bigger batches.

    - Keras optimizers (Keras 2, tf-keras, Keras 3): for custom training
      loops (eager, `tf.function`, `jit_compile`, `strategy.run`) and for
      `model.compile(optimizer=AccumOptimizer(...))`, including models with
      their own `train_step`. `flush()` applies a partial window at the end
      of the data. The window is saved by `tf.train.Checkpoint(optimizer=opt)`.
    - `tf.compat.v1.train` optimizers: graph mode (TF 1.x Session scripts,
      Estimators, TF 2.x with eager disabled); see `_graph.AccumOptimizer`.

    Args:
        optimizer: The optimizer that applies the updates.
        n: Micro-batches per update, an integer >= 1.
        reduction: Keras optimizers only. "mean" (default): the size-weighted
            mean, the big batch's gradient. "sum": the weighted sum.
        skip_nonfinite: True skips a window whose gradients hold an inf or a
            nan, whole, and counts it in `opt.skipped` (see `accumulate`).
        agc, agc_eps: Adaptive gradient clipping of the window's mean, once
            per update (see `accumulate`).
        **kwargs: `name`; for `tf.compat.v1.train` optimizers also
            `micro_batch_size`.

    Raises:
        TypeError: `optimizer` is no optimizer, or `n` no integer.
        ValueError: `n < 1`, an optimizer that accumulates already, or an
            unknown `reduction`.

    Example:
        >>> opt = gradaccum.AccumOptimizer(keras.optimizers.Adam(1e-3), 4)
        >>> for x, y in micro_batches:
        ...     with tf.GradientTape() as tape:
        ...         loss = loss_fn(y, model(x, training=True))
        ...     grads = tape.gradient(loss, model.trainable_variables)
        ...     opt.apply_gradients(zip(grads, model.trainable_variables), batch_size=len(x))
        >>> opt.flush()  # the last, partial window
    """

    def __new__(cls, optimizer, n, **kwargs):
        if isinstance(optimizer, AccumOptimizer):
            raise ValueError(
                "AccumOptimizer: the optimizer already accumulates (n={}); wrapping it "
                "again would multiply the windows. Received: optimizer={!r}".format(
                    optimizer.n, optimizer))
        n = check_n(n, "AccumOptimizer")
        kind = _compat.optimizer_kind(optimizer)
        if kind != _compat.GRAPH and not _compat.executing_eagerly():
            raise TypeError(
                "AccumOptimizer: in graph mode (TF 1.x, or eager execution disabled) the "
                "optimizer must be a tf.compat.v1.train.Optimizer (e.g. "
                "tf.compat.v1.train.AdamOptimizer(1e-3)); Keras optimizers are wrapped in eager "
                "mode. Received: optimizer={} of type {}".format(
                    type(optimizer).__name__, type(optimizer).__module__))
        reduction = check_reduction(kwargs.pop("reduction", MEAN), "AccumOptimizer")
        check_flag(kwargs.get("skip_nonfinite", False), "skip_nonfinite", "AccumOptimizer")
        kwargs["agc"], kwargs["agc_eps"] = check_agc(
            kwargs.get("agc"), kwargs.get("agc_eps", 1e-3), "AccumOptimizer")
        if kind != _compat.GRAPH:
            kwargs["reduction"] = reduction
        elif reduction != MEAN:
            raise ValueError(
                "AccumOptimizer: reduction={!r} is for Keras optimizers; a tf.compat.v1.train "
                "optimizer's window always applies the mean. Received: reduction={!r} with "
                "optimizer {}".format(reduction, reduction, type(optimizer).__name__))
        route = _route(_OPTIMIZER_ROUTES[kind])
        wrapped = route.wrap(optimizer, n, **kwargs)
        AccumOptimizer.register(type(wrapped))
        return wrapped


def check_n(n, caller):
    """`n` as an int, or a clear error naming `caller` and what it received."""
    # bool is an int subclass, but accumulate(model, True) is surely a mistake.
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(
            "{}: n must be an integer >= 1 (micro-batches per update). "
            "Received: n={!r} of type {}".format(caller, n, type(n).__name__))
    if n < 1:
        raise ValueError(
            "{}: n must be an integer >= 1 (micro-batches per update). "
            "Received: n={!r}".format(caller, n))
    return int(n)


def check_flag(value, name, caller):
    """`value` if it is a bool, or a clear error naming the argument."""
    if not isinstance(value, bool):
        raise TypeError("{}: {} must be True or False. Received: {}={!r} of type {}".format(
            caller, name, name, value, type(value).__name__))
    return value


def check_choice(value, name, choices, caller):
    """`value` if it is one of `choices`, or a clear error naming the argument."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError("{}: {} must be one of {}. Received: {}={!r}".format(
            caller, name, choices, name, value))
    return value


def check_agc(agc, agc_eps, caller):
    """(clip factor or None, eps) as floats, or a clear error: both must be positive numbers."""
    for name, value, allow_none in (("agc", agc, True), ("agc_eps", agc_eps, False)):
        if value is None and allow_none:
            continue
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value <= 0):
            raise ValueError(
                "{}: {} must be a positive number{}. Received: {}={!r}".format(
                    caller, name, " (the clip factor, e.g. 0.01) or None" if allow_none else "",
                    name, value))
    return (None if agc is None else float(agc)), float(agc_eps)


def check_reduction(reduction, caller):
    """"mean" or "sum" (any case, as gradient-accumulator spells them), or a clear error."""
    value = reduction.lower() if isinstance(reduction, str) else reduction
    if value not in REDUCTIONS:
        raise ValueError("{}: reduction must be one of {}. Received: reduction={!r}".format(
            caller, REDUCTIONS, reduction))
    return value


class AccumulationScheduler(object):
    """A batch-size schedule: sets the model's n at each epoch's start, like LearningRateScheduler.

    Pass it in `callbacks` to `fit` of a model that `accumulate` returned; the
    big batch is n * batch_size, so a schedule of n is a schedule of the
    batch size (a warm-up, or "increase the batch size instead of decaying
    the learning rate"). n is a variable of the training graph: a change
    traces nothing again, and the optimizer (iterations, slots, learning-rate
    schedule) carries on.

        >>> model = accumulate(model, 8)  # the largest n the schedule uses
        >>> warm_up = AccumulationScheduler(lambda epoch, n: min(8, 2 ** epoch))
        >>> model.fit(x, y, batch_size=16, epochs=6, callbacks=[warm_up])

    Args:
        schedule: `schedule(epoch, n)` (epoch from 0, n the current one)
            returns the epoch's n, an integer >= 1.
        verbose: 1 prints each epoch's n.
    """

    def __init__(self, schedule, verbose=0):
        if not callable(schedule):
            raise TypeError(
                "AccumulationScheduler: schedule must be a function schedule(epoch, n) -> n. "
                "Received: schedule={!r}".format(schedule))
        if verbose not in (0, 1):
            raise ValueError("AccumulationScheduler: verbose must be 0 or 1. Received: verbose={!r}"
                             .format(verbose))
        self.schedule = schedule
        self.verbose = verbose

    def n_for(self, epoch, n):
        """The schedule's n for `epoch` (from 0), checked."""
        value = self.schedule(epoch, n)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(
                "AccumulationScheduler: schedule(epoch={}, n={}) must return an integer >= 1. "
                "Received: {!r}".format(epoch, n, value))
        return int(value)

    # An accumulating model's fit replaces the scheduler with a callback of
    # its own Keras. Any other model's fit treats it as a callback: it sets
    # its model or looks up its hooks (Keras 3.6 does that first), and gets
    # told why not.

    def set_model(self, model):
        raise TypeError(
            "AccumulationScheduler: pass it to fit of a model that gradaccum.accumulate "
            "returned; it sets that model's n. Received: a model of type {}".format(
                type(model).__name__))

    def __getattr__(self, name):
        if name.startswith(("on_", "set_", "_implements_")):
            raise TypeError(
                "AccumulationScheduler: pass it to fit of a model that gradaccum.accumulate "
                "returned; it sets that model's n. Received: a fit that asked it for {!r}, as "
                "of a Keras callback".format(name))
        raise AttributeError(name)


def register_serializables():
    """Imports the routes whose model classes saved files may name.

    Keras finds a saved `gradaccum>AccumModel` (or AccumOptimizer) only if the
    class is registered, so `import gradaccum` registers the classes of each
    Keras this process uses.
    """
    if _compat.keras2_module() is not None:
        _route("._keras2")
        if not _compat.IS_TF1:
            _route("._keras2_optimizer")
    if _compat.keras3_module() is not None:
        _route("._keras3")
        _route("._keras3_optimizer")
