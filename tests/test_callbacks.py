"""Keras' common callbacks on an accumulating model (issue 15): each against the big batch,
or against what it means per epoch.

Epoch-level callbacks see the epoch's final weights (gradaccum's window
callback runs first). Batch-level ones count micro-batches, as README says.
"""

import numpy as np
import pytest

import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=True)

N, B = 4, 8


def fit_run(initial, n, batch_size, callbacks=(), epochs=3, x=None, y=None, optimizer="momentum"):
    model = helpers.fresh(helpers.functional_mlp, initial)
    if n is not None:
        model = accumulate(model, n)
    model.compile(helpers.OPTIMIZERS[optimizer](), "mse")
    if x is None:
        x, y = helpers.data(88)  # windows of 4, 4, 3 per epoch
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=list(callbacks))
    return helpers.weights_of(model), helpers.steps_of(model), model, history


def test_learning_rate_scheduler_sets_the_rate_of_each_epochs_updates():
    initial = helpers.weights_of(helpers.functional_mlp())
    schedule = lambda: keras.callbacks.LearningRateScheduler(lambda epoch, rate: 0.1 / (2 ** epoch))
    helpers.differential("callbacks/LearningRateScheduler", initial,
                         lambda n, size: fit_run(initial, n, size, [schedule()]), N, B)


def test_early_stopping_restores_the_best_epochs_final_weights():
    # min_delta 10: no later epoch counts as better than the first, so it
    # stops after the second and restores the first epoch's final weights
    # (its partial window applied).
    initial = helpers.weights_of(helpers.functional_mlp())
    ends = helpers.EpochEnds()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=10.0, restore_best_weights=True)
    weights, _, _, history = fit_run(initial, N, B, [ends, stop], epochs=6)
    assert len(history.history["loss"]) == 2, history.history["loss"]
    for got, want in zip(weights, ends.seen[0][0]):
        np.testing.assert_array_equal(got, want)


def test_model_checkpoint_save_best_only_saves_the_best_epochs_final_weights(tmp_path):
    initial = helpers.weights_of(helpers.functional_mlp())
    ends = helpers.EpochEnds()
    path = str(tmp_path / "best.weights.h5")
    save = keras.callbacks.ModelCheckpoint(path, monitor="loss", save_best_only=True, save_weights_only=True)
    _, _, model, history = fit_run(initial, N, B, [ends, save], epochs=3)
    best = int(np.argmin(history.history["loss"]))
    model.load_weights(path)
    for got, want in zip(helpers.weights_of(model), ends.seen[best][0]):
        np.testing.assert_array_equal(got, want)


def test_terminate_on_nan_stops_where_the_big_batch_goes_nan():
    # A target of 1e30 overflows the loss in the first epoch: plain training
    # and accumulation stop in that epoch.
    x, y = helpers.data(88)
    y[20] = 1e30
    initial = helpers.weights_of(helpers.functional_mlp())
    for n, size in ((N, B), (None, N * B)):
        _, _, _, history = fit_run(initial, n, size, [keras.callbacks.TerminateOnNaN()], epochs=3, x=x, y=y)
        assert len(history.history["loss"]) == 1
        assert not np.isfinite(history.history["loss"][0])


def test_reduce_lr_on_plateau_acts_on_the_epochs_loss():
    # It lowers the user's optimizer's rate: with patience 0 and min_delta
    # 10 it halves it after every epoch but the first, on both runs alike.
    initial = helpers.weights_of(helpers.functional_mlp())
    plateau = lambda: keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)
    accumulated, _, model, _ = fit_run(initial, N, B, [plateau()], optimizer="sgd")
    big, _, big_model, _ = fit_run(initial, None, N * B, [plateau()], optimizer="sgd")
    rate = lambda m: float(m.optimizer.learning_rate.numpy())
    assert rate(model) == rate(big_model) == pytest.approx(0.1 / 4)
    helpers.record("callbacks/ReduceLROnPlateau", helpers.assert_same_training(initial, accumulated, big))


def test_tensorboard_writes_updates_as_the_count_of_each_epoch(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (tf.summary needs it)")
    import tensorflow as tf
    initial = helpers.weights_of(helpers.functional_mlp())
    _, _, _, history = fit_run(initial, N, B, [keras.callbacks.TensorBoard(str(tmp_path))])
    scalars = {}
    for path in tf.io.gfile.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if not value.tag.startswith("epoch_"):
                    continue
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                scalars.setdefault(value.tag, []).append((event.step, float(number)))
    updates = [value for _, value in sorted(scalars["epoch_updates"])]
    assert history.history["updates"] == [3, 6, 9]
    assert updates == [3.0, 6.0, 9.0]  # (a TensorBoard scalar is a float; each is the count)
