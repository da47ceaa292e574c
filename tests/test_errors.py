"""Bad input is a clear error, raised at once, naming what was received.

These run on every runtime: the facade checks its arguments before it routes.
"""

import re
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf
from packaging.version import Version

from gradaccum import _compat, accumulate

pytestmark = [pytest.mark.core, pytest.mark.python, pytest.mark.errors]


def any_model():
    """A small model of whatever Keras `tf.keras` is here (TF1, Keras 2 or 3)."""
    inputs = tf.keras.Input((5,))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))


@pytest.mark.parametrize("n, error", [
    (0, ValueError), (-3, ValueError),
    (2.5, TypeError), (4.0, TypeError), (True, TypeError), ("4", TypeError), (None, TypeError),
])
def test_invalid_n_is_refused(n, error):
    with pytest.raises(error) as caught:
        accumulate(any_model(), n)
    message = str(caught.value)
    assert "Received: n={!r}".format(n) in message and "integer >= 1" in message


def test_invalid_epoch_end_is_refused():
    with pytest.raises(ValueError, match=r"epoch_end must be one of \('apply', 'carry'\). Received: epoch_end='drop'"):
        accumulate(any_model(), 2, epoch_end="drop")


@pytest.mark.parametrize("model", [object(), tf.Module(), "model", lambda: None], ids=["object", "tf.Module", "str", "function"])
def test_non_keras_model_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a Keras model.*Received: model="):
        accumulate(model, 4)


def test_keras_layer_is_not_a_model():
    with pytest.raises(TypeError, match="Received: model=.*Dense"):
        accumulate(tf.keras.layers.Dense(3), 4)


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)


def test_missing_tensorflow_says_how_to_install_it():
    result = run_python("""
        import sys
        sys.modules["tensorflow"] = None  # what a missing package looks like to import
        try:
            import gradaccum
        except ImportError as err:
            print("ImportError:", err)
    """)
    assert "ImportError: gradaccum needs TensorFlow" in result.stdout, result.stdout
    assert "pip install tensorflow" in result.stdout


def test_keras3_on_another_backend_is_refused(monkeypatch):
    keras3 = pytest.importorskip("keras")
    if not hasattr(keras3, "ops"):
        pytest.skip("the keras package here is Keras {}, not Keras 3".format(keras3.__version__))
    inputs = keras3.Input((3,))
    model = keras3.Model(inputs, keras3.layers.Dense(1)(inputs))
    monkeypatch.setattr(keras3.backend, "backend", lambda: "jax")
    with pytest.raises(NotImplementedError, match=r"needs the TensorFlow backend. Received: .*'jax' backend"):
        accumulate(model, 4)


@pytest.mark.parametrize("old", ["3.3.3", "3.5.0"])
def test_a_keras3_older_than_the_supported_floor_is_refused(monkeypatch, old):
    # Keras 3.3 trained wrong under MirroredStrategy, and 3.3-3.5 failed a
    # Sequential model and evaluated a wrapped subclassed one to 0.0 (README,
    # "Supported versions"): refused, never trained wrong.
    keras3 = pytest.importorskip("keras")
    if not hasattr(keras3, "ops"):
        pytest.skip("the keras package here is Keras {}, not Keras 3".format(keras3.__version__))
    from gradaccum import AccumOptimizer
    inputs = keras3.Input((3,))
    model = keras3.Model(inputs, keras3.layers.Dense(1)(inputs))
    optimizer = keras3.optimizers.SGD(0.1)
    monkeypatch.setattr(keras3, "__version__", old)
    message = r"needs Keras >= 3.6.0 .* Received: Keras {} with TensorFlow".format(re.escape(old))
    with pytest.raises(NotImplementedError, match=message):
        accumulate(model, 4)
    with pytest.raises(NotImplementedError, match=message):
        AccumOptimizer(optimizer, 4)


def test_the_installed_keras3_is_refused_when_older_than_the_floor():
    # The monkeypatched test above, for real: py311-tf217-keras34 installs the
    # Keras TF 2.17 shipped with (3.4.1), where the whole suite but this
    # module would fail at its first accumulate(). A Sequential model is the
    # kind Keras 3.4's own `input` failed on: the refusal comes first.
    keras3 = _compat.keras3_module()
    if keras3 is None or Version(keras3.__version__) >= _compat.MIN_KERAS3:
        pytest.skip("the installed Keras is not a Keras 3 older than {}".format(_compat.MIN_KERAS3))
    from gradaccum import AccumOptimizer
    model = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(1)])
    message = r"needs Keras >= {} .* Received: Keras {} with TensorFlow {}".format(
        re.escape(str(_compat.MIN_KERAS3)), re.escape(keras3.__version__), re.escape(tf.__version__))
    with pytest.raises(NotImplementedError, match=message):
        accumulate(model, 4)
    with pytest.raises(NotImplementedError, match=message):
        AccumOptimizer(keras3.optimizers.SGD(0.1), 4)
