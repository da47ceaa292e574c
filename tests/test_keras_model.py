"""The model accumulate returns: shared weights, compile transfer, logs, saving."""

import re

import numpy as np
import pytest

import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=True)

N, B = 4, 8


@pytest.mark.core
@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_the_callers_model_is_the_one_trained(kind):
    x, y = helpers.data()
    original = helpers.MODELS[kind]()
    model = accumulate(original, N)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = helpers.weights_of(original)
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    trained = helpers.weights_of(model)
    assert len(trained) == len(before), "accumulators leaked into get_weights()"
    for mine, theirs, old in zip(trained, helpers.weights_of(original), before):
        np.testing.assert_array_equal(mine, theirs)
        assert np.any(mine != old)
    np.testing.assert_array_equal(model.predict(x, verbose=0), original.predict(x, verbose=0))
    original.compile(loss="mse")
    assert model.evaluate(x, y, verbose=0) == pytest.approx(original.evaluate(x, y, verbose=0), rel=1e-6)


@pytest.mark.core
def test_wrapping_a_compiled_model_keeps_its_compile_settings():
    inputs, targets = helpers.two_in_two_out_data()
    initial = helpers.weights_of(helpers.two_in_two_out())

    def compiled():
        model = helpers.fresh(helpers.two_in_two_out, initial)
        model.compile(keras.optimizers.Adam(0.01), loss={"first": "mse", "second": "binary_crossentropy"},
                      loss_weights={"first": 0.3, "second": 2.0}, metrics={"second": ["accuracy"]})
        return model

    original = compiled()
    model = accumulate(original, N)
    assert model.optimizer is original.optimizer
    history = model.fit(inputs, targets, batch_size=B, epochs=2, shuffle=False, verbose=0)
    assert "second_accuracy" in history.history
    big = compiled()
    big.fit(inputs, targets, batch_size=N * B, epochs=2, shuffle=False, verbose=0)
    helpers.assert_same_training(initial, helpers.weights_of(model), helpers.weights_of(big))
    assert int(model.optimizer.iterations.numpy()) == int(big.optimizer.iterations.numpy()) == 6


@pytest.mark.core
def test_logs_count_updates_and_keep_metrics(capsys):
    x, y = helpers.data(100)
    model = accumulate(helpers.functional_mlp(), N)
    model.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])
    history = model.fit(x, y, batch_size=B, epochs=2, verbose=1, validation_data=(x, y))
    assert history.history["updates"] == [4, 8]
    assert set(history.history) >= {"loss", "mae", "val_loss", "val_mae", "updates"}
    printed = capsys.readouterr().out.replace("\r", "\n")
    # The progress bar shows the running count as an integer, not a per-batch
    # average of it, nor "4.0000" as Keras shows a float; n alike.
    shown = re.findall(r"updates: ([0-9.e+-]+)", printed)
    assert shown and all(re.match(r"^[0-9]+$", value) for value in shown), shown
    assert "4" in shown and shown[-1] == "8", shown
    assert set(re.findall(r" n: ([0-9.e+-]+)", printed)) == {"4"}


@pytest.mark.core
@pytest.mark.parametrize("n, options", [(N, {}), (N, {"skip_nonfinite": True}), (1, {})],
                         ids=["window", "skip_nonfinite", "keras-step"])
def test_a_step_returns_what_plain_keras_returns_and_the_epoch_logs_count(n, options):
    # The counts are read where they are shown (the epoch's logs, the progress
    # bar), not returned by every step: a step's each tensor more cost it 1.4%
    # of its time on the benchmark's MLP at n = 8.
    x, y = helpers.data(64)
    plain = helpers.functional_mlp()
    plain.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])
    stepped, fitted = [accumulate(helpers.functional_mlp(), n, **options) for _ in range(2)]
    for model in (stepped, fitted):
        model.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])
    want = plain.train_on_batch(x[:B], y[:B], return_dict=True)
    assert sorted(stepped.train_on_batch(x[:B], y[:B], return_dict=True)) == sorted(want)
    history = fitted.fit(x, y, batch_size=B, epochs=2, verbose=0).history
    assert history["updates"] == [64 // (n * B), 2 * 64 // (n * B)]
    assert history["n"] == [n, n]
    assert ("skipped" in history) == ("skip_nonfinite" in options)


def fit_save_reload_fit(model_factory, initial, path, batch_size, n=None, **save_kwargs):
    """One epoch, save, load without custom_objects, one more epoch."""
    model = helpers.fresh(model_factory, initial)
    if n is not None:
        model = accumulate(model, n)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    x, y = helpers.data(100)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    model.save(path, **save_kwargs)
    reloaded = keras.models.load_model(path)
    if n is not None:
        assert type(reloaded) is type(model)
        assert reloaded.n == n and reloaded.get_config()["n"] == n
        np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    reloaded.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return helpers.weights_of(reloaded), int(reloaded.optimizer.iterations.numpy())


# Keras 2 saves whole models as SavedModel (a directory), .h5 and .keras;
# Keras 3 to .keras, and SavedModel only for inference (`export`, below). Its
# legacy .h5 is left out: Keras 3.15 cannot reload even a plain model compiled
# with loss="mse" from .h5 ("Could not deserialize 'keras.metrics.mse'").
SUFFIXES = {"keras": ".keras"} if helpers.KERAS3 else {"savedmodel": "", "h5": ".h5", "keras": ".keras"}


@pytest.mark.core
@pytest.mark.python
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_saved_model_reloads_and_keeps_accumulating(tmp_path, fmt):
    # The reference goes through the same save and load: formats differ in
    # what optimizer state they restore (Keras 2's SavedModel restores none).
    initial = helpers.weights_of(helpers.functional_mlp())
    accumulated, acc_steps = fit_save_reload_fit(
        helpers.functional_mlp, initial, str(tmp_path / ("acc" + SUFFIXES[fmt])), B, n=N)
    big, big_steps = fit_save_reload_fit(helpers.functional_mlp, initial, str(tmp_path / ("big" + SUFFIXES[fmt])), N * B)
    helpers.assert_same_training(initial, accumulated, big)
    assert acc_steps == big_steps


def test_a_fresh_process_that_imports_gradaccum_loads_the_model(tmp_path):
    # `import gradaccum` registers the classes of the Keras that tf.keras is,
    # before that Keras is even imported by the program.
    import subprocess
    import sys
    x, y = helpers.data()
    model = accumulate(helpers.functional_mlp(), N)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    code = ("import gradaccum, tensorflow as tf; m = tf.keras.models.load_model({!r}); "
            "print(type(m).__module__, type(m).__name__, m.n, int(m.optimizer.iterations.numpy()))").format(path)
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=300)
    route = "gradaccum._keras3" if helpers.KERAS3 else "gradaccum._keras2"
    assert result.stdout.split() == [route, "AccumModel", str(N), "3"], result.stderr[-2000:]


@keras.utils.register_keras_serializable(package="gradaccum_tests")
class RegisteredMLP(helpers.SubclassedMLP):
    pass


def registered_mlp():
    model = RegisteredMLP()
    model(np.zeros((1, 5), "float32"))
    return model


@pytest.mark.core
def test_subclassed_model_reloads(tmp_path):
    # Keras 2 saves subclassed models as SavedModel; Keras 3 to .keras.
    suffix, options = (".keras", {}) if helpers.KERAS3 else ("", {"save_format": "tf"})
    initial = helpers.weights_of(registered_mlp())
    accumulated, acc_steps = fit_save_reload_fit(
        registered_mlp, initial, str(tmp_path / ("acc" + suffix)), B, n=N, **options)
    big, big_steps = fit_save_reload_fit(registered_mlp, initial, str(tmp_path / ("big" + suffix)), N * B, **options)
    helpers.assert_same_training(initial, accumulated, big)
    assert acc_steps == big_steps


@pytest.mark.skipif(not hasattr(keras.Model, "export"), reason="this Keras has no Model.export")
@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_export_serves_the_trained_model(tmp_path, kind):
    # export() writes an inference SavedModel (Keras >= 2.13 and 3): it must
    # serve what the trained model predicts, with no accumulator in it.
    import tensorflow as tf
    x, y = helpers.data()
    model = accumulate(helpers.MODELS[kind](), N)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    model.export(str(tmp_path / "served"))
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x).numpy(), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert not any("gradaccum" in v.name for v in served.variables)


def test_numpy_integer_n_is_accepted():
    assert accumulate(helpers.functional_mlp(), np.int64(3)).n == 3


def test_accumulating_twice_is_refused():
    once = accumulate(helpers.functional_mlp(), 2)
    with pytest.raises(ValueError, match=r"already accumulates gradients \(n=2\)"):
        accumulate(once, 2)


class OwnTrainStep(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        return self.dense(inputs)

    def train_step(self, data):
        return super().train_step(data)


def test_model_with_its_own_train_step_is_refused():
    with pytest.raises(ValueError, match="overrides train_step"):
        accumulate(OwnTrainStep(), 4)


@helpers.keras3_only
def test_keras3s_own_accumulation_option_is_refused():
    # Both would accumulate: n * gradient_accumulation_steps micro-batches per update.
    x, y = helpers.data()
    model = accumulate(helpers.functional_mlp(), N)
    model.compile(keras.optimizers.Adam(0.01, gradient_accumulation_steps=2), "mse")
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2.*Received: optimizer=Adam"):
        model.fit(x, y, batch_size=B, verbose=0)


@helpers.keras3_only
def test_keras3s_own_accumulation_option_is_not_the_big_batch():
    # Why gradaccum exists on Keras 3: the optimizer option advances its
    # learning-rate schedule on every micro-step, so it trains differently
    # from the big batch, where accumulate() does not (test_keras_exact).
    x, y = helpers.data()
    initial = helpers.weights_of(helpers.functional_mlp())

    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)

    native = helpers.fresh(helpers.functional_mlp, initial)
    native.compile(keras.optimizers.Adam(schedule(), gradient_accumulation_steps=N), "mse")
    native.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    big = helpers.fresh(helpers.functional_mlp, initial)
    big.compile(keras.optimizers.Adam(schedule()), "mse")
    big.fit(x, y, batch_size=N * B, epochs=2, shuffle=False, verbose=0)
    error = helpers.assert_discriminates(initial, helpers.weights_of(native), helpers.weights_of(big))
    helpers.record("keras3-native-option/adam-schedule", error)


@pytest.mark.core
def test_a_fit_with_a_short_last_window_traces_the_step_as_often_as_plain_keras():
    # Issue 16, contract 4. 88 samples at b = 8 are 11 micro-batches an
    # epoch: two windows of 4 and a short one of 3, applied at the epoch's
    # end. Each Python run of train_step is one trace (fit runs it in a
    # tf.function); a window that traced its update again at the epoch's end,
    # or in the next epoch, would count more than plain Keras at b does.
    x, y = helpers.data(88)
    traces = {}
    for n in (None, N):
        model = helpers.functional_mlp()
        if n is not None:
            model = accumulate(model, n)
        model.compile(keras.optimizers.Adam(0.01), "mse")
        counted = []
        step = model.train_step
        model.train_step = lambda data, step=step, counted=counted: counted.append(1) or step(data)
        model.fit(x, y, batch_size=B, epochs=3, shuffle=False, verbose=0)
        traces[n] = len(counted)
        assert helpers.steps_of(model) == (3 * 11 if n is None else 3 * 3)
    assert 1 <= traces[N] == traces[None], traces
