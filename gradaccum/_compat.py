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

# The oldest Keras 3 gradaccum is tested exact with. Measured with the test
# suite (README, "Supported versions"): on Keras 3.3 accumulate() under
# MirroredStrategy trains wrong and AccumOptimizer cannot be made; on 3.3 and
# 3.5 a Sequential model is refused by Keras' own `input`, and a wrapped
# subclassed model evaluates to 0.0. TF 2.16-2.17 take Keras 3.6 as well.
MIN_KERAS3 = Version("3.6.0")

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
        check_keras3_version(keras, "accumulate")
        kind = KERAS3
    elif IS_TF1 or not eager:
        kind = GRAPH
    else:
        kind = KERAS2_EAGER
    return Runtime(kind, keras, description)


def check_keras3_version(keras, caller):
    """Raises for a Keras 3 older than MIN_KERAS3: refused rather than trained wrong."""
    installed = Version(keras.__version__)
    if installed < MIN_KERAS3:
        raise NotImplementedError(
            "{}: gradaccum needs Keras >= {} when Keras 3 is used: older Keras 3 releases "
            "train some models wrongly with accumulation. Upgrade it (pip install "
            "'keras>={}'; TensorFlow 2.16 and later accept it), or use Keras 2 through "
            "tf-keras (pip install tf-keras, TF_USE_LEGACY_KERAS=1). Received: Keras {} "
            "with TensorFlow {}".format(caller, MIN_KERAS3, MIN_KERAS3, keras.__version__,
                                         tf.__version__))


def _short_repr(obj, limit=80):
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def optimizer_kind(optimizer):
    """Which route wraps `optimizer`: GRAPH, KERAS2_EAGER or KERAS3; TypeError for others.

    GRAPH for `tf.compat.v1.train` optimizers (whatever the mode: their
    wrapper builds a graph op), KERAS2_EAGER for Keras 2 optimizers (both the
    OptimizerV2 family and Keras >= 2.9's new one), KERAS3 for Keras 3's.
    """
    if isinstance(optimizer, tf.compat.v1.train.Optimizer):
        return GRAPH
    keras3 = keras3_module()
    if keras3 is not None and isinstance(optimizer, keras3.optimizers.Optimizer):
        check_keras3_version(keras3, "AccumOptimizer")
        return KERAS3
    keras2 = keras2_module()
    if keras2 is not None and isinstance(optimizer, keras2_optimizer_bases(keras2)):
        return KERAS2_EAGER
    raise TypeError(
        "AccumOptimizer: optimizer must be a tf.compat.v1.train.Optimizer or a Keras "
        "optimizer (Keras 2, tf-keras or Keras 3, e.g. keras.optimizers.Adam(1e-3), not a "
        "name such as 'adam'). Received: optimizer={} of type {}".format(_short_repr(optimizer),
                                           type(optimizer).__module__ + "." + type(optimizer).__qualname__))


def keras2_optimizer_bases(keras):
    """The optimizer base classes of a Keras 2: (OptimizerV2, the new Optimizer if it has one).

    OptimizerV2 is `keras.optimizers.Optimizer` up to 2.10 and the base of
    `keras.optimizers.legacy.Optimizer` after; the new optimizer is
    `keras.optimizers.experimental.Optimizer` in 2.9-2.10 and
    `keras.optimizers.Optimizer` from 2.11. Told apart by what they can do:
    OptimizerV2 has slots (`add_slot`), the new one does not.
    """
    optimizers = keras.optimizers
    candidates = [getattr(namespace, "Optimizer", None) for namespace in (
        optimizers, getattr(optimizers, "legacy", None), getattr(optimizers, "experimental", None))]
    candidates = [cls for cls in candidates if isinstance(cls, type)]
    v2 = next(base for cls in candidates if hasattr(cls, "add_slot")
              for base in cls.__mro__ if "add_slot" in vars(base))
    new = [cls for cls in candidates if not hasattr(cls, "add_slot")]
    return (v2,) + tuple(new[:1])


def not_converted(function):
    """Marks gradaccum's code that a user's `tf.function` calls as not for AutoGraph.

    It is written for graphs already (explicit `tf.cond`), so converting it
    gains nothing, and TF 2.16's AutoGraph confused its functions with one
    another ("tf__keras3_module() takes 0 positional arguments").
    """
    return tf.autograph.experimental.do_not_convert(function)


def no_automatic_dependency_tracking(method):
    """TensorFlow's decorator: attributes set in `method` are not tracked automatically."""
    return tf.__internal__.tracking.no_automatic_dependency_tracking(method)


def delegating_trackable_mixin():
    """TensorFlow's mixin that makes a wrapper checkpoint as the object it wraps."""
    return tf.__internal__.tracking.DelegatingTrackableMixin


def track(parent, child, name):
    """Makes `tf.train.Checkpoint` save `child` as `parent`'s dependency `name`."""
    parent._track_trackable(child, name=name, overwrite=True)


# Private attributes of Keras that gradaccum reads, each behind one helper
# here, each with a test in tests/test_compat.py that runs on every Keras of
# the matrix: a Keras release that moves one fails that test, by name.

def is_graph_network(model):
    """Keras 2's own word on whether `model` is functional (a graph of layers); None on Keras 3."""
    flag = getattr(model, "_is_graph_network", None)
    return None if flag is None else bool(flag)


def built_input_shape(model):
    """The input shape a built model was built for, batch dimension None; None if unknown.

    Keras 3 and Keras >= 2.13 say it in `get_build_config()`; older Keras 2
    records the input spec it was first called with (`_saved_model_inputs_spec`).
    Only a single input's shape is returned (nested inputs: None).
    """
    shape = None
    config = model.get_build_config() if hasattr(model, "get_build_config") else None
    if config and "input_shape" in config:
        shape = config["input_shape"]
    else:
        spec = getattr(model, "_saved_model_inputs_spec", None)
        shape = getattr(spec, "shape", None)
    try:
        dims = tf.TensorShape(shape).as_list() if shape is not None else None
    except (TypeError, ValueError):  # nested (several inputs)
        return None
    return None if not dims else tuple([None] + dims[1:])


def keras2_compiled_strategy(model):
    """The strategy a Keras 2 model was compiled under (graph-mode Keras records it), or None."""
    return getattr(model, "_distribution_strategy", None)


def keras2_compile_args(model, keras):
    """The arguments a Keras 2 model was compiled with, or None if it was not compiled."""
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
        raise _unreadable_compile_args(keras.__name__, err) from err
    steps = getattr(model, "_steps_per_execution", None)
    if steps is not None:
        args["steps_per_execution"] = int(steps.numpy())
    jit_compile = getattr(model, "_jit_compile", None)
    if jit_compile is not None:
        args["jit_compile"] = jit_compile
    return args


def keras3_compile_args(model, keras):
    """The arguments a Keras 3 model was compiled with (its optimizer the instance), or None."""
    if not getattr(model, "compiled", False):
        return None
    try:
        args = dict(model._compile_config.config)
    except AttributeError as err:
        raise _unreadable_compile_args("Keras {}".format(keras.__version__), err) from err
    args["optimizer"] = model.optimizer  # the instance, with its state
    return args


def _unreadable_compile_args(keras_name, err):
    return RuntimeError(
        "accumulate: cannot read the compile() arguments of this already compiled "
        "model on {} ({}). Call accumulate(model, n) before model.compile(...).".format(keras_name, err))


def keras3_after_backup_saves(backup, after):
    """Calls `after()` each time Keras 3's BackupAndRestore `backup` has saved its files.

    Keras 3.6-3.15 save in `BackupAndRestore._save_model()`, called at the
    epoch's end or every `save_freq` batches (the count is kept in private
    state, so the save itself is what is hooked, on this one instance). A
    second fit with the same callback replaces the first fit's hook rather
    than stacking another on it.
    """
    save = getattr(backup, "_gradaccum_unhooked_save", None) or backup._save_model
    backup._gradaccum_unhooked_save = save

    def save_then_after(*args, **kwargs):
        result = save(*args, **kwargs)
        after()
        return result

    backup._save_model = save_then_after


def keras2_loads_assets():
    """Whether Keras 2's saving_lib can load back a `.keras` file that holds assets.

    Not on Python >= 3.12 (tf-keras 2.21, measured): its `load_model` extracts
    the archive for the assets while h5py still reads the weights from an open
    member of the same zip file, and the read then ends early (EOFError).
    """
    return sys.version_info < (3, 12)


# BatchNormalization (see `_batchnorm`): what Keras keeps privately about a
# layer's training and its moving variance.

def sublayers(model):
    """Every layer inside `model`, nested models' layers included, each once (not `model`)."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    found, seen = [], set()  # (Keras without _flatten_layers: walk the public lists)
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
            stack.extend(getattr(layer, "layers", []))
    return found


def batchnorm_base(keras):
    """The class every BatchNormalization layer of this Keras derives from.

    Keras 2's v1 and v2 BatchNormalization (and SyncBatchNormalization)
    share `BatchNormalizationBase`; Keras 3 has one class.
    """
    classes = [cls for cls in keras.layers.BatchNormalization.__mro__
               if "BatchNormalization" in cls.__name__]
    return classes[-1]


def batchnorm_trains(layer, training):
    """Whether `layer` updates its moving statistics in a call given `training`.

    Keras 2 decides in `_get_training_value` (a frozen layer runs in
    inference mode under TF 2 behaviour, not under TF 1's); the result may
    be a tensor (the learning phase). Keras 3: `training and layer.trainable`.
    """
    decide = getattr(layer, "_get_training_value", None)
    if decide is not None:
        return decide(training)
    return bool(training) and layer.trainable


def batchnorm_moments_method(layer):
    """The name of the method that computes `layer`'s batch mean and variance, or None.

    Keras 3 and Keras 2's plain (non-fused) kernel call `_moments`, which
    returns the (mean, biased variance) over the reduced axes; Keras 2's
    fused kernel computes them inside its op.
    """
    if getattr(layer, "fused", False) or not callable(getattr(type(layer), "_moments", None)):
        return None
    return "_moments"


def batchnorm_update_methods(layer):
    """{method name: what its `value` is} for the methods through which `layer` moves its statistics.

    Keras 2's fused kernel hands its outputs to `_assign_moving_average(
    variable, value, momentum, inputs_size)`, `value` the batch's statistic
    (graph mode, XLA), or to `_assign_new_value(variable, value)`, `value`
    the moved average the kernel computed itself (eager TF 2). Empty where the
    layer computes its moments in a method (see `batchnorm_moments_method`).
    """
    if not getattr(layer, "fused", False):
        return {}
    return {name: kind for name, kind in (("_assign_moving_average", "batch"), ("_assign_new_value", "average"))
            if callable(getattr(type(layer), name, None))}


def batchnorm_bessel(layer):
    """Whether `layer` moves its moving variance with the unbiased (Bessel-corrected) variance.

    Keras 2's fused kernel does (the op's batch variance is the unbiased
    one, which Keras keeps unless `_bessels_correction_test_only` is off);
    its non-fused path and Keras 3 use the biased variance.
    """
    return bool(getattr(layer, "fused", False)) and getattr(layer, "_bessels_correction_test_only", True)


def batchnorm_refusal(layer):
    """What about `layer` gradaccum does not pool, as "name=value", or None."""
    if getattr(layer, "renorm", False):
        return "renorm=True"
    if getattr(layer, "virtual_batch_size", None) is not None:
        return "virtual_batch_size={}".format(layer.virtual_batch_size)
    if getattr(layer, "synchronized", False):
        return "synchronized=True"
    if "SyncBatchNormalization" in [cls.__name__ for cls in type(layer).__mro__]:
        return "a SyncBatchNormalization"
    return None


def node_inputs(layer):
    """The input tensor of each call of `layer` in a graph-mode Keras graph, in order."""
    inputs = []
    for index in range(len(layer._inbound_nodes)):
        inputs.append(layer.get_input_at(index))
    return inputs
