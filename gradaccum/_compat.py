"""Everything gradaccum knows about TensorFlow and Keras versions, in one place.

No other module reads a version string. Facts that cannot change in a process
(the TensorFlow release, what `tf.keras` resolves to) are computed once, at
import or on first use. Eager versus graph mode is read when `accumulate` is
called, because TF 1.x-style code routinely calls
`tf.compat.v1.disable_eager_execution()` after its imports.

Capabilities are probed first; release numbers are compared only as a
fallback, with `packaging`, so that `2.16.0rc0` counts as 2.16 and 1.15 never
looks newer than 1.9.
"""

import collections
import functools
import re
import sys

from packaging.version import InvalidVersion, Version

try:
    import tensorflow as tf
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gradaccum needs TensorFlow, and `import tensorflow` failed: {}. "
        "Install TensorFlow with `pip install tensorflow` (or `tensorflow-cpu`; "
        "for Keras 2 on TensorFlow >= 2.16 also `pip install tf-keras`), or "
        "install gradaccum with an extra: `pip install gradaccum[tensorflow]`."
        .format(err)
    ) from err

TF_VERSION = Version(tf.__version__)
TF_RELEASE = TF_VERSION.release
IS_TF1 = TF_RELEASE[0] < 2

# The runtimes gradaccum distinguishes. Each maps to one route (see _facade).
KERAS2_EAGER = "keras2-eager"  # TF 2.x, Keras 2, eager: train_step accumulates
GRAPH = "graph"  # TF 1.x, or TF 2.x with eager disabled: accumulation in the graph
KERAS3 = "keras3"  # TF 2.16+, Keras 3 (TensorFlow backend): train_step accumulates

Runtime = collections.namedtuple("Runtime", ["kind", "keras", "description"])


def executing_eagerly():
    """Whether Keras models built now run eagerly (TF2 default) or in a graph."""
    probe = getattr(tf.compat.v1, "executing_eagerly_outside_functions", None)
    return bool(probe()) if probe is not None else tf.executing_eagerly()


def keras_major(module):
    """2 for Keras 2 (tf.keras <= 2.15, tf-keras), 3 for Keras 3."""
    # Keras 3 is the one with a backend-agnostic `ops` namespace.
    if hasattr(module, "ops") and hasattr(module.ops, "convert_to_tensor"):
        return 3
    version = getattr(module, "__version__", None)
    if version is None:
        return 2
    try:
        return Version(version).release[0]
    except InvalidVersion:  # TF 1.x's Keras says "2.2.4-tf"
        return int(re.match(r"\d+", version).group())


@functools.lru_cache(maxsize=None)
def keras2_module():
    """The public API module of this process's Keras 2, or None.

    That is `tf.keras` where it is Keras 2 (TF 1.x, TF 2.x before 2.16, or
    later with `TF_USE_LEGACY_KERAS=1`), else the tf-keras package if the
    program has already imported it. gradaccum never imports tf-keras on its
    own: a Keras 3 user should not pay for a second Keras.
    """
    if keras_major(tf.keras) == 2:
        return tf.keras
    return sys.modules.get("tf_keras")


def keras3_module():
    """The Keras 3 package, if this process uses it, else None.

    That is `keras` where `tf.keras` resolves to it (TF >= 2.16 without
    `TF_USE_LEGACY_KERAS=1`), or where the program imported it itself. Not
    cached: a program may import Keras 3 after gradaccum.
    """
    if IS_TF1:
        return None
    package = sys.modules.get("keras")
    if package is None and keras2_module() is None:
        import keras as package  # what tf.keras is here: imported already, by tf.keras
    if package is not None and keras_major(package) >= 3:
        return package
    return None


def variable_key(variable):
    """A hashable stand-in for a variable.

    `ref()` for TensorFlow variables (TF 2.1+; `experimental_ref()` before);
    a Keras 3 variable has neither, and is keyed by identity (the model
    holds it for as long as the key is used).
    """
    if not isinstance(variable, tf.Variable):
        return ("keras3", id(variable))
    return variable.ref() if _HAS_REF else variable.experimental_ref()


_HAS_REF = hasattr(tf.Variable, "ref")


def loss_scale_optimizer_classes(keras):
    """The LossScaleOptimizer classes this Keras has (TF 1.15 keeps it under `experimental`)."""
    mixed_precision = getattr(keras, "mixed_precision", None)
    found = []
    for namespace in (mixed_precision, getattr(mixed_precision, "experimental", None)):
        cls = getattr(namespace, "LossScaleOptimizer", None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _keras_of(model):
    """(public Keras module, version string) of the Keras that built `model`, or None."""
    for cls in type(model).__mro__:
        if cls.__name__ != "Model":
            continue
        root = cls.__module__.split(".", 1)[0]
        package = sys.modules.get(root)
        if root == "tensorflow":  # TF 1.x and TF 2.0-2.5 ship Keras inside TF.
            return tf.keras, tf.keras.__version__
        if root == "tf_keras" and package is not None:
            return package, getattr(package, "__version__", "2")
        if root == "keras" and package is not None:
            # Keras 2's package root is internal; its public API is tf.keras.
            public = package if keras_major(package) >= 3 else tf.keras
            return public, package.__version__
    return None


def runtime_of(model):
    """Which runtime `model` lives in: a `Runtime`, or TypeError for non-Keras objects."""
    found = _keras_of(model)
    if found is None:
        raise TypeError(
            "accumulate: model must be a Keras model (a `tf.keras.Model`, "
            "`keras.Model` or `tf_keras.Model`: functional, Sequential or "
            "subclassed). Received: model={!r} of type {}.".format(
                _short_repr(model), type(model).__module__ + "." + type(model).__qualname__))
    keras, keras_version = found
    major = keras_major(keras)
    eager = executing_eagerly()
    description = "TensorFlow {} with Keras {} ({}), {} mode".format(
        tf.__version__, keras_version, keras.__name__, "eager" if eager else "graph")
    if major >= 3:
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise NotImplementedError(
                "accumulate: gradaccum accumulates with TensorFlow, so on Keras 3 it needs "
                "the TensorFlow backend. Received: a model of Keras {} with the {!r} "
                "backend (set KERAS_BACKEND=tensorflow before importing keras)".format(
                    keras_version, backend))
        kind = KERAS3
    elif IS_TF1 or not eager:
        kind = GRAPH
    else:
        kind = KERAS2_EAGER
    return Runtime(kind, keras, description)


def _short_repr(obj, limit=80):
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
