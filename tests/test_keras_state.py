"""The optimizer moves once per update: closed-form checks on single micro-steps."""

import numpy as np
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=True)


def optimizer_state(optimizer):
    variables = optimizer.variables() if callable(optimizer.variables) else optimizer.variables
    return [v.numpy() for v in variables]


def test_micro_steps_leave_weights_slots_and_iterations_alone():
    x, y = helpers.data(64)
    model = accumulate(helpers.functional_mlp(), 4)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    for start in range(0, 32, 8):  # one full window, so that Adam's slots exist and are non-zero
        model.train_on_batch(x[start:start + 8], y[start:start + 8])
    assert int(model.optimizer.iterations.numpy()) == 1
    weights, state = helpers.weights_of(model), optimizer_state(model.optimizer)
    assert any(np.any(s != 0) for s in state[1:])
    for start in range(32, 56, 8):
        model.train_on_batch(x[start:start + 8], y[start:start + 8])
        assert int(model.optimizer.iterations.numpy()) == 1
        for before, after in zip(weights + state, helpers.weights_of(model) + optimizer_state(model.optimizer)):
            np.testing.assert_array_equal(before, after)
    model.train_on_batch(x[56:64], y[56:64])
    assert int(model.optimizer.iterations.numpy()) == 2
    assert all(np.any(a != b) for a, b in zip(weights, helpers.weights_of(model)))


def test_update_is_the_size_weighted_mean_gradient():
    # Micro-batches of 8, 8, 3 and 6 samples: the update must be the gradient
    # of the 25-sample batch, so each micro-batch counts by its size.
    x, y = helpers.data(25)
    model = accumulate(helpers.functional_mlp(), 4)
    learning_rate = 0.5
    model.compile(keras.optimizers.SGD(learning_rate), "mse")
    initial = helpers.weights_of(model)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        if hasattr(model, "compute_loss"):  # Keras >= 2.9 and 3
            loss = model.compute_loss(x=x, y=tf.constant(y), y_pred=y_pred)
        else:
            loss = model.compiled_loss(tf.constant(y), y_pred, regularization_losses=model.losses)
    big_gradient = tape.gradient(loss, model.trainable_variables)
    expected = [w - learning_rate * g.numpy() for w, g in zip(initial, big_gradient)]
    for start, stop in ((0, 8), (8, 16), (16, 19), (19, 25)):
        model.train_on_batch(x[start:stop], y[start:stop])
    assert int(model.optimizer.iterations.numpy()) == 1
    helpers.assert_same_training(initial, helpers.weights_of(model), expected)


def test_train_on_batch_after_fit_is_not_cut_by_the_last_epoch_length():
    # fit announces epoch lengths to the window; after fit, train_on_batch
    # calls must again update every n-th call only.
    x, y = helpers.data(40)
    model = accumulate(helpers.functional_mlp(), 4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 5 micro-batches: 4 + 1
    assert int(model.optimizer.iterations.numpy()) == 2
    for start in range(0, 24, 8):
        model.train_on_batch(x[start:start + 8], y[start:start + 8])
    assert int(model.optimizer.iterations.numpy()) == 2
    model.train_on_batch(x[24:32], y[24:32])
    assert int(model.optimizer.iterations.numpy()) == 3
