"""Batch-size schedules: n changes during training, and stays exact (issue 17).

The reference is plain Keras at the scheduled big batches, with the same
optimizer carried through (iterations, slots, learning-rate schedule).
"""

import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import AccumOptimizer, AccumulationScheduler, accumulate

helpers.require_mode(eager=True)

N, B = 4, 8


def warm_up(epoch, n):
    """The schedule: micro-batches of b alone for 2 epochs (n = 1), then windows of 4b."""
    return 1 if epoch < 2 else N


def count_traces(model):
    """Counts how often the model's training step is traced (each trace adds once to the window)."""
    window, traces = model._accum_window, []
    accumulate_once = window.accumulate

    def counting(*args, **kwargs):
        traces.append(1)
        return accumulate_once(*args, **kwargs)

    window.accumulate = counting
    return traces


def test_a_warm_up_from_b_to_4b_matches_plain_training_at_those_batches():
    x, y = helpers.data(88)  # a short last window at n = 4: 32, 32, 24
    initial = helpers.weights_of(helpers.functional_mlp())
    # A schedule that still moves by the fourth epoch (28 updates).
    make_optimizer = lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=10, decay_rate=0.5))

    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), N)
    model.compile(make_optimizer(), "mse")
    traces = count_traces(model)
    history = model.fit(x, y, batch_size=B, epochs=4, shuffle=False, verbose=0,
                        callbacks=[AccumulationScheduler(warm_up)])

    plain = helpers.fresh(helpers.functional_mlp, initial)
    plain.compile(make_optimizer(), "mse")
    plain.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=N * B, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
    small = helpers.fresh(helpers.functional_mlp, initial)
    small.compile(make_optimizer(), "mse")
    small.fit(x, y, batch_size=B, epochs=4, shuffle=False, verbose=0)

    assert history.history["n"] == [1, 1, 4, 4]
    assert helpers.steps_of(model) == helpers.steps_of(plain) == 2 * 11 + 2 * 3
    assert history.history["updates"][-1] == helpers.steps_of(plain)
    helpers.record("schedule/warm-up b to 4b", helpers.assert_same_training(
        initial, helpers.weights_of(model), helpers.weights_of(plain)))
    helpers.assert_discriminates(initial, helpers.weights_of(small), helpers.weights_of(plain))

    # n is a variable of the training step: changing it traced nothing again.
    steady = accumulate(helpers.fresh(helpers.functional_mlp, initial), N)
    steady.compile(make_optimizer(), "mse")
    steady_traces = count_traces(steady)
    steady.fit(x, y, batch_size=B, epochs=4, shuffle=False, verbose=0)
    assert len(traces) == len(steady_traces) >= 1


def test_the_optimizer_wrappers_n_is_settable_in_a_custom_loop():
    x, y = helpers.data(96)
    initial = helpers.weights_of(helpers.functional_mlp())
    make_optimizer = helpers.OPTIMIZERS["momentum"]

    def loop(optimizer, sizes_and_n):
        """Epochs of micro-batches of 8 (or the big batch itself where n is None)."""
        model = helpers.fresh(helpers.functional_mlp, initial)
        variables, traces = model.trainable_variables, []

        @tf.function
        def step(x_batch, y_batch):
            traces.append(1)
            with tf.GradientTape() as tape:
                loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))

        for size, n in sizes_and_n:
            if n is not None:
                optimizer.n = n
            for start in range(0, len(x), size):
                step(x[start:start + size], y[start:start + size])
        return helpers.weights_of(model), int(optimizer.iterations.numpy()), len(traces)

    accumulated, steps, traces = loop(AccumOptimizer(make_optimizer(), N), [(B, 1), (B, 1), (B, N), (B, N)])
    big, big_steps, _ = loop(make_optimizer(), [(B, None), (B, None), (N * B, None), (N * B, None)])
    small, _, _ = loop(make_optimizer(), [(B, None)] * 4)
    _, _, steady_traces = loop(AccumOptimizer(make_optimizer(), N), [(B, None)] * 4)
    assert steps == big_steps == 2 * 12 + 2 * 3
    assert traces == steady_traces  # (a first call that makes variables traces twice, n or not)
    helpers.record("schedule/custom loop", helpers.assert_same_training(initial, accumulated, big))
    helpers.assert_discriminates(initial, small, big)


@pytest.mark.parametrize("returned", [0, 2.5, True, "4", None])
def test_a_schedule_returning_no_valid_n_is_a_clear_error(returned):
    x, y = helpers.data(16)
    model = accumulate(helpers.functional_mlp(), N)
    model.compile("sgd", "mse")
    message = r"schedule\(epoch=0, n=4\) must return an integer >= 1. Received: {}".format(
        __import__("re").escape(repr(returned)))
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=B, verbose=0, callbacks=[AccumulationScheduler(lambda epoch, n: returned)])


def test_bad_settings_of_n_are_refused_with_what_was_received():
    model = accumulate(helpers.functional_mlp(), N)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 .*Received: n=0"):
        model.n = 0
    with pytest.raises(TypeError, match=r"Received: n='4' of type str"):
        model.n = "4"
    once = accumulate(helpers.functional_mlp(), 1)
    with pytest.raises(ValueError, match=r"made with n=1, so it trains with Keras' own step.*Received: n=4"):
        once.n = 4
    with pytest.raises(TypeError, match=r"schedule must be a function"):
        AccumulationScheduler(4)
    plain = helpers.functional_mlp()
    plain.compile("sgd", "mse")
    with pytest.raises(TypeError, match=r"pass it to fit of a model that gradaccum.accumulate returned"):
        plain.fit(*helpers.data(16), verbose=0, callbacks=[AccumulationScheduler(lambda epoch, n: 2)])


def test_a_checkpoint_leaves_n_to_the_model_that_restores_it(tmp_path):
    # n is not in checkpoints: a restored n would leave model.n (and its
    # logs and config) saying one thing while the window used another.
    x, y = helpers.data(32)
    model = accumulate(helpers.functional_mlp(), N)
    model.compile("sgd", "mse")
    model.n = 1
    model.fit(x, y, batch_size=B, verbose=0)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = accumulate(helpers.functional_mlp(), N)
    restored.compile("sgd", "mse")
    tf.train.Checkpoint(model=restored).restore(path)
    restored.fit(x, y, batch_size=B, verbose=0)
    assert restored.n == int(restored._accum_window.n_variable.numpy()) == N
