"""The constructors of the library gradaccum grew from, as deprecated aliases.

Code written for GradientAccumulator builds its model with

    from GradientAccumulator.GAModelWrapper import GAModelWrapper
    model = GAModelWrapper(n_gradients=4, inputs=model.input, outputs=model.output)

and that keeps working: the `GradientAccumulator` package installed with
gradaccum re-exports `GAModelWrapper` from here. Later releases of that
library (PyPI: gradient-accumulator) named it `GradientAccumulateModel(
accum_steps=...)`; that spelling is here too, but not under a top-level
`gradient_accumulator` package, which belongs to that distribution.

Both build the same model as `gradaccum.accumulate`, which also means the same
behaviour: the update is the mean of the micro-batch gradients (not their
sum), exact against the big batch, and a partial window at an epoch's end is
applied. That library's optimizer wrapper, `GradientAccumulateOptimizer(
optimizer, accum_steps)`, is here too, and returns `gradaccum.AccumOptimizer`.

Its BatchNormalization layer and adaptive gradient clipping are here as well:
`AccumBatchNormalization` is Keras' BatchNormalization under that name (an
accumulating model pools every BatchNormalization once per window anyway),
and `replace_batchnorm_layers` swaps a model's for it; `compute_norm`,
`unitwise_norm` and `adaptive_clip_grad` are the AGC functions, and
`GradientAccumulateModel(use_agc=True)` clips the window's mean gradient
once per update (`accumulate(model, n, agc=clip_factor)`).

Each warns once per process with a `DeprecationWarning` that gives the new
spelling.
"""

import warnings

import tensorflow as tf

from . import _compat, _window
from ._facade import AccumOptimizer, check_agc, check_n
from ._window import APPLY

_warned = set()


def GAModelWrapper(n_gradients=1, mixed_precision=False, use_agc=False, clip_factor=0.01, eps=1e-3,
                   **kwargs):
    """Deprecated: `gradaccum.accumulate(keras.Model(inputs, outputs), n_gradients)`.

    Args:
        n_gradients: Micro-batches per update.
        mixed_precision: Accepted, True or False, and not needed: the model
            scales each micro-batch's loss whenever it is compiled with a
            LossScaleOptimizer (the mixed_float16 policy makes one), as the
            old flag asked for.
        use_agc: True clips the window's mean gradient adaptively (AGC), once
            per update, with `clip_factor` and `eps`: as
            `accumulate(model, n, agc=clip_factor, agc_eps=eps)`. (The old
            library clipped each micro-batch's gradient on its own.)
        **kwargs: `inputs`, `outputs` and optionally `name`, as for a
            functional `keras.Model`.

    Example:
        >>> model = GAModelWrapper(n_gradients=4, inputs=model.input, outputs=model.output)
    """
    return _build("GAModelWrapper", "n_gradients", n_gradients, mixed_precision,
                  (use_agc, clip_factor, eps), kwargs)


def GradientAccumulateModel(accum_steps=1, mixed_precision=False, use_agc=False, clip_factor=0.01,
                            eps=1e-3, experimental_distributed_support=False, **kwargs):
    """Deprecated: `gradaccum.accumulate(keras.Model(inputs, outputs), accum_steps)`.

    The arguments are those of `GAModelWrapper`, with `accum_steps` for
    `n_gradients`, and:

    Args:
        experimental_distributed_support: Accepted, True or False, and
            ignored: gradaccum's model trains under a `tf.distribute` strategy
            without being told (each replica accumulates its own gradients, and
            they are all-reduced once per update).

    Example:
        >>> model = GradientAccumulateModel(accum_steps=4, inputs=model.input, outputs=model.output)
    """
    return _build("GradientAccumulateModel", "accum_steps", accum_steps, mixed_precision,
                  (use_agc, clip_factor, eps), kwargs)


def GradientAccumulateOptimizer(optimizer="SGD", accum_steps=1, reduction="MEAN",
                                name="GradientAccumulateOptimizer", **kwargs):
    """Deprecated: `gradaccum.AccumOptimizer(optimizer, accum_steps)`.

    Returns that AccumOptimizer: the wrapped optimizer's iterations, slots and
    learning-rate schedule move once per update, and never on the micro-steps.

    Args:
        optimizer: A Keras optimizer, or its name ("sgd", "adam", ...) as
            `keras.optimizers.get` takes it, with its default settings.
        accum_steps: Micro-batches per update, an integer >= 1.
        reduction: "MEAN" (default): the mean of the micro-batch gradients
            (weighted by `batch_size=` where `apply_gradients` is given it).
            "SUM": their sum. Any case.
        name: The wrapper's name.
        **kwargs: None accepted; a TypeError names what was given.

    Example:
        >>> opt = GradientAccumulateOptimizer(optimizer="adam", accum_steps=4)
    """
    _warn_once("GradientAccumulateOptimizer", _OPTIMIZER_MESSAGE, stacklevel=3)
    caller = "GradientAccumulateOptimizer(accum_steps=...)"
    if kwargs:
        raise TypeError(
            "GradientAccumulateOptimizer: takes optimizer=, accum_steps=, reduction= and "
            "name=; options of the wrapped optimizer (clipnorm=, ...) belong to it. "
            "Received: keyword arguments {}".format(sorted(kwargs)))
    accum_steps = check_n(accum_steps, caller)
    if isinstance(optimizer, str):
        keras = _compat.keras2_module() or _compat.keras3_module()
        optimizer = keras.optimizers.get(optimizer)
    return AccumOptimizer(optimizer, accum_steps, reduction=reduction, name=name)


def _build(old_name, n_name, n, mixed_precision, agc, kwargs):
    _warn_once(old_name, _MODEL_MESSAGE.format(old=old_name, n=n_name), stacklevel=4)
    caller = "{}({}=...)".format(old_name, n_name)
    n = check_n(n, caller)
    use_agc, clip_factor, eps = agc
    if not isinstance(use_agc, bool):
        raise TypeError("{}: use_agc must be True or False. Received: use_agc={!r}".format(caller, use_agc))
    clip_factor, eps = check_agc(clip_factor, eps, caller) if use_agc else (None, 1e-3)
    missing = [key for key in ("inputs", "outputs") if key not in kwargs]
    unknown = sorted(set(kwargs) - {"inputs", "outputs", "name"})
    if missing or unknown:
        raise TypeError(
            "{}: builds a functional model, and takes inputs=, outputs= and optionally "
            "name=. Received: keyword arguments {}".format(caller, sorted(kwargs)))
    # The old library ran on tf.keras; on TF >= 2.16 that is Keras 3 unless
    # TF_USE_LEGACY_KERAS=1 selects tf-keras.
    if _compat.keras2_module() is not None:
        from ._keras2 import AccumModel
    else:
        from ._keras3 import AccumModel
    return AccumModel(n=n, epoch_end=APPLY, agc=clip_factor, agc_eps=eps, **kwargs)


def compute_norm(x, axis, keepdims):
    """Deprecated: the Euclidean norm of `x` over `axis`, as gradient-accumulator's `agc.compute_norm`."""
    _warn_once("compute_norm", _AGC_MESSAGE.format(old="compute_norm"), stacklevel=3)
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=keepdims))


def unitwise_norm(x):
    """Deprecated: the unit-wise norm of AGC, as gradient-accumulator's `agc.unitwise_norm`.

    Scalars and vectors: their norm; rank 2 and 3 (dense and multi-head
    kernels): per column; rank 4 and 5 (conv kernels): per output channel.
    """
    _warn_once("unitwise_norm", _AGC_MESSAGE.format(old="unitwise_norm"), stacklevel=3)
    return _window.unitwise_norm(tf.convert_to_tensor(x))


def adaptive_clip_grad(parameters, gradients, clip_factor=0.01, eps=1e-3):
    """Deprecated: adaptive gradient clipping, as gradient-accumulator's `agc.adaptive_clip_grad`.

    Returns the gradients, each unit scaled down where its norm exceeds
    `clip_factor * max(unitwise_norm(parameter), eps)`. In a model, clip the
    accumulated gradient once per update instead:
    `gradaccum.accumulate(model, n, agc=clip_factor, agc_eps=eps)`.
    """
    _warn_once("adaptive_clip_grad", _AGC_MESSAGE.format(old="adaptive_clip_grad"), stacklevel=3)
    clip_factor, eps = check_agc(clip_factor, eps, "adaptive_clip_grad")
    parameters, gradients = list(parameters), list(gradients)
    if len(parameters) != len(gradients):
        raise ValueError(
            "adaptive_clip_grad: takes one gradient per parameter. Received: {} parameters and {} "
            "gradients".format(len(parameters), len(gradients)))
    return [grad for grad, _ in _window.adaptive_clip(zip(gradients, parameters), clip_factor, eps)]


def _batchnorm_class():
    """AccumBatchNormalization for this process's Keras, registered by that name."""
    keras = _compat.keras2_module() or _compat.keras3_module()

    class AccumBatchNormalization(keras.layers.BatchNormalization):
        """Deprecated: Keras' BatchNormalization, which accumulating models pool anyway.

        gradient-accumulator's layer accumulated its statistics over
        `accum_steps` micro-batches itself. Inside `gradaccum.accumulate(model,
        n)` (or `GradientAccumulateModel`) every BatchNormalization layer
        moves its moving statistics once per window, from the window's pooled
        statistics; this is that layer under the old name, which it saves and
        loads by (import gradaccum.migration before loading).

        Args:
            accum_steps: Kept in the config, and not needed: the model's n
                sets the window.
            momentum, epsilon, trainable, **kwargs: Keras' BatchNormalization's.

        Example:
            >>> x = AccumBatchNormalization(accum_steps=4)(x)
        """

        def __init__(self, accum_steps=1, momentum=0.99, epsilon=1e-3, trainable=True, **kwargs):
            _warn_once("AccumBatchNormalization", _BATCHNORM_MESSAGE, stacklevel=3)
            self.accum_steps = check_n(accum_steps, "AccumBatchNormalization(accum_steps=...)")
            super(AccumBatchNormalization, self).__init__(
                momentum=momentum, epsilon=epsilon, trainable=trainable, **kwargs)

        def get_config(self):
            config = super(AccumBatchNormalization, self).get_config()
            config["accum_steps"] = self.accum_steps
            return config

    keras.utils.get_custom_objects().setdefault("AccumBatchNormalization", AccumBatchNormalization)
    register = getattr(keras.utils, "register_keras_serializable", None)
    return register(package="gradaccum")(AccumBatchNormalization) if register else AccumBatchNormalization


if _compat.keras2_module() is not None or _compat.keras3_module() is not None:
    AccumBatchNormalization = _batchnorm_class()


def replace_batchnorm_layers(model, accum_steps, position="replace"):
    """Deprecated: the model, its BatchNormalization layers replaced, as gradient-accumulator's `utils`.

    That library swapped Keras' BatchNormalization layers for its own, which
    pooled statistics over `accum_steps`. gradaccum's accumulating models do
    that with any BatchNormalization, so this returns a functional copy of
    `model` whose BatchNormalization layers are `AccumBatchNormalization`s
    of the same configuration, holding the same weights (moving statistics
    included); the other layers are shared.

    Args:
        model: A functional or Sequential Keras model.
        accum_steps: An integer >= 1 (the window is the accumulating model's n).
        position: "replace", the only choice the old function had.

    Example:
        >>> model = replace_batchnorm_layers(model, accum_steps=4)
    """
    _warn_once("replace_batchnorm_layers", _BATCHNORM_MESSAGE, stacklevel=3)
    check_n(accum_steps, "replace_batchnorm_layers(accum_steps=...)")
    if position != "replace":
        raise ValueError('replace_batchnorm_layers: position must be "replace". Received: '
                         'position={!r}'.format(position))
    keras = _compat.keras2_module() or _compat.keras3_module()
    base = _compat.batchnorm_base(keras)

    def clone(layer):
        if isinstance(layer, base):
            config = layer.get_config()
            config["accum_steps"] = accum_steps
            return AccumBatchNormalization.from_config(config)
        return layer  # shared, weights and all

    try:
        copy = keras.models.clone_model(model, clone_function=clone)
    except ValueError as err:
        raise ValueError(
            "replace_batchnorm_layers: takes a functional or Sequential model (Keras clones "
            "those). Received: a model of type {} ({})".format(type(model).__name__, err))
    for old, new in zip(model.layers, copy.layers):
        if isinstance(old, base):
            new.set_weights(old.get_weights())
    return copy


_MODEL_MESSAGE = (
    "{old}({n}=n, inputs=..., outputs=...) is deprecated; write "
    "`model = gradaccum.accumulate(keras.Model(inputs, outputs), n)` instead. "
    "It trains the same (exact) way.")
_AGC_MESSAGE = (
    "gradient-accumulator's {old} is deprecated: clip the window's mean gradient once per "
    "update with `gradaccum.accumulate(model, n, agc=clip_factor, agc_eps=eps)` (or "
    "AccumOptimizer(optimizer, n, agc=...)).")
_BATCHNORM_MESSAGE = (
    "gradient-accumulator's AccumBatchNormalization / replace_batchnorm_layers are deprecated: "
    "gradaccum.accumulate(model, n) pools every keras.layers.BatchNormalization's statistics "
    "over the window; use Keras' BatchNormalization.")
_OPTIMIZER_MESSAGE = (
    "GradientAccumulateOptimizer(optimizer, accum_steps=n) is deprecated; write "
    "`opt = gradaccum.AccumOptimizer(optimizer, n)` instead (reduction= as before). "
    "It returns that optimizer already.")


def _warn_once(old_name, message, stacklevel):
    """Warns about `old_name` once per process.

    `stacklevel` counts from this function: 3 for a deprecated function that
    calls it directly, so the warning points at the user's line.
    """
    if old_name in _warned:
        return
    _warned.add(old_name)
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)
