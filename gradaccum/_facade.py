"""`accumulate(model, n)`: validate, route, delegate. Nothing else lives here."""

import importlib

from . import _compat
from ._window import APPLY, check_epoch_end, check_n

# Runtime kind -> route module. Keras 2 models train in eager mode through
# their train_step, and in graph mode (TF 1.x, or eager disabled) through the
# graph route's in-graph accumulation; one class serves both, so a model saved
# in one mode loads in the other. Keras 3 has its own train_step route.
_ROUTES = {
    _compat.KERAS2_EAGER: "gradaccum._keras2",
    _compat.GRAPH: "gradaccum._keras2",
    _compat.KERAS3: "gradaccum._keras3",
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
        NotImplementedError: a Keras 3 model on a backend other than TensorFlow.

    Example:
        >>> model = accumulate(model, 4)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, batch_size=8)  # trains like batch_size=32
    """
    n = check_n(n, "accumulate")
    check_epoch_end(epoch_end, "accumulate")
    runtime = _compat.runtime_of(model)
    return importlib.import_module(_ROUTES[runtime.kind]).wrap(model, n, epoch_end)


def register_serializables():
    """Imports the routes whose model classes saved files may name.

    Keras finds a saved `gradaccum>AccumModel` only if the class is registered,
    so `import gradaccum` registers the classes of each Keras this process uses.
    """
    if _compat.keras2_module() is not None:
        importlib.import_module("gradaccum._keras2")
    if _compat.keras3_module() is not None:
        importlib.import_module("gradaccum._keras3")
