"""Adaptive gradient clipping (AGC) on the accumulated gradient, once per update.

The oracle: accumulate(model, n, agc=c) at micro-batch b against a loop that
trains the big batch n*b and clips its gradient with the same rule. Plain
accumulation without clipping, and clipping each micro-batch on its own (as
gradient-accumulator did), must both differ from it.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import helpers
from gradaccum import AccumOptimizer, _window, accumulate, migration
from helpers import keras

N, B, CLIP = 4, 8, 0.02

pytestmark = pytest.mark.skipif(not tf.executing_eagerly(), reason="eager (fit and tf.function loops)")


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return function(*args, **kwargs)


def clipped_loop(initial, x, y, batch_size, clip_each=None, n=1):
    """The big batch's training (n=1) with AGC; `clip_each` clips each of n micro-batches instead."""
    model = helpers.fresh(helpers.functional_mlp, initial)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.5)
    variables = model.trainable_variables

    @tf.function
    def gradients(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
        grads = tape.gradient(loss, variables)
        if clip_each:
            grads = [g for g, _ in _window.adaptive_clip(zip(grads, variables), clip_each, 1e-3)]
        return grads

    @tf.function
    def apply(grads):
        if not clip_each:
            grads = [g for g, _ in _window.adaptive_clip(zip(grads, variables), CLIP, 1e-3)]
        optimizer.apply_gradients(zip(grads, variables))

    for _ in range(2):
        for start in range(0, len(x), batch_size * n):
            parts = [gradients(x[i:i + batch_size], y[i:i + batch_size])
                     for i in range(start, min(start + batch_size * n, len(x)), batch_size)]
            sizes = [len(x[i:i + batch_size]) for i in range(start, min(start + batch_size * n, len(x)), batch_size)]
            mean = [sum(s * g[k] for s, g in zip(sizes, parts)) / float(sum(sizes)) for k in range(len(variables))]
            apply(mean)
    return helpers.weights_of(model), int(optimizer.iterations.numpy())


@pytest.mark.core
def test_agc_clips_the_accumulated_gradient_as_the_big_batchs():
    x, y = helpers.data(100)
    x = x * 20.0  # large gradients, so that AGC clips
    initial = helpers.weights_of(helpers.functional_mlp())
    big = clipped_loop(initial, x, y, N * B)

    def fitted(**options):
        model = accumulate(helpers.fresh(helpers.functional_mlp, initial), N, **options)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.5), "mse")
        model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
        return helpers.weights_of(model), int(model.optimizer.iterations.numpy())

    accumulated = fitted(agc=CLIP)
    assert accumulated[1] == big[1]
    error = helpers.assert_same_training(initial, accumulated[0], big[0])
    helpers.record("agc accumulate", error)
    helpers.assert_discriminates(initial, fitted()[0], big[0])  # without clipping
    helpers.assert_discriminates(initial, clipped_loop(initial, x, y, B, clip_each=CLIP, n=N)[0], big[0])


def test_agc_in_the_optimizer_wrapper_and_the_old_model_name():
    x, y = helpers.data(96)
    x = x * 20.0
    initial = helpers.weights_of(helpers.functional_mlp())
    big = clipped_loop(initial, x, y, N * B)
    model = helpers.fresh(helpers.functional_mlp, initial)
    optimizer = AccumOptimizer(keras.optimizers.SGD(0.1, momentum=0.5), N, agc=CLIP)
    variables = model.trainable_variables

    @tf.function
    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables), batch_size=tf.shape(x_batch)[0])

    for _ in range(2):
        for start in range(0, len(x), B):
            step(x[start:start + B], y[start:start + B])
    helpers.assert_same_training(initial, helpers.weights_of(model), big[0])
    assert int(optimizer.iterations.numpy()) == big[1]

    base = helpers.fresh(helpers.functional_mlp, initial)
    old = quiet(migration.GradientAccumulateModel, accum_steps=N, use_agc=True, clip_factor=CLIP,
                inputs=base.input, outputs=base.output)
    old.compile(keras.optimizers.SGD(0.1, momentum=0.5), "mse")
    old.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    helpers.assert_same_training(initial, helpers.weights_of(old), big[0])


@pytest.mark.parametrize("shape, axes", [
    ((), None), ((7,), None), ((4, 3), [0]), ((2, 4, 3), [0]), ((3, 3, 2, 4), [0, 1, 2]),
    ((2, 2, 2, 3, 4), [0, 1, 2, 3]),
])
def test_unitwise_norms_as_gradient_accumulator_defines_them(shape, axes):
    rng = np.random.RandomState(0)
    x = rng.normal(size=shape).astype("float32")
    want = np.sqrt(np.sum(x ** 2, axis=None if axes is None else tuple(axes), keepdims=axes is not None))
    np.testing.assert_allclose(quiet(migration.unitwise_norm, tf.constant(x)).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(quiet(migration.compute_norm, tf.constant(x), axes, axes is not None).numpy(),
                               want, rtol=1e-6)


def test_adaptive_clip_grad_clips_only_units_over_the_limit():
    weights = tf.constant([[3.0, 0.0], [4.0, 0.0]])  # unit (column) norms 5 and 0 (-> eps)
    grads = tf.constant([[0.3, 1.0], [0.4, 0.0]])  # norms 0.5 and 1
    got = quiet(migration.adaptive_clip_grad, [weights], [grads], clip_factor=0.2, eps=1e-3)[0].numpy()
    # Column 0: 0.5 < 0.2 * 5 = 1, kept; column 1: limit 0.2 * 1e-3, scaled to that norm.
    np.testing.assert_allclose(got[:, 0], [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], [2e-4, 0.0], rtol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"agc": 0.0}, r"agc must be a positive number \(the clip factor, e.g. 0.01\) or None\. Received: agc=0\.0"),
    ({"agc": -1}, r"Received: agc=-1"),
    ({"agc": True}, r"Received: agc=True"),
    ({"agc": "0.01"}, r"Received: agc='0.01'"),
    ({"agc": 0.01, "agc_eps": 0}, r"agc_eps must be a positive number\. Received: agc_eps=0"),
])
def test_bad_agc_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        accumulate(helpers.functional_mlp(), N, **options)
    with pytest.raises(ValueError, match=message):
        AccumOptimizer(keras.optimizers.SGD(), N, **options)


def test_the_old_names_warn_once_each():
    for name in ("compute_norm", "unitwise_norm", "adaptive_clip_grad", "AccumBatchNormalization",
                 "replace_batchnorm_layers"):
        migration._warned.discard(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            migration.unitwise_norm(tf.ones((2, 2)))
            migration.compute_norm(tf.ones((2, 2)), 0, True)
            migration.adaptive_clip_grad([tf.ones((2,))], [tf.ones((2,))])
            migration.AccumBatchNormalization(accum_steps=2)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                    and "gradaccum" in str(w.message)]
    assert len(deprecations) == 4, deprecations


def test_replace_batchnorm_layers_keeps_the_weights_and_saves_by_name(tmp_path):
    inputs = keras.Input((5,))
    hidden = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4, name="dense")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
    model.get_layer("bn").set_weights([np.full(4, v, "float32") for v in (2.0, 0.5, 1.0, 3.0)])
    replaced = quiet(migration.replace_batchnorm_layers, model, accum_steps=4)
    layer = replaced.get_layer("bn")
    assert type(layer).__name__ == "AccumBatchNormalization" and layer.accum_steps == 4
    for got, want in zip(layer.get_weights(), model.get_layer("bn").get_weights()):
        np.testing.assert_array_equal(got, want)
    assert replaced.get_layer("dense") is model.get_layer("dense")
    x = np.random.RandomState(0).normal(size=(6, 5)).astype("float32")
    np.testing.assert_allclose(replaced.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    path = str(tmp_path / ("m.keras" if hasattr(keras, "saving") else "m.h5"))
    replaced.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert type(loaded.get_layer("bn")).__name__ == "AccumBatchNormalization"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    with pytest.raises(ValueError, match=r'position must be "replace"\. Received: position=\'after\''):
        quiet(migration.replace_batchnorm_layers, model, accum_steps=4, position="after")
