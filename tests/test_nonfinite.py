"""Non-finite float32 gradients (issue 15): as the big batch by default, or skipped whole.

One target of the data is inf, so the micro-batch holding it (and the big
batch holding it) has inf and nan gradients. By default the window is applied
as it is, as the big batch's step is: the weights become non-finite where the
big batch's do. With `skip_nonfinite=True` that window is skipped whole, so
training equals plain big-batch training on the data without that window,
with as many optimizer steps.
"""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import AccumOptimizer, accumulate

helpers.require_mode(eager=True)

N, B = 4, 8
SAMPLES, BAD = 96, 41  # the bad target is in window 2 (samples 32-63) of each epoch


def bad_data():
    x, y = helpers.data(SAMPLES)
    y = y.copy()
    y[BAD, 1] = np.inf
    return x, y


def without_bad_window(x, y):
    keep = np.r_[0:N * B, 2 * N * B:SAMPLES]
    return x[keep], y[keep]


def fit(model, x, y, batch_size, epochs=2):
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return helpers.weights_of(model), helpers.steps_of(model), history.history


@pytest.mark.parametrize("kind", sorted(helpers.MODELS))
def test_by_default_a_nonfinite_window_does_what_the_big_batchs_step_does(kind):
    x, y = bad_data()
    initial = helpers.weights_of(helpers.MODELS[kind]())
    accumulated = fit(accumulate(helpers.fresh(helpers.MODELS[kind], initial), N), x, y, B)
    big = fit(helpers.fresh(helpers.MODELS[kind], initial), x, y, N * B)
    assert accumulated[1] == big[1] == 6
    assert not all(np.isfinite(w).all() for w in big[0])
    for got, want in zip(accumulated[0], big[0]):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


@pytest.mark.parametrize("kind", sorted(helpers.MODELS))
@pytest.mark.parametrize("n", [N, 1])
def test_skip_nonfinite_skips_that_window_whole_and_counts_it(kind, n):
    x, y = bad_data()
    initial = helpers.weights_of(helpers.MODELS[kind]())

    def run(k, batch_size):
        model = helpers.fresh(helpers.MODELS[kind], initial)
        if k is None:  # plain training on the data without the bad window
            return fit(model, *without_bad_window(x, y), batch_size=batch_size)
        return fit(accumulate(model, k, skip_nonfinite=True), x, y, batch_size)

    if n == 1:  # Keras' own step has no window to skip: n=1 keeps one
        accumulated, big = run(1, N * B), run(None, N * B)
        assert accumulated[1] == big[1]
        helpers.assert_same_training(initial, accumulated[0], big[0])
    else:
        accumulated, big, _ = helpers.differential("nonfinite/skip/" + kind, initial, run, n, B)
    assert accumulated[1] == big[1] == 4  # 2 of 3 windows per epoch
    assert accumulated[2]["skipped"] == [1, 2]
    assert accumulated[2]["updates"] == [2, 4]


def optimizer_state(optimizer):
    variables = optimizer.variables
    return [v.numpy() for v in (variables() if callable(variables) else variables)]


def test_the_optimizers_state_does_not_move_in_a_skipped_window():
    x, y = bad_data()
    model = accumulate(helpers.functional_mlp(), N, skip_nonfinite=True)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x[:2 * N * B], y[:2 * N * B], batch_size=B, epochs=1, shuffle=False, verbose=0)
    after_one = optimizer_state(model.optimizer)
    model.fit(x[N * B:2 * N * B], y[N * B:2 * N * B], batch_size=B, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(optimizer_state(model.optimizer), after_one):
        np.testing.assert_array_equal(got, want)  # iterations, moments: untouched
    assert all(np.isfinite(w).all() for w in helpers.weights_of(model))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_accum_optimizer_skip_nonfinite_in_a_custom_loop(mode):
    x, y = bad_data()
    initial = helpers.weights_of(helpers.functional_mlp())

    def loop(n, batch_size):
        data = (x, y) if n is not None else without_bad_window(x, y)
        model = helpers.fresh(helpers.functional_mlp, initial)
        optimizer = keras.optimizers.Adam(0.01)
        if n is not None:
            optimizer = AccumOptimizer(optimizer, n, skip_nonfinite=True)

        def step(x_batch, y_batch):
            with tf.GradientTape() as tape:
                loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        step = tf.function(step) if mode == "function" else step
        for _ in range(2):
            for start in range(0, len(data[0]), batch_size):
                step(data[0][start:start + batch_size], data[1][start:start + batch_size])
        skipped = int(optimizer.skipped.numpy()) if n is not None else None
        return helpers.weights_of(model), int(optimizer.iterations.numpy()), skipped

    accumulated, big, _ = helpers.differential("nonfinite/loop-" + mode, initial, loop, N, B)
    assert accumulated[1] == big[1] == 4
    assert accumulated[2] == 2


def test_skip_nonfinite_must_be_a_bool_and_is_not_for_loss_scaling():
    with pytest.raises(TypeError, match=r"skip_nonfinite must be True or False. Received: skip_nonfinite=1"):
        accumulate(helpers.functional_mlp(), N, skip_nonfinite=1)
    with pytest.raises(TypeError, match=r"Received: skip_nonfinite='yes'"):
        AccumOptimizer(keras.optimizers.Adam(), N, skip_nonfinite="yes")
    scaled = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match=r"skip_nonfinite=True is for float32 training"):
        AccumOptimizer(scaled, N, skip_nonfinite=True)
    model = accumulate(helpers.functional_mlp(), N, skip_nonfinite=True)
    model.compile(keras.mixed_precision.LossScaleOptimizer(keras.optimizers.Adam()), "mse")
    with pytest.raises(ValueError, match=r"skip_nonfinite=True is for float32 training"):
        model.fit(*helpers.data(32), batch_size=B, verbose=0)


def test_skip_nonfinite_is_saved_in_the_models_config(tmp_path):
    model = accumulate(helpers.functional_mlp(), N, skip_nonfinite=True)
    config = model.get_config()
    assert config["skip_nonfinite"] is True
    assert type(model).from_config(config).skip_nonfinite is True
