"""BatchNormalization under accumulation: moving statistics once per window, pooled.

In training, a BatchNormalization layer normalizes with its batch's mean and
variance and moves `moving_mean` and `moving_variance` towards them. With
accumulation each micro-batch would move them once, with its own statistics:
n updates of a noisier estimate where the big batch makes one. So while an
accumulating model's training step is traced, each BatchNormalization layer
that trains adds its input's statistics to the window instead (`Window.
add_moments`), and the window's update moves the moving statistics once,
from the window's pooled mean and variance. A layer whose input equals the
big batch's then ends with the big batch's moving statistics.

The forward pass is unchanged: each micro-batch is normalized with its own
statistics, as in every accumulator (the big batch's would need the whole
big batch at once).

In eager mode (Keras 2 and 3) each layer's `call` is stood in for during the
trace: it adds the statistics, calls the layer, and puts back the moving
statistics that the layer's own update moved. In graph mode (Keras 2, eager
disabled) the layers were called when the model was built, so the training
op leaves out their own updates and adds the statistics of their inputs.
"""

import contextlib

import tensorflow as tf

from . import _compat
from ._standins import method, standing_in

POOLED = "pooled"
MICRO = "micro"
CHOICES = (POOLED, MICRO)


def layers_of(model, keras):
    """The BatchNormalization layers in `model` (nested models included)."""
    base = _compat.batchnorm_base(keras)
    return [layer for layer in _compat.sublayers(model) if isinstance(layer, base)]


def check(model, keras, caller="accumulate"):
    """Raises if a BatchNormalization layer of `model` is one whose statistics are not pooled."""
    for layer in layers_of(model, keras):
        refused = _compat.batchnorm_refusal(layer)
        if refused is not None:
            raise NotImplementedError(
                "{}: BatchNormalization layer {!r} has {}, whose statistics gradaccum does not "
                "pool over a window. Keep Keras' per-micro-batch updates with "
                "accumulate(model, n, batchnorm=\"micro\"), or use a plain BatchNormalization. "
                "Received: {}".format(caller, layer.name, refused, refused))


@contextlib.contextmanager
def pooling(model, keras, window):
    """While in this context, each BatchNormalization layer of `model` pools into `window`.

    For the trace of an eager training step (a `tf.function`, or each step
    with `run_eagerly`).
    """
    layers = layers_of(model, keras)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            if _compat.batchnorm_refusal(layer) is None:
                stack.enter_context(standing_in(layer, {"call": _pooling_call(layer, window, calls=[0])}))
            else:
                check(model, keras)  # (a layer added after accumulate(); raises)
        yield


def _pooling_call(layer, window, calls):
    """The stand-in for `layer.call`; `calls` counts its calls in this trace."""
    original = method(layer, "call")
    moments_name = _compat.batchnorm_moments_method(layer)

    @_compat.not_converted
    def call(inputs, *args, **kwargs):
        training = kwargs["training"] if "training" in kwargs else (args[0] if args else None)
        trains = _compat.batchnorm_trains(layer, training)
        if not tf.is_tensor(trains) and not trains:
            return original(inputs, *args, **kwargs)
        call_index = calls[0]
        calls[0] += 1
        if kwargs.get("mask") is not None:
            raise NotImplementedError(
                "accumulate: BatchNormalization layer {!r} got a mask; gradaccum pools unmasked "
                "statistics only. Use accumulate(model, n, batchnorm=\"micro\") to keep Keras' "
                "per-micro-batch updates. Received: a mask of shape {}".format(
                    layer.name, kwargs["mask"].shape))
        # The layer's own moments, taken rather than computed twice: where
        # its Keras computes them in a method (Keras 3, Keras 2's plain
        # kernel), or from what Keras 2's fused kernel moves its averages to.
        moving = [layer.moving_mean, layer.moving_variance]
        before = [tf.identity(tf.convert_to_tensor(variable)) for variable in moving]
        captured, updates = [], {}
        stand_ins = {}
        if moments_name is not None:
            stand_ins[moments_name] = _capturing(method(layer, moments_name), captured.append)
        for name, kind in _compat.batchnorm_update_methods(layer).items():
            def record(variable_and_value, kind=kind):
                updates[id(variable_and_value[0])] = (kind, variable_and_value[1])
            stand_ins[name] = _capturing(method(layer, name), record, arguments=True)
        with standing_in(layer, stand_ins):
            outputs = original(inputs, *args, **kwargs)
        # The layer moved its statistics towards this micro-batch's; the
        # window moves them once per update instead.
        for variable, value in zip(moving, before):
            variable.assign(value)
        # (Where the layer decides by a tensor, its updates ran in a branch of
        # a cond, whose tensors cannot be read out here: computed anew.)
        own = None
        if not tf.is_tensor(trains):
            own = captured[0] if len(captured) == 1 else _from_updates(layer, inputs, moving, before, updates)

        def add():
            with tf.control_dependencies([_add(layer, window, inputs, own, call_index)]):
                return tf.no_op()

        if tf.is_tensor(trains):
            tf.cond(trains, add, tf.no_op)
        else:
            add()
        return outputs

    return call


def _capturing(function, record, arguments=False):
    """`function`, recording its result (or, with `arguments`, its first two arguments)."""
    def capture(*args, **kwargs):
        result = function(*args, **kwargs)
        record(args[:2] if arguments else result)
        return result
    return capture


def _from_updates(layer, inputs, moving, before, updates):
    """The batch's (mean, biased variance) from the fused kernel's updates, or None if not found."""
    found = [updates.get(id(variable)) for variable in moving]
    if None in found or isinstance(layer.momentum, (tf.Tensor, tf.Variable)) or layer.momentum >= 1.0:
        return None  # (computed anew)
    statistics = []
    for (kind, value), old in zip(found, before):
        value = tf.cast(value, tf.float32)
        if kind == "average":  # value = momentum * old + (1 - momentum) * batch's
            value = (value - layer.momentum * tf.cast(old, tf.float32)) / (1.0 - layer.momentum)
        statistics.append(value)
    mean, variance = statistics
    if _compat.batchnorm_bessel(layer):  # the kernel's is the unbiased variance
        count = tf.cast(tf.size(inputs), tf.float32) / tf.cast(tf.size(mean), tf.float32)
        variance = variance * tf.math.divide_no_nan(count - 1.0, count)
    return mean, variance


def _add(layer, window, inputs, moments=None, call=0):
    rank = inputs.shape.rank
    channels = set(axis % rank for axis in tf.nest.flatten(layer.axis))
    axes = [axis for axis in range(rank) if axis not in channels]
    return window.add_moments(layer, inputs, axes, _compat.batchnorm_bessel(layer), moments, call)


def graph_statistics(model, keras, window):
    """Graph mode: (adds, own): the ops that add each training layer's statistics, and its own updates.

    Keras built each layer's moving-average updates when the model was built;
    the training op runs `adds` instead of `own`. A layer counts where its
    updates depend on the model's inputs (not frozen, not called with
    training=False), and its statistics are those of each of its calls whose
    input does.
    """
    depends = _Dependence(model.inputs)
    adds, own = [], set()
    for layer in layers_of(model, keras):
        if not any(depends(_op(update)) for update in layer.updates):
            continue
        own.update(id(update) for update in layer.updates)
        calls = [inputs for inputs in _compat.node_inputs(layer) if depends(inputs.op)]
        for call, inputs in enumerate(calls):
            adds.append(_add(layer, window, inputs, call=call))
    return adds, own


def _op(tensor_or_op):
    return getattr(tensor_or_op, "op", tensor_or_op)


class _Dependence(object):
    """Whether an op of the graph depends on `sources` (through data or control inputs)."""

    def __init__(self, sources):
        self._known = {tensor.op: True for tensor in sources}

    def __call__(self, op):
        stack, entered = [op], set()
        while stack:  # depth first, without recursion (graphs are deep)
            top = stack[-1]
            if top in self._known:
                stack.pop()
                continue
            parents = [tensor.op for tensor in top.inputs] + list(top.control_inputs)
            if top not in entered:  # first visit: its parents first
                entered.add(top)
                stack.extend(parent for parent in parents
                             if parent not in self._known and parent not in entered)
                continue
            # (A parent still unknown here lies on a cycle, a while loop's: no.)
            self._known[top] = any(self._known.get(parent, False) for parent in parents)
            stack.pop()
        return self._known[op]
