"""Oracles for the differential tests: accumulated training versus the big batch."""

import inspect
import os

import numpy as np
import pytest

from gradaccum import _compat

keras = _compat.keras2_module()
if keras is None:
    # Imported only by the Keras-2 test modules: they skip, visibly, where
    # this runtime has no Keras 2 (TF 1.x, TF >= 2.16 with Keras 3 only).
    pytest.skip("no Keras 2 in this runtime (TensorFlow {})".format(_compat.TF_VERSION),
                allow_module_level=True)

# float32 tolerance on the total weight change: max |w_accum - w_big| must be
# below REL_TOL * max |w_big - w_initial|. Summing b-weighted micro-batch means
# instead of one big mean reorders float32 additions; nothing more.
REL_TOL = 1e-5
# Plain training at the small batch must differ from the big batch by far more
# than REL_TOL, or equality would prove nothing.
DISCRIMINATION = 1e-3


def data(n_samples=96, n_features=5, n_outputs=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n_samples, n_features)).astype("float32")
    y = (x @ rng.normal(size=(n_features, n_outputs)) + 0.1 * rng.normal(size=(n_samples, n_outputs))).astype("float32")
    return x, y


def functional_mlp(n_features=5, n_outputs=3):
    inputs = keras.Input((n_features,))
    hidden = keras.layers.Dense(
        8, activation="tanh", kernel_regularizer=keras.regularizers.l2(1e-2), name="hidden")(inputs)
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


MODELS = {"functional": functional_mlp, "sequential": sequential_mlp, "subclassed": subclassed_mlp}


# Model.compile(jit_compile=...) arrived in Keras 2.8.
HAS_JIT_COMPILE = "jit_compile" in inspect.signature(keras.Model.compile).parameters
needs_jit_compile = pytest.mark.skipif(not HAS_JIT_COMPILE, reason="this Keras has no compile(jit_compile=...)")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def change_error(initial, candidate, reference):
    """max |candidate - reference| relative to max |reference - initial|."""
    diff = max(np.max(np.abs(c - r)) for c, r in zip(candidate, reference))
    change = max(np.max(np.abs(r - i)) for r, i in zip(reference, initial))
    assert change > 0, "reference training did not move the weights"
    return diff / change


def assert_same_training(initial, candidate, reference, rel_tol=REL_TOL):
    error = change_error(initial, candidate, reference)
    assert error <= rel_tol, "weights differ from the big batch by {:.3g} of the change (allowed {:.1g})".format(error, rel_tol)
    return error


def assert_discriminates(initial, small, reference):
    error = change_error(initial, small, reference)
    assert error > DISCRIMINATION, (
        "plain small-batch training matches the big batch ({:.3g}): the test would pass "
        "without accumulation".format(error))
    return error


def fresh(model_factory, initial_weights, **kwargs):
    model = model_factory(**kwargs)
    model.set_weights(initial_weights)
    return model


def record(name, value):
    """Appends a measured figure to $GRADACCUM_FIGURES, for closing notes."""
    path = os.environ.get("GRADACCUM_FIGURES")
    if path:
        with open(path, "a") as handle:
            handle.write("{}\t{:.3g}\n".format(name, value))
