"""accumulate(model, n) on Keras 2 in graph mode: TF 1.15's tf.keras, and TF 2.x with eager disabled.

Graph-mode Keras builds one training op; the accumulating model builds it with
the graph route. Differential as in eager mode: fit at batch b with
accumulation versus fit at n*b without, from the same initial weights, on data
whose size is not a multiple of n*b (so every epoch ends in a short window).
"""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import gradaccum
import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=False)
if helpers.KERAS3:
    pytest.skip("Keras 3 has no graph mode (its models train in tf.function); "
                "test_graph_optimizer covers graph mode here", allow_module_level=True)

v1 = tf.compat.v1
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "legacy", "examples")
# Keras >= 2.11's default optimizers have no graph mode; their predecessors
# live on under `legacy` (Keras builds those from strings in graph mode).
legacy = getattr(keras.optimizers, "legacy", keras.optimizers)

OPTIMIZERS = {
    "sgd": lambda: legacy.SGD(0.05),
    "nesterov": lambda: legacy.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: legacy.Adam(0.01),
    "adam+schedule": lambda: legacy.Adam(keras.optimizers.schedules.ExponentialDecay(0.02, 3, 0.7)),
    "rmsprop": lambda: legacy.RMSprop(0.01),
    "v1-sgd": lambda: v1.train.GradientDescentOptimizer(0.05),
    "v1-momentum": lambda: v1.train.MomentumOptimizer(0.05, 0.9, use_nesterov=True),
    "v1-adam": lambda: v1.train.AdamOptimizer(0.01),
}
SAMPLES = 100  # = 3 * 32 + 4


def iterations(model):
    return int(keras.backend.get_value(model.optimizer.iterations))


def train(model, x, y, batch_size, optimizer, epochs=2, loss="mse", **fit_kwargs):
    model.compile(optimizer=optimizer, loss=loss)
    validation = fit_kwargs.pop("validation_data", None)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
              validation_data=validation, **fit_kwargs)
    return helpers.weights_of(model), iterations(model)


def compare(model_factory, make_optimizer, x, y, name, n=4, b=8, **kwargs):
    initial = helpers.weights_of(model_factory())

    def run(n, batch_size):
        model = helpers.fresh(model_factory, initial)
        return train(accumulate(model, n) if n is not None else model, x, y, batch_size,
                     make_optimizer(), **dict(kwargs))  # (train pops from its kwargs)

    accumulated, _, _ = helpers.differential("graph-keras/" + name, initial, run, n, b)
    return accumulated[1]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_exact_for_keras_and_v1_optimizers(optimizer):
    x, y = helpers.data(SAMPLES)
    steps = compare(helpers.functional_mlp, OPTIMIZERS[optimizer], x, y, "optimizer/" + optimizer,
                    validation_data=(x[:16], y[:16]))
    assert steps == 2 * math.ceil(SAMPLES / 32.0)


@pytest.mark.parametrize("kind", sorted(helpers.MODELS))
def test_exact_for_every_kind_of_model(kind):
    x, y = helpers.data(SAMPLES)
    compare(helpers.MODELS[kind], OPTIMIZERS["adam"], x, y, "model/" + kind)


def test_exact_with_sample_weight():
    x, y = helpers.data(SAMPLES)
    weights = np.random.RandomState(4).uniform(0.1, 2.0, size=len(x)).astype("float32")
    compare(helpers.functional_mlp, OPTIMIZERS["v1-adam"], x, y, "sample_weight", sample_weight=weights)


def test_exact_with_multiple_inputs_and_outputs():
    inputs, targets = helpers.two_in_two_out_data()
    initial = helpers.weights_of(helpers.two_in_two_out())

    def run(model, batch_size):
        model.compile(optimizer=OPTIMIZERS["adam"](), loss={"first": "mse", "second": "binary_crossentropy"},
                      loss_weights={"first": 1.0, "second": 0.5})
        model.fit(inputs, targets, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        return helpers.weights_of(model)

    accumulated = run(accumulate(helpers.fresh(helpers.two_in_two_out, initial), 4), 8)
    big = run(helpers.fresh(helpers.two_in_two_out, initial), 32)
    small = run(helpers.fresh(helpers.two_in_two_out, initial), 8)
    helpers.assert_same_training(initial, accumulated, big)
    helpers.assert_discriminates(initial, small, big)


def test_exact_on_a_dataset_with_steps_per_epoch():
    x, y = helpers.data(SAMPLES)
    initial = helpers.weights_of(helpers.functional_mlp())

    def run(model, batch_size):
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()
        model.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
        model.fit(dataset, steps_per_epoch=math.ceil(SAMPLES / batch_size), epochs=2, verbose=0)
        return helpers.weights_of(model), iterations(model)

    accumulated, steps = run(accumulate(helpers.fresh(helpers.functional_mlp, initial), 4), 8)
    big, big_steps = run(helpers.fresh(helpers.functional_mlp, initial), 32)
    assert steps == big_steps == 8
    helpers.assert_same_training(initial, accumulated, big)


def test_a_model_compiled_before_wrapping_keeps_its_settings():
    x, y = helpers.data(SAMPLES)
    initial = helpers.weights_of(helpers.functional_mlp())
    compiled = helpers.fresh(helpers.functional_mlp, initial)
    compiled.compile(optimizer=OPTIMIZERS["adam"](), loss="mse", metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
    model = accumulate(compiled, 4)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert set(history.history) >= {"loss", "mae", "updates"}
    assert history.history["updates"] == [4, 8]
    big, _ = train(helpers.fresh(helpers.functional_mlp, initial), x, y, 32, OPTIMIZERS["adam"]())
    helpers.assert_same_training(initial, helpers.weights_of(model), big)


def test_weights_and_iterations_move_only_when_a_window_completes():
    x, y = helpers.data(24)
    model = accumulate(helpers.functional_mlp(), 3)
    model.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
    for step in range(1, 7):
        before = helpers.weights_of(model)
        model.train_on_batch(x[4 * step - 4:4 * step], y[4 * step - 4:4 * step])
        moved = any(not np.array_equal(b, a) for b, a in zip(before, helpers.weights_of(model)))
        assert moved == (step % 3 == 0), "micro-batch {}".format(step)
        assert iterations(model) == step // 3


def test_an_interrupted_fit_leaves_no_open_window_to_the_next_fit():
    class Interrupt(keras.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):  # (TF 1.x's Keras calls this one)
            if batch == 1:  # 2 micro-batches in the open window
                raise KeyboardInterrupt

    x, y = helpers.data(32)  # one window
    initial = helpers.weights_of(helpers.functional_mlp())
    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), 4)
    model.compile(optimizer=OPTIMIZERS["nesterov"](), loss="mse")
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[Interrupt()])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    big, big_steps = train(helpers.fresh(helpers.functional_mlp, initial), x, y, 32, OPTIMIZERS["nesterov"](),
                           epochs=1)
    assert iterations(model) == big_steps == 1  # it once applied 2, the first mixing in the cut-off micro-batches
    helpers.assert_same_training(initial, helpers.weights_of(model), big)


def test_a_subclassed_model_built_before_wrapping_loads_weights_before_training(tmp_path):
    model = accumulate(helpers.subclassed_mlp(), 4)
    path = str(tmp_path / "w.h5")
    model.save_weights(path)
    other = accumulate(helpers.subclassed_mlp(), 4)
    other.load_weights(path)  # refused once: "a subclassed Model which has not created its variables"
    for got, want in zip(helpers.weights_of(other), helpers.weights_of(model)):
        np.testing.assert_array_equal(got, want)


def test_a_batch_size_schedule_matches_plain_training_at_the_scheduled_batches():
    # n is a graph variable here too, assigned in Keras' session between steps.
    from gradaccum import AccumulationScheduler
    x, y = helpers.data(88)
    initial = helpers.weights_of(helpers.functional_mlp())
    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), 4)
    model.compile(optimizer=OPTIMIZERS["nesterov"](), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                        callbacks=[AccumulationScheduler(lambda epoch, n: 1 if epoch < 2 else 4)])
    plain = helpers.fresh(helpers.functional_mlp, initial)
    plain.compile(optimizer=OPTIMIZERS["nesterov"](), loss="mse")
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=32, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
    assert history.history["n"] == [1, 1, 4, 4]
    assert iterations(model) == iterations(plain) == 28
    helpers.record("graph-keras/schedule", helpers.assert_same_training(
        initial, helpers.weights_of(model), helpers.weights_of(plain)))


def test_skip_nonfinite_skips_a_window_with_an_inf_target_whole():
    x, y = helpers.data(96)
    y = y.copy()
    y[41, 1] = np.inf  # window 2 of 3 per epoch (samples 32-63)
    keep = np.r_[0:32, 64:96]
    initial = helpers.weights_of(helpers.functional_mlp())
    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), 4, skip_nonfinite=True)
    model.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    big, big_steps = train(helpers.fresh(helpers.functional_mlp, initial), x[keep], y[keep], 32,
                           OPTIMIZERS["adam"]())
    assert iterations(model) == big_steps == 4
    assert history.history["skipped"] == [1, 2]
    helpers.record("graph-keras/skip_nonfinite", helpers.assert_same_training(
        initial, helpers.weights_of(model), big))


def test_updates_reach_the_progress_bar_and_csv_as_counts(capsys, tmp_path):
    # TF 1.x's progress bar shows only the names graph-mode Keras lists in
    # params["metrics"]; it once left `updates` out. (Graph-mode bars format
    # every value with 4 decimals.)
    x, y = helpers.data(96)
    model = accumulate(helpers.functional_mlp(), 4)
    model.compile(optimizer=OPTIMIZERS["sgd"](), loss="mse")
    log = str(tmp_path / "log.csv")
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=1,
                        callbacks=[keras.callbacks.CSVLogger(log)])
    assert history.history["updates"] == [3, 6]
    printed = capsys.readouterr().out
    assert "updates: 3" in printed and "updates: 6" in printed, printed[-500:]
    with open(log) as handle:
        assert [row["updates"] for row in csv.DictReader(handle)] == ["3", "6"]


def test_n_equal_one_is_plain_training():
    x, y = helpers.data(SAMPLES)
    initial = helpers.weights_of(helpers.functional_mlp())
    once, _ = train(accumulate(helpers.fresh(helpers.functional_mlp, initial), 1), x, y, 8, OPTIMIZERS["adam"]())
    plain, _ = train(helpers.fresh(helpers.functional_mlp, initial), x, y, 8, OPTIMIZERS["adam"]())
    helpers.assert_same_training(initial, once, plain, rel_tol=0)


def test_gradient_clipping_is_refused():
    x, y = helpers.data(16)
    model = accumulate(helpers.functional_mlp(), 2)
    model.compile(optimizer=legacy.SGD(0.1, clipnorm=1.0), loss="mse")
    with pytest.raises(NotImplementedError, match=r"clipping is not supported in graph mode.*clipnorm"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_an_accum_optimizer_inside_an_accumulating_model_is_refused():
    x, y = helpers.data(16)
    model = accumulate(helpers.functional_mlp(), 2)
    model.compile(optimizer=gradaccum.AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), 2), loss="mse")
    with pytest.raises(ValueError, match=r"optimizer is an AccumOptimizer \(n=2\).*accumulates already \(n=2\)"):
        model.fit(x, y, batch_size=8, verbose=0)


@pytest.mark.skipif(not hasattr(getattr(keras, "mixed_precision", None), "set_global_policy"),
                    reason="this Keras has no mixed_precision.set_global_policy")
def test_mixed_precision_is_refused_in_graph_mode():
    # Loss scaling per micro-batch is built into the eager training steps only.
    x, y = helpers.data(16)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = accumulate(helpers.functional_mlp(), 2)
        model.compile(optimizer=legacy.SGD(0.1), loss="mse")  # wrapped in a LossScaleOptimizer
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(NotImplementedError, match=r"LossScaleOptimizer.*not in graph mode.*"
                                                  r"Received: optimizer=LossScaleOptimizer"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_a_strategy_is_refused_in_graph_mode():
    # Graph-mode Keras trains under a strategy with a loop of its own that
    # would train this model plain: refused at fit.
    x, y = helpers.data(16)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = accumulate(helpers.functional_mlp(), 2)
        model.compile(optimizer=legacy.SGD(0.1), loss="mse")
    with pytest.raises(NotImplementedError, match=r"strategies are supported in eager mode.*"
                                                  r"Received: a model compiled under strategy Mirrored"):
        model.fit(x, y, batch_size=8, verbose=0)


@pytest.mark.skipif(hasattr(keras.optimizers.Adam, "get_gradients"),
                    reason="this Keras' default optimizers work in graph mode")
def test_an_optimizer_without_graph_mode_is_a_clear_error():
    x, y = helpers.data(16)
    model = accumulate(helpers.functional_mlp(), 2)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    with pytest.raises(TypeError, match=r"in graph mode the optimizer must be.*Received: optimizer="):
        model.fit(x, y, batch_size=8, verbose=0)


def test_the_keras_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "tf1_keras.py")], cwd=str(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0 and "\nexact\n" in result.stdout, result.stdout[-3000:]
