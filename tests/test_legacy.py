"""The legacy shim: code written for GradientAccumulator runs unchanged, and exactly.

    from GradientAccumulator.GAModelWrapper import GAModelWrapper
    model = GAModelWrapper(n_gradients=4, inputs=model.input, outputs=model.output)

The old usage's whole flow (compile, fit a tf.data pipeline with validation,
save to a directory, load_model(compile=True), evaluate, train on) against the
same flow with plain Keras at the big batch.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
import gradaccum.migration
from GradientAccumulator.GAModelWrapper import GAModelWrapper

helpers.require_mode(eager=True)

N, B = 4, 8
# The old library's users saved to a directory (Keras 2's SavedModel); Keras 3
# saves whole models only to .keras files.
SUFFIX = ".keras" if helpers.KERAS3 else ""


def old_style_model(initial):
    base = helpers.fresh(helpers.functional_mlp, initial)
    return GAModelWrapper(n_gradients=N, inputs=base.input, outputs=base.output)


def test_the_old_import_path_warns_once_and_builds_gradaccums_model():
    gradaccum.migration._warned.clear()
    initial = helpers.weights_of(helpers.functional_mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = old_style_model(initial), old_style_model(initial)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert "gradaccum.accumulate(keras.Model(inputs, outputs), n)" in str(deprecations[0].message)
    assert deprecations[0].filename == __file__  # points at the caller's line
    import GradientAccumulator
    assert GradientAccumulator.GAModelWrapper is gradaccum.migration.GAModelWrapper
    route = "gradaccum._keras3" if helpers.KERAS3 else "gradaccum._keras2"
    assert type(first).__module__ == route and first.n == N and second.n == N


def datasets(batch_size):
    x, y = helpers.data(100)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    validation = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(batch_size)
    return train, validation


def old_flow(model, batch_size, path):
    """The README flow of the old library, then save, reload, evaluate, train on."""
    train, validation = datasets(batch_size)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    model.fit(train, validation_data=validation, epochs=2, verbose=0)
    before = helpers.weights_of(model)
    model.save(path)
    reloaded = keras.models.load_model(path, compile=True)
    evaluation = reloaded.evaluate(validation, verbose=0)
    np.testing.assert_allclose(evaluation, model.evaluate(validation, verbose=0), rtol=1e-6)
    reloaded.fit(train, epochs=1, verbose=0)
    return before, reloaded, helpers.weights_of(reloaded)


def test_the_old_flow_trains_saves_reloads_and_trains_on_exactly(tmp_path):
    initial = helpers.weights_of(helpers.functional_mlp())
    trained, reloaded, trained_on = old_flow(old_style_model(initial), B, str(tmp_path / ("old" + SUFFIX)))
    big_trained, big_reloaded, big_trained_on = old_flow(
        helpers.fresh(helpers.functional_mlp, initial), N * B, str(tmp_path / ("big" + SUFFIX)))
    _, _, small_trained_on = old_flow(helpers.fresh(helpers.functional_mlp, initial), B, str(tmp_path / ("small" + SUFFIX)))
    # Exact means the mean of the micro-batch gradients, not their sum.
    helpers.assert_same_training(initial, trained, big_trained)
    assert reloaded.n == N and type(reloaded).__name__ == "AccumModel"
    helpers.assert_same_training(initial, trained_on, big_trained_on)
    helpers.assert_discriminates(initial, small_trained_on, big_trained_on)
    assert int(reloaded.optimizer.iterations.numpy()) == int(big_reloaded.optimizer.iterations.numpy())


def test_the_later_spelling_is_an_alias_too():
    initial = helpers.weights_of(helpers.functional_mlp())
    base = helpers.fresh(helpers.functional_mlp, initial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = gradaccum.migration.GradientAccumulateModel(accum_steps=3, inputs=base.input, outputs=base.output)
    assert model.n == 3


@pytest.mark.parametrize("kwargs, error, message", [
    ({"use_agc": True, "clip_factor": 0}, ValueError, r"agc must be a positive number.*Received: agc=0"),
    ({"use_agc": "yes"}, TypeError, r"use_agc must be True or False\. Received: use_agc='yes'"),
    ({"n_gradients": 0}, ValueError, r"GAModelWrapper\(n_gradients=...\): n must be an integer >= 1.*Received: n=0"),
    ({"layers": []}, TypeError, r"takes inputs=, outputs= and optionally name=.*Received: keyword arguments"),
])
def test_old_options_gradaccum_does_not_have_are_refused(kwargs, error, message):
    base = helpers.functional_mlp()
    arguments = dict(n_gradients=2, inputs=base.input, outputs=base.output)
    arguments.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(error, match=message):
            GAModelWrapper(**arguments)
