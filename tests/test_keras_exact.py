"""Differential tests: accumulate(model, n) at batch b equals plain training at n*b.

On Keras 2 and Keras 3 alike (see helpers.keras); what one Keras lacks skips
by capability.
"""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=True)

N, B = 4, 8

OPTIMIZERS = helpers.OPTIMIZERS


def train(model, x, y, batch_size, optimizer, epochs=2, loss="mse", compile_kwargs=None, **fit_kwargs):
    model.compile(optimizer=optimizer, loss=loss, **(compile_kwargs or {}))
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, **fit_kwargs)
    return helpers.weights_of(model), int(model.optimizer.iterations.numpy()), history


def compare(model_factory, make_optimizer, x, y, name, n=N, b=B, epoch_end="apply", **kwargs):
    """Trains accumulated (b, n), big (n*b) and small (b) from one start; checks and returns errors."""
    initial = helpers.weights_of(model_factory())

    def run(n, batch_size):
        model = helpers.fresh(model_factory, initial)
        if n is not None:
            model = accumulate(model, n, epoch_end=epoch_end)
        return train(model, x, y, batch_size, make_optimizer(), **kwargs)

    accumulated, _, _ = helpers.differential(name, initial, run, n, b)
    return accumulated[2]  # its History


@pytest.mark.parametrize("optimizer", helpers.core_params(sorted(OPTIMIZERS), helpers.CORE_OPTIMIZERS))
def test_optimizers_match_big_batch(optimizer):
    x, y = helpers.data()
    history = compare(helpers.functional_mlp, OPTIMIZERS[optimizer], x, y, "optimizer/" + optimizer)
    assert history.history["updates"] == [3, 6]


OPTIONS = helpers.GRADIENT_OPTIONS


@pytest.mark.parametrize("option", helpers.core_params(sorted(OPTIONS), helpers.CORE_GRADIENT_OPTIONS))
def test_optimizer_options_act_once_per_update_on_the_accumulated_gradient(option):
    def make_optimizer(**extra):
        return keras.optimizers.SGD(0.1, momentum=0.9, **extra)

    if not helpers.optimizer_accepts(make_optimizer, **OPTIONS[option]):
        pytest.skip("this Keras' SGD has no {} option".format(option))
    x, y = helpers.data()
    compare(helpers.functional_mlp, lambda: make_optimizer(**OPTIONS[option]), x, y, "option/" + option)
    # The option must change big-batch training, or equality would not show
    # that it acted on the accumulated gradient.
    initial = helpers.weights_of(helpers.functional_mlp())
    with_option, _, _ = train(helpers.fresh(helpers.functional_mlp, initial), x, y, N * B,
                              make_optimizer(**OPTIONS[option]))
    without, _, _ = train(helpers.fresh(helpers.functional_mlp, initial), x, y, N * B, make_optimizer())
    helpers.assert_discriminates(initial, without, with_option)


@pytest.mark.core
@pytest.mark.python
@pytest.mark.parametrize("kind", sorted(helpers.MODELS))
def test_model_kinds_match_big_batch(kind):
    x, y = helpers.data()
    compare(helpers.MODELS[kind], OPTIMIZERS["adam"], x, y, "model/" + kind)


@pytest.mark.parametrize("repeated", [False, True], ids=["distinct-rows", "repeated-rows"])
@pytest.mark.parametrize("optimizer", ["momentum", "adam", "rmsprop"])
def test_embedding_sparse_gradients_match_big_batch(optimizer, repeated, request):
    # An embedding's gradient is sparse (IndexedSlices): momentum, Adam and
    # RMSprop update only the rows it names, so the window must too.
    if helpers.KERAS3 and repeated and optimizer != "momentum":
        # Keras 3's TF optimizers do not sum an IndexedSlices' repeated rows
        # before squaring: the big batch's Adam/RMSprop second moment gets
        # sum(g_i^2) over a row's occurrences, not (sum g_i)^2 (Keras 2 sums
        # them first). A window holds the sum, so it equals the mathematically
        # identical dense gradient, not Keras 3's per-occurrence arithmetic.
        request.applymarker(pytest.mark.xfail(strict=True, reason="Keras 3 squares repeated sparse rows separately"))
    _, y = helpers.data()
    x = helpers.tokens(len(y), repeated)
    compare(lambda: helpers.embedding_model(vocabulary=len(y) * 4), OPTIMIZERS[optimizer], x, y,
            "sparse/{}/{}".format(optimizer, "repeated" if repeated else "distinct"))


def test_sample_weight_matches_big_batch():
    x, y = helpers.data()
    sample_weight = np.random.RandomState(1).uniform(0.0, 3.0, size=len(x)).astype("float32")
    compare(helpers.functional_mlp, OPTIMIZERS["momentum"], x, y, "weighting/sample_weight",
            sample_weight=sample_weight)


def classifier(n_features=5, n_classes=3):
    inputs = keras.Input((n_features,))
    outputs = keras.layers.Dense(n_classes, activation="softmax")(keras.layers.Dense(8, activation="relu")(inputs))
    return keras.Model(inputs, outputs)


def test_class_weight_matches_big_batch():
    x, _ = helpers.data()
    labels = np.argmax(x[:, :3], axis=1)
    compare(classifier, OPTIMIZERS["adam"], x, labels, "weighting/class_weight",
            loss="sparse_categorical_crossentropy", class_weight={0: 1.0, 1: 4.0, 2: 0.5})


def test_multi_input_multi_output_loss_weights_match_big_batch():
    inputs, targets = helpers.two_in_two_out_data()
    compare(helpers.two_in_two_out, OPTIMIZERS["rmsprop"], inputs, targets, "weighting/multi_io",
            loss={"first": "mse", "second": "binary_crossentropy"},
            compile_kwargs={"loss_weights": {"first": 0.3, "second": 2.0}})


# The core subset keeps 84: a last window short by a micro-batch, whose own
# last micro-batch is short too (weighted by samples, 8, 8, 4).
@pytest.mark.parametrize("n_samples", [100, pytest.param(84, marks=pytest.mark.core)],
                         ids=["last-window-one-short-batch", "last-window-three-batches"])
def test_ragged_window_applies_at_epoch_end(n_samples):
    # 100 = 3*32 + 4: the last window is one micro-batch of 4 samples, which
    # must count 4/4, not 1/4. 84 = 2*32 + 20: three micro-batches 8, 8, 4.
    x, y = helpers.data(n_samples)
    history = compare(helpers.functional_mlp, OPTIMIZERS["momentum"], x, y, "ragged/{}".format(n_samples), epochs=3)
    updates_per_epoch = -(-n_samples // (N * B))
    assert history.history["updates"] == [updates_per_epoch * e for e in (1, 2, 3)]


@helpers.needs_jit_compile
def test_steps_per_execution_and_jit_compile_match_big_batch():
    x, y = helpers.data(100)
    compare(helpers.functional_mlp, OPTIMIZERS["adam"], x, y, "ragged/steps_per_execution+jit",
            compile_kwargs={"steps_per_execution": 3, "jit_compile": True})


@pytest.mark.core
@helpers.needs_jit_compile
def test_jit_compile_matches_big_batch():
    x, y = helpers.data()
    compare(helpers.sequential_mlp, OPTIMIZERS["nesterov"], x, y, "jit_compile",
            compile_kwargs={"jit_compile": True})


def test_run_eagerly_matches_big_batch():
    # No tf.function: the training step runs, and the window decides, in Python each time.
    x, y = helpers.data(100)
    compare(helpers.functional_mlp, OPTIMIZERS["adam-schedule"], x, y, "run_eagerly",
            compile_kwargs={"run_eagerly": True})


def unknown_length(x, y, batch_size):
    """A dataset whose cardinality Keras cannot know in advance."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True)
    return dataset.batch(batch_size)


def test_unknown_epoch_length_with_validation_matches_big_batch():
    # The epoch's end is only discovered when the data runs out; the partial
    # window must still be applied before validation and the epoch's end.
    # The reference gets the same data as arrays: tf-keras >= 2.11's new
    # optimizers count one extra iteration per epoch on unknown-length data
    # even in plain training, so an unknown-length reference would be wrong.
    x, y = helpers.data(100)
    initial = helpers.weights_of(helpers.functional_mlp())
    validation = (x[:20], y[:20])
    accumulated = accumulate(helpers.fresh(helpers.functional_mlp, initial), N)
    accumulated.compile(OPTIMIZERS["adam"](), "mse")
    acc_history = accumulated.fit(unknown_length(x, y, B), epochs=2, verbose=0, validation_data=validation)
    big = helpers.fresh(helpers.functional_mlp, initial)
    big.compile(OPTIMIZERS["adam"](), "mse")
    big_history = big.fit(x, y, batch_size=N * B, epochs=2, shuffle=False, verbose=0, validation_data=validation)
    helpers.assert_same_training(initial, helpers.weights_of(accumulated), helpers.weights_of(big))
    np.testing.assert_allclose(acc_history.history["val_loss"], big_history.history["val_loss"], rtol=1e-5)
    assert int(accumulated.optimizer.iterations.numpy()) == int(big.optimizer.iterations.numpy()) == 8
    assert acc_history.history["updates"] == [4, 8]


def test_carry_keeps_windows_open_across_epochs():
    # Streaming: 6 micro-batches per epoch, n=4. Carried over, windows span
    # epochs, so 4 epochs are 6 updates, like 6 big batches of the stream.
    x, y = helpers.data(96)
    initial = helpers.weights_of(helpers.functional_mlp())
    stream = tf.data.Dataset.from_tensor_slices((x, y)).repeat()

    def run(model, batch, steps, epochs):
        model.compile(OPTIMIZERS["momentum"](), "mse")
        model.fit(stream.batch(batch), steps_per_epoch=steps, epochs=epochs, verbose=0)
        return helpers.weights_of(model), int(model.optimizer.iterations.numpy())

    carried, carried_steps = run(accumulate(helpers.fresh(helpers.functional_mlp, initial), N, epoch_end="carry"), B, 6, 4)
    big, big_steps = run(helpers.fresh(helpers.functional_mlp, initial), N * B, 6, 1)
    applied, applied_steps = run(accumulate(helpers.fresh(helpers.functional_mlp, initial), N), B, 6, 4)
    assert carried_steps == big_steps == 6
    assert applied_steps == 8  # "apply" closes each epoch's 4 + 2 windows
    helpers.assert_same_training(initial, carried, big)
    helpers.assert_discriminates(initial, applied, big)


def test_n_equal_one_is_plain_training():
    x, y = helpers.data(100)
    initial = helpers.weights_of(helpers.functional_mlp())
    one = accumulate(helpers.fresh(helpers.functional_mlp, initial), 1)
    one_weights, one_steps, history = train(one, x, y, B, OPTIMIZERS["adam"]())
    plain_weights, plain_steps, _ = train(helpers.fresh(helpers.functional_mlp, initial), x, y, B, OPTIMIZERS["adam"]())
    for got, want in zip(one_weights, plain_weights):
        np.testing.assert_array_equal(got, want)
    assert one_steps == plain_steps == history.history["updates"][-1] == 26
    assert not one._accum_window.built, "n=1 must not create accumulators"
