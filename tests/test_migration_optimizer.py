"""gradient-accumulator's optimizer wrapper, spelled as that library spelled it.

    opt = GradientAccumulateOptimizer(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), accum_steps=4)

returns `gradaccum.AccumOptimizer`, so a custom training loop written for that
library trains exactly as the big batch does (the old wrapper applied zero
gradients on micro-steps and moved `iterations` every micro-step).
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import gradaccum
import gradaccum.migration
import helpers
from gradaccum.migration import GradientAccumulateModel, GradientAccumulateOptimizer
from helpers import keras

helpers.require_mode(eager=True)

N, B = 4, 8


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return function(*args, **kwargs)


def old_optimizer(optimizer, **kwargs):
    return quiet(GradientAccumulateOptimizer, optimizer=optimizer, accum_steps=N, **kwargs)


def custom_loop(model, optimizer, batch_size, epochs=2, n_samples=96):
    """The usual tf.GradientTape loop, its step in a tf.function; returns the weights."""
    x, y = helpers.data(n_samples)
    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(yb - model(xb, training=True))) + tf.add_n(model.losses)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))

    for _ in range(epochs):
        for start in range(0, n_samples, batch_size):
            step(x[start:start + batch_size], y[start:start + batch_size])
    return helpers.weights_of(model)


def trained(optimizer, batch_size, initial):
    model = helpers.fresh(helpers.functional_mlp, initial)
    return custom_loop(model, optimizer, batch_size), int(optimizer.iterations.numpy())


def test_a_custom_loop_with_the_old_wrapper_trains_like_the_big_batch():
    initial = helpers.weights_of(helpers.functional_mlp())
    optimizer = old_optimizer(keras.optimizers.SGD(0.1, momentum=0.9))
    assert isinstance(optimizer, gradaccum.AccumOptimizer) and optimizer.n == N

    def run(n, batch_size):
        return trained(optimizer if n is not None else keras.optimizers.SGD(0.1, momentum=0.9),
                       batch_size, initial)

    _, big, _ = helpers.differential("migration/GradientAccumulateOptimizer", initial, run, N, B)
    assert big[1] == 2 * 96 // (N * B)


@pytest.mark.parametrize("name", ["sgd", "SGD"])
def test_the_optimizer_may_be_named_by_a_string(name):
    initial = helpers.weights_of(helpers.functional_mlp())
    optimizer = old_optimizer(name)
    assert type(optimizer.inner_optimizer) is type(keras.optimizers.get("sgd"))
    accumulated, steps = trained(optimizer, B, initial)
    big, big_steps = trained(keras.optimizers.get("sgd"), N * B, initial)
    helpers.assert_same_training(initial, accumulated, big)
    assert steps == big_steps


def first_update(reduction, initial):
    """The weight change of one window of N micro-batches, with plain SGD(0.1)."""
    model = helpers.fresh(helpers.functional_mlp, initial)
    custom_loop(model, old_optimizer(keras.optimizers.SGD(0.1), reduction=reduction), B, epochs=1,
                n_samples=N * B)
    return [w - i for w, i in zip(helpers.weights_of(model), initial)]


def test_reduction_sum_applies_the_sum_of_the_micro_batch_gradients():
    initial = helpers.weights_of(helpers.functional_mlp())
    # The closed form: every micro-batch's gradient at the initial weights.
    model = helpers.fresh(helpers.functional_mlp, initial)
    x, y = helpers.data(N * B)
    total = [np.zeros_like(w, dtype="float64") for w in initial]
    for start in range(0, N * B, B):
        with tf.GradientTape() as tape:
            loss = (tf.reduce_mean(tf.square(y[start:start + B] - model(x[start:start + B], training=True)))
                    + tf.add_n(model.losses))
        for k, grad in enumerate(tape.gradient(loss, model.trainable_variables)):
            total[k] += np.asarray(grad, "float64")
    # (get_weights() and trainable_variables are in the same order: no
    # non-trainable weights in this model.)
    summed, averaged = first_update("SUM", initial), first_update("MEAN", initial)
    for change, mean_change, gradient in zip(summed, averaged, total):
        np.testing.assert_allclose(change, -0.1 * gradient, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(change, N * mean_change, rtol=1e-4, atol=1e-6)
    assert max(np.max(np.abs(c)) for c in summed) > 1e-2


def test_the_old_name_warns_once_naming_the_new_spelling():
    gradaccum.migration._warned.discard("GradientAccumulateOptimizer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradientAccumulateOptimizer(keras.optimizers.SGD(0.1), accum_steps=2)
        GradientAccumulateOptimizer(keras.optimizers.SGD(0.1), accum_steps=2)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)
                    and "GradientAccumulateOptimizer" in str(w.message)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert "gradaccum.AccumOptimizer(optimizer, n)" in str(deprecations[0].message)
    assert deprecations[0].filename == __file__  # points at the caller's line


def test_the_model_spelling_accepts_experimental_distributed_support():
    initial = helpers.weights_of(helpers.functional_mlp())
    base = helpers.fresh(helpers.functional_mlp, initial)
    model = quiet(GradientAccumulateModel, accum_steps=N, experimental_distributed_support=True,
                  inputs=base.input, outputs=base.output)
    assert model.n == N
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = helpers.data(96)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    assert helpers.steps_of(model) == 96 // (N * B)
    assert not all(np.array_equal(w, i) for w, i in zip(helpers.weights_of(model), initial))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"clipnorm": 1.0}, TypeError,
     r"GradientAccumulateOptimizer: takes optimizer=.*Received: keyword arguments \['clipnorm'\]"),
    ({"accum_steps": 0}, ValueError,
     r"GradientAccumulateOptimizer\(accum_steps=...\): n must be an integer >= 1.*Received: n=0"),
    ({"reduction": "avg"}, ValueError, r"reduction must be one of.*Received: reduction='avg'"),
])
def test_what_the_wrapper_does_not_take_is_refused(kwargs, error, message):
    arguments = dict(optimizer=keras.optimizers.SGD(0.1), accum_steps=N)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        quiet(GradientAccumulateOptimizer, **arguments)
