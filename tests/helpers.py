"""Keras models and data for the differential tests (oracles: see oracles.py).

One suite for both Keras flavours: `keras` is what this runtime's `tf.keras`
is (Keras 2: tf.keras up to TF 2.15, or tf-keras with TF_USE_LEGACY_KERAS=1;
Keras 3 after), and tests that need a capability skip by capability.
"""

import inspect
import os

import numpy as np
import pytest

from gradaccum import _compat
from oracles import (  # noqa: F401 - the Keras tests' one import for both
    DISCRIMINATION, REL_TOL, assert_discriminates, assert_same_training, change_error, differential, record)

keras = _compat.keras2_module() or _compat.keras3_module()
if keras is None:
    pytest.skip("no Keras in this runtime (TensorFlow {})".format(_compat.TF_VERSION),
                allow_module_level=True)
KERAS3 = _compat.keras_major(keras) >= 3
keras3_only = pytest.mark.skipif(not KERAS3, reason="a Keras 3 feature; this is Keras 2")


def require_mode(eager):
    """Skips the calling test module unless this pytest run is in that mode.

    TF 2.x environments run the suite twice: eager, then with --graph-mode
    (eager disabled, as TF1-style scripts do); TF 1.x runs it in graph mode.
    """
    here = "eager" if _compat.executing_eagerly() else "graph"
    if here != ("eager" if eager else "graph"):
        pytest.skip("{} tests; this run is in {} mode".format("eager" if eager else "graph-mode", here),
                    allow_module_level=True)


# Long tests (minute-long fits, killed processes, a keras.applications model)
# run in one environment per Keras flavour: each is heavy and outside the core
# and Python subsets, and tox.ini sets GRADACCUM_LONG=0 (1 or 0, conftest
# refuses others) on TF 2.7, whose full suite would run them beside tf-keras
# 2.21's.
long_run = pytest.mark.skipif(
    os.environ.get("GRADACCUM_LONG", "1") == "0",
    reason="long: runs in one environment per Keras flavour (GRADACCUM_LONG=0 here)")


def data(n_samples=96, n_features=5, n_outputs=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n_samples, n_features)).astype("float32")
    y = (x @ rng.normal(size=(n_features, n_outputs)) + 0.1 * rng.normal(size=(n_samples, n_outputs))).astype("float32")
    return x, y


def functional_mlp(n_features=5, n_outputs=3, l2=1e-2):
    inputs = keras.Input((n_features,))
    hidden = keras.layers.Dense(
        8, activation="tanh", kernel_regularizer=keras.regularizers.l2(l2) if l2 else None,
        name="hidden")(inputs)
    outputs = keras.layers.Dense(n_outputs, name="out")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


def sequential_mlp(n_features=5, n_outputs=3):
    return keras.Sequential([
        keras.Input((n_features,)),
        keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.l2(1e-2)),
        keras.layers.Dense(n_outputs),
    ], name="seq")


class SubclassedMLP(keras.Model):
    def __init__(self, n_outputs=3, **kwargs):
        super().__init__(**kwargs)
        self.n_outputs = n_outputs
        self.hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.l2(1e-2))
        self.out = keras.layers.Dense(n_outputs)

    def call(self, inputs, training=None):
        return self.out(self.hidden(inputs))

    def get_config(self):
        return {"n_outputs": self.n_outputs, "name": self.name}

    @classmethod
    def from_config(cls, config):  # Keras <= 2.7 has no default for subclassed models
        return cls(**config)


def subclassed_mlp(n_features=5, n_outputs=3):
    model = SubclassedMLP(n_outputs)
    model(np.zeros((1, n_features), "float32"))  # build, so weights can be set
    return model


def two_in_two_out():
    """Two inputs, two named outputs (for dict losses, loss_weights, metrics)."""
    left, right = keras.Input((5,), name="left"), keras.Input((2,), name="right")
    joined = keras.layers.Concatenate()([keras.layers.Dense(6, activation="tanh")(left), right])
    first = keras.layers.Dense(3, name="first")(joined)
    second = keras.layers.Dense(1, activation="sigmoid", name="second")(joined)
    return keras.Model([left, right], [first, second])


def two_in_two_out_data():
    x, y = data()
    rng = np.random.RandomState(2)
    inputs = [x, rng.normal(size=(len(x), 2)).astype("float32")]
    targets = {"first": y, "second": (rng.uniform(size=(len(x), 1)) > 0.5).astype("float32")}
    return inputs, targets


def embedding_model(vocabulary=50):
    tokens = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(vocabulary, 6)(tokens)
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.Flatten()(embedded)))


def tokens(rows, repeated):
    rng = np.random.RandomState(3)
    if repeated:  # a vocabulary of 50: every big batch names some rows many times
        return rng.randint(0, 50, size=(rows, 4)).astype("int32")
    return rng.permutation(rows * 4).reshape(rows, 4).astype("int32")


def core_params(values, core):
    """`values` for pytest.mark.parametrize, those in `core` marked for the core subset.

    The core subset runs on every TF minor between a flavour's floor and
    newest, where what a minor can change is what gradaccum reads of Keras,
    not one optimizer's arithmetic against another's: the rest of `values`
    run in the full suite only.
    """
    unknown = set(core) - set(values)
    if unknown:
        raise ValueError("core values {} are not among {}".format(sorted(unknown), list(values)))
    return [pytest.param(value, marks=pytest.mark.core) if value in core else value for value in values]


MODELS = {"functional": functional_mlp, "sequential": sequential_mlp, "subclassed": subclassed_mlp}


# Fresh Keras optimizers by name, for the eager differential tests.
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "adam-schedule": lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)),
}
if hasattr(keras.optimizers, "AdamW"):  # Keras >= 2.11
    OPTIMIZERS["adamw"] = lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05)
# The core subset's: one slot (momentum), two and a step count with a
# schedule read from that count (Adam with a schedule), a decay in the update
# (AdamW). SGD and Nesterov are momentum's class, Adagrad and RMSprop one slot
# more of the same, and plain Adam is the scheduled one with a constant rate
# (it stays core under mixed precision and MirroredStrategy).
CORE_OPTIMIZERS = [name for name in ("momentum", "adam-schedule", "adamw") if name in OPTIMIZERS]


# Options that act on the gradient, or on the update. They must act once per
# update, on the accumulated gradient, as on the big batch: clipping each
# micro-batch's gradient, decaying weights or averaging them per micro-step
# would train differently.
GRADIENT_OPTIONS = {
    "clipnorm": {"clipnorm": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.05},
    "clipvalue": {"clipvalue": 0.01},
    "weight_decay": {"weight_decay": 0.5},
    "use_ema": {"use_ema": True, "ema_momentum": 0.5},
}
# The core subset's: one of the clippings (the three clip the gradients
# handed to the optimizer, in one place of Keras' update), the weight decay
# and the moving average (each in a place of its own).
CORE_GRADIENT_OPTIONS = ["clipnorm", "use_ema", "weight_decay"]


def steps_of(model):
    """The optimizer's update count."""
    return int(model.optimizer.iterations.numpy())


def optimizer_accepts(factory, **options):
    """Whether this Keras' optimizer takes these constructor options."""
    try:
        factory(**options)
    except (TypeError, ValueError):
        return False
    return True


# Model.compile(jit_compile=...) arrived in Keras 2.8.
HAS_JIT_COMPILE = "jit_compile" in inspect.signature(keras.Model.compile).parameters
needs_jit_compile = pytest.mark.skipif(not HAS_JIT_COMPILE, reason="this Keras has no compile(jit_compile=...)")


def rss_mb():
    """This process's resident set size in MB (Linux), after a garbage collection."""
    import gc
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def fresh(model_factory, initial_weights, **kwargs):
    model = model_factory(**kwargs)
    model.set_weights(initial_weights)
    return model


class EpochEnds(keras.callbacks.Callback):
    """Records the weights and logs that callbacks see at each epoch's end, in `seen`."""

    def __init__(self):
        super(EpochEnds, self).__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((weights_of(self.model), dict(logs or {})))


def assert_resumes_mid_window(initial, compiled, save, restore, empty_window, batch_size=8):
    """A fit saved mid-window and restored into fresh objects trains on as if never stopped.

    `compiled()` gives a fresh model compiled for a window of 4 micro-batches;
    `save(model)` saves it and returns what `restore(saved)` turns back into
    a model. The fit stops after 6 micro-batches (one update, 2 open), and the
    restored model's fit of the rest must end bitwise equal to one fit of all.
    Restored with its window emptied (`empty_window(model)`), it must differ,
    so that the window is what the save kept. Returns the stopped model.
    """
    x, y = data(96)
    uninterrupted = compiled()
    uninterrupted.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0)
    stopped = compiled()
    stopped.fit(x[:48], y[:48], batch_size=batch_size, shuffle=False, verbose=0)
    saved = save(stopped)

    def resumed(keep_window):
        model = restore(saved)
        if not keep_window:
            empty_window(model)
        model.fit(x[48:], y[48:], batch_size=batch_size, shuffle=False, verbose=0)
        return model

    model = resumed(keep_window=True)
    assert steps_of(model) == steps_of(uninterrupted) == 3
    for got, want in zip(weights_of(model), weights_of(uninterrupted)):
        np.testing.assert_array_equal(got, want)
    emptied = resumed(keep_window=False)
    assert change_error(initial, weights_of(emptied), weights_of(uninterrupted)) > 1e-3
    return stopped


def mse_with_regularizers(model, x, y):
    """A custom loop's loss: the per-sample mean squared error plus the model's regularizers."""
    import tensorflow as tf
    loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    return loss + tf.add_n(model.losses) if model.losses else loss


def train_loop(model_factory, initial, make_optimizer, x, y, batch_size, n=None, mode="function",
               epochs=2, weighted=True, flush=True):
    """A custom training loop; with `n`, through gradaccum.AccumOptimizer.

    Returns (weights, the optimizer's iterations, the optimizer). `mode` is
    "eager", "function" or "jit" (tf.function(jit_compile=True)).
    """
    import tensorflow as tf
    from gradaccum import AccumOptimizer

    model = fresh(model_factory, initial)
    optimizer = make_optimizer() if n is None else AccumOptimizer(make_optimizer(), n)
    variables = model.trainable_variables

    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = mse_with_regularizers(model, x_batch, y_batch)
        grads = tape.gradient(loss, variables)
        if n is not None and weighted:
            optimizer.apply_gradients(zip(grads, variables), batch_size=tf.shape(x_batch)[0])
        else:
            optimizer.apply_gradients(zip(grads, variables))

    if mode != "eager":
        step = tf.function(step, **({"jit_compile": True} if mode == "jit" else {}))
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            step(x[start:start + batch_size], y[start:start + batch_size])
        if n is not None and flush:
            optimizer.flush()
    return weights_of(model), int(optimizer.iterations.numpy()), optimizer


def compare_loop(model_factory, make_optimizer, x, y, name, n=4, b=8, **kwargs):
    """AccumOptimizer at (b, n) against the same loop at n*b and at b; returns the error."""
    initial = weights_of(model_factory())
    weighted = kwargs.pop("weighted", True)

    def run(n, batch_size):
        return train_loop(model_factory, initial, make_optimizer, x, y, batch_size, n=n,
                          weighted=weighted, **kwargs)

    differential(name, initial, run, n, b)
