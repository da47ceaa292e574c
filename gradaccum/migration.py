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
Each warns once per process with a `DeprecationWarning` that gives the new
spelling.
"""

import warnings

from . import _compat
from ._facade import AccumOptimizer, check_n
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
        use_agc: Only False is supported: adaptive gradient clipping is not
            part of gradaccum. `clip_factor` and `eps` configured it, and are
            ignored as they were without it.
        **kwargs: `inputs`, `outputs` and optionally `name`, as for a
            functional `keras.Model`.

    Example:
        >>> model = GAModelWrapper(n_gradients=4, inputs=model.input, outputs=model.output)
    """
    return _build("GAModelWrapper", "n_gradients", n_gradients, mixed_precision, use_agc, kwargs)


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
    return _build("GradientAccumulateModel", "accum_steps", accum_steps, mixed_precision, use_agc, kwargs)


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


def _build(old_name, n_name, n, mixed_precision, use_agc, kwargs):
    _warn_once(old_name, _MODEL_MESSAGE.format(old=old_name, n=n_name), stacklevel=4)
    caller = "{}({}=...)".format(old_name, n_name)
    n = check_n(n, caller)
    if use_agc:
        raise NotImplementedError(
            "{}: adaptive gradient clipping (use_agc=True) is not part of gradaccum. "
            "Received: use_agc={!r}".format(caller, use_agc))
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
    return AccumModel(n=n, epoch_end=APPLY, **kwargs)


_MODEL_MESSAGE = (
    "{old}({n}=n, inputs=..., outputs=...) is deprecated; write "
    "`model = gradaccum.accumulate(keras.Model(inputs, outputs), n)` instead. "
    "It trains the same (exact) way.")
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
