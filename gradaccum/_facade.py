"""`accumulate(model, n)`: validate, route, delegate. Nothing else lives here."""

import importlib
import numbers

from . import _compat
from ._window import APPLY, EPOCH_END_CHOICES

# Runtime kind -> (route module, or None while the route does not exist yet).
_ROUTES = {
    _compat.KERAS2_EAGER: "gradaccum._keras2",
    _compat.KERAS3: None,
    _compat.GRAPH: None,
}


def accumulate(model, n, epoch_end=APPLY):
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

    Returns:
        A Keras model to compile (if `model` was not) and fit.

    Raises:
        TypeError: `model` is no Keras model, or `n` is no integer.
        ValueError: `n < 1`, or an unknown `epoch_end`.
        NotImplementedError: the runtime (e.g. Keras 3, graph mode) has no
            route yet.

    Example:
        >>> model = accumulate(model, 4)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, batch_size=8)  # trains like batch_size=32
    """
    n = _check_n(n)
    if epoch_end not in EPOCH_END_CHOICES:
        raise ValueError(
            "accumulate: epoch_end must be one of {}. Received: epoch_end={!r}".format(
                EPOCH_END_CHOICES, epoch_end))
    runtime = _compat.runtime_of(model)
    route = _ROUTES[runtime.kind]
    if route is None:
        raise NotImplementedError(
            "accumulate: gradaccum does not support this runtime yet: {}. Supported "
            "now: TensorFlow 2.x with Keras 2 (tf.keras up to TF 2.15, or tf-keras with "
            "TF_USE_LEGACY_KERAS=1) in eager mode.".format(runtime.description))
    return importlib.import_module(route).wrap(model, n, epoch_end)


def _check_n(n):
    # bool is an int subclass, but accumulate(model, True) is surely a mistake.
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(
            "accumulate: n must be an integer >= 1 (micro-batches per update). "
            "Received: n={!r} of type {}".format(n, type(n).__name__))
    if n < 1:
        raise ValueError(
            "accumulate: n must be an integer >= 1 (micro-batches per update). "
            "Received: n={!r}".format(n))
    return int(n)


def register_serializables():
    """Imports the routes whose model classes saved files may name.

    Keras finds a saved `gradaccum>AccumModel` only if the class is registered,
    so `import gradaccum` registers the Keras 2 classes when Keras 2 is present.
    """
    if _compat.keras2_module() is not None:
        importlib.import_module(_ROUTES[_compat.KERAS2_EAGER])
