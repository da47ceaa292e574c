"""gradaccum.AccumOptimizer around Keras optimizers: custom loops and compile, against the big batch.

Differential as everywhere: the same loop (or fit) at micro-batch b through
AccumOptimizer(optimizer, n), against the plain optimizer at n*b and at b,
from the same initial weights, on Keras 2, tf-keras and Keras 3.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import AccumOptimizer, accumulate

helpers.require_mode(eager=True)

N, B = 4, 8
OPTIMIZERS = {name: helpers.OPTIMIZERS[name] for name in ("momentum", "rmsprop", "adam-schedule")}
# 96 samples fill whole windows of 4 x 8; 84 leave a last window of 8, 8, 4.
SAMPLES = {"whole-windows": 96, "short-last-window": 84}


# Every optimizer in every mode on whole windows; the short last window (which
# only changes what flush() and batch_size do, not the mode) in tf.function.
# Two cases run everywhere; the rest in one environment per Keras flavour.
LIGHT_CASES = [("adam-schedule", "function", "whole-windows"), ("momentum", "function", "short-last-window")]
LOOP_CASES = [(optimizer, mode, "whole-windows") for optimizer in sorted(OPTIMIZERS)
              for mode in ("eager", "function", "jit")]
LOOP_CASES += [(optimizer, "function", "short-last-window") for optimizer in sorted(OPTIMIZERS)]
# The light cases are in the core subset too, which runs on every TF minor,
# and in the Python subset (AutoGraph reads the loop's Python source).
LOOP_CASES = [pytest.param(*case, marks=[pytest.mark.core, pytest.mark.python] if case in LIGHT_CASES
                           else pytest.mark.heavy)
              for case in LOOP_CASES]


@pytest.mark.parametrize("optimizer, mode, samples", LOOP_CASES)
def test_custom_loop_matches_the_big_batch(optimizer, mode, samples):
    x, y = helpers.data(SAMPLES[samples])
    helpers.compare_loop(helpers.functional_mlp, OPTIMIZERS[optimizer], x, y,
                         "loop/{}/{}/{}".format(optimizer, mode, samples), mode=mode)


def test_without_batch_size_micro_batches_count_equally():
    # Exact for equal micro-batches; with a short last one, each counts 1/n
    # of the window, which the big batch does not do: batch_size is needed.
    x, y = helpers.data(96)
    helpers.compare_loop(helpers.functional_mlp, OPTIMIZERS["momentum"], x, y, "loop/unweighted",
                         weighted=False)
    x, y = helpers.data(84)
    initial = helpers.weights_of(helpers.functional_mlp())
    unweighted, _, _ = helpers.train_loop(helpers.functional_mlp, initial, OPTIMIZERS["momentum"], x, y, B,
                                          n=N, weighted=False)
    big, _, _ = helpers.train_loop(helpers.functional_mlp, initial, OPTIMIZERS["momentum"], x, y, N * B)
    helpers.assert_discriminates(initial, unweighted, big)


# EMA is left out: a custom loop's weights are the trained ones until the
# loop calls finalize_variable_values, so EMA would not change them.
OPTIONS = {name: options for name, options in helpers.GRADIENT_OPTIONS.items() if name != "use_ema"}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_optimizer_options_act_once_per_update_in_a_custom_loop(option):
    def make_optimizer(**extra):
        return keras.optimizers.SGD(0.1, momentum=0.9, **extra)

    if not helpers.optimizer_accepts(make_optimizer, **OPTIONS[option]):
        pytest.skip("this Keras' SGD has no {} option".format(option))
    x, y = helpers.data()
    helpers.compare_loop(helpers.functional_mlp, lambda: make_optimizer(**OPTIONS[option]), x, y,
                         "loop-option/" + option)
    initial = helpers.weights_of(helpers.functional_mlp())
    with_option, _, _ = helpers.train_loop(helpers.functional_mlp, initial,
                                           lambda: make_optimizer(**OPTIONS[option]), x, y, N * B)
    without, _, _ = helpers.train_loop(helpers.functional_mlp, initial, make_optimizer, x, y, N * B)
    helpers.assert_discriminates(initial, without, with_option)


@pytest.mark.core
def test_micro_steps_leave_the_wrapped_optimizer_alone_and_iterations_count_updates():
    x, y = helpers.data(64)
    model = helpers.functional_mlp()
    inner = keras.optimizers.Adam(0.01)
    opt = AccumOptimizer(inner, N)
    assert opt.n == N and opt.inner_optimizer is inner

    @tf.function
    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        return opt.apply_gradients(zip(grads, model.trainable_variables))

    applied = [bool(step(x[i:i + B], y[i:i + B]).numpy()) for i in range(0, 64, B)]
    assert applied == [False, False, False, True] * 2
    assert opt.iterations is inner.iterations and int(opt.iterations.numpy()) == 2
    before = helpers.weights_of(model)
    for i in range(0, 24, B):
        step(x[i:i + B], y[i:i + B])
        assert int(opt.iterations.numpy()) == 2
        for got, want in zip(helpers.weights_of(model), before):
            np.testing.assert_array_equal(got, want)
    # The learning rate is the wrapped optimizer's: Keras callbacks set it.
    opt.learning_rate = 0.5
    assert float(np.array(inner.learning_rate)) == 0.5
    assert float(np.array(opt.learning_rate)) == 0.5


def test_flush_applies_a_partial_window_once_and_an_empty_one_not_at_all():
    x, y = helpers.data(16)
    model = helpers.functional_mlp()
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), N)
    assert not bool(opt.flush().numpy())  # nothing yet
    for i in range(0, 16, B):
        with tf.GradientTape() as tape:
            loss = helpers.mse_with_regularizers(model, x[i:i + B], y[i:i + B])
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables), batch_size=B)
    assert int(opt.iterations.numpy()) == 0
    assert bool(opt.flush().numpy()) and int(opt.iterations.numpy()) == 1
    assert not bool(opt.flush().numpy()) and int(opt.iterations.numpy()) == 1


def test_sparse_embedding_gradients_accumulate_sparsely():
    # Momentum updates only the rows a sparse gradient names; a dense mean
    # would move every row's velocity.
    _, y = helpers.data()
    x = helpers.tokens(len(y), repeated=False)
    helpers.compare_loop(lambda: helpers.embedding_model(vocabulary=len(y) * 4), OPTIMIZERS["momentum"], x, y,
                         "loop-sparse/momentum")


# --- compile: Keras' train_step, or a model's own, through the wrapper ---

class OwnTrainStep(helpers.SubclassedMLP):
    """A model with its own train_step (as GANs and Hugging Face models have)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y)) + tf.add_n(self.losses)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


def own_train_step_model():
    model = OwnTrainStep()
    model(np.zeros((1, 5), "float32"))
    return model


@pytest.mark.core
@pytest.mark.parametrize("kind", ["functional", "own-train-step"])
def test_compile_with_the_wrapper_matches_the_big_batch(kind):
    factory = helpers.functional_mlp if kind == "functional" else own_train_step_model
    x, y = helpers.data(96)  # whole windows: fit's epochs are invisible to an optimizer
    initial = helpers.weights_of(factory())
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.05 / (epoch + 1))

    def fit(n, batch_size):
        optimizer = OPTIMIZERS["momentum"]()
        model = helpers.fresh(factory, initial)
        model.compile(optimizer=AccumOptimizer(optimizer, n) if n is not None else optimizer, loss="mse")
        model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=[schedule])
        return helpers.weights_of(model), helpers.steps_of(model)

    _, big, _ = helpers.differential("compile/" + kind, initial, fit, N, B)
    assert big[1] == 6


# --- checkpoints ---

_RESUME = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    import helpers
    from gradaccum import AccumOptimizer

    workdir, stop, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
    initial = list(np.load(workdir + "/initial.npz").values())
    x, y = helpers.data(96)
    model = helpers.fresh(helpers.functional_mlp, initial)
    opt = AccumOptimizer(helpers.OPTIMIZERS["adam-schedule"](), 4)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    if resume:
        checkpoint.restore(workdir + "/mid-window")  # the optimizer's variables come later: deferred

    @tf.function
    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            loss = helpers.mse_with_regularizers(model, x_batch, y_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables), batch_size=tf.shape(x_batch)[0])

    micro_batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 96, 8)]
    for index, (x_batch, y_batch) in enumerate(micro_batches):
        if resume and index < stop:
            continue
        if not resume and index == stop:
            checkpoint.write(workdir + "/mid-window")
            np.savez(workdir + "/weights-at-stop.npz", *helpers.weights_of(model))
        step(x_batch, y_batch)
    np.savez(workdir + ("/resumed.npz" if resume else "/uninterrupted.npz"),
             steps=opt.iterations.numpy(), *helpers.weights_of(model))
""")


@pytest.mark.heavy
def test_a_checkpoint_taken_mid_window_resumes_bitwise_in_a_new_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    initial = helpers.weights_of(helpers.functional_mlp())
    np.savez(str(tmp_path / "initial.npz"), *initial)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    stop = 6  # one update done, 2 of the second window's 4 micro-batches in the sums

    def run(mode):
        result = subprocess.run([sys.executable, str(script), str(tmp_path), str(stop), mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]

    run("uninterrupted")
    run("resume")
    uninterrupted = np.load(str(tmp_path / "uninterrupted.npz"))
    resumed = np.load(str(tmp_path / "resumed.npz"))
    assert int(resumed["steps"]) == int(uninterrupted["steps"]) == 3
    for key in uninterrupted.files:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    # The stop was mid-window: resuming without the sums would differ.
    reader = tf.train.load_checkpoint(str(tmp_path / "mid-window"))
    names = [name for name in reader.get_variable_to_shape_map() if "gradaccum" in name]
    counts = [int(reader.get_tensor(name)) for name in names if "/count/" in name]
    assert counts == [2], names
    assert any("sum" in name for name in names), names


_KERAS_FILES = hasattr(keras.optimizers.Adam(), "save_own_variables")  # Keras' saving_lib


@pytest.mark.core
@pytest.mark.skipif(not _KERAS_FILES, reason="this Keras has no .keras files (saving_lib)")
def test_a_keras_file_saved_mid_window_resumes_bitwise(tmp_path):
    initial = helpers.weights_of(helpers.functional_mlp())
    path = str(tmp_path / "mid-window.keras")

    def compiled():
        model = helpers.fresh(helpers.functional_mlp, initial)
        model.compile(optimizer=AccumOptimizer(OPTIMIZERS["adam-schedule"](), N), loss="mse")
        return model

    def save(model):
        model.save(path)
        return path

    def restore(saved):
        model = keras.models.load_model(saved)
        assert isinstance(model.optimizer, AccumOptimizer)
        return model

    helpers.assert_resumes_mid_window(initial, compiled, save, restore,
                                      lambda model: model.optimizer._accum_window.reset())


def test_the_accumulators_are_not_model_weights():
    model = helpers.functional_mlp()
    before = len(model.get_weights())
    opt = AccumOptimizer(keras.optimizers.SGD(0.1), N)
    x, y = helpers.data(8)
    with tf.GradientTape() as tape:
        loss = helpers.mse_with_regularizers(model, x, y)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    assert len(model.get_weights()) == before


# --- clear errors ---

def test_bad_arguments_are_refused_with_what_was_received():
    with pytest.raises(TypeError, match=r"must be a tf.compat.v1.train.Optimizer or a Keras optimizer.*Received: optimizer='adam'"):
        AccumOptimizer("adam", 4)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1.*Received: n=0"):
        AccumOptimizer(keras.optimizers.SGD(), 0)
    with pytest.raises(TypeError, match=r"Received: n=2.5"):
        AccumOptimizer(keras.optimizers.SGD(), 2.5)
    wrapped = AccumOptimizer(keras.optimizers.SGD(), 4)
    assert isinstance(wrapped, AccumOptimizer)
    with pytest.raises(ValueError, match=r"already accumulates \(n=4\)"):
        AccumOptimizer(wrapped, 2)
    with pytest.raises(ValueError, match=r"reduction must be one of .*Received: reduction='median'"):
        AccumOptimizer(keras.optimizers.SGD(), 4, reduction="median")


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_a_bad_batch_size_is_refused(batch_size):
    variable = tf.Variable([1.0])
    opt = AccumOptimizer(keras.optimizers.SGD(), 4)
    with pytest.raises(ValueError, match=r"batch_size must be .*Received: batch_size={}".format(
            repr(batch_size).replace(".", r"\."))):
        opt.apply_gradients([(tf.constant([1.0]), variable)], batch_size=batch_size)


@pytest.mark.core
def test_made_with_n_1_it_is_the_wrapped_optimizer_and_its_n_stays_1():
    # The same loop with AccumOptimizer(opt, 1) and with opt: the same
    # weights to the bit (through the window, each gradient became its
    # mean, size * g / size, rounded) and the same step count.
    x, y = helpers.data(80)  # (micro-batches of 12 and a short last one of 8)
    initial = helpers.weights_of(helpers.functional_mlp())
    wrapped, wrapped_steps, opt = helpers.train_loop(
        helpers.functional_mlp, initial, OPTIMIZERS["adam-schedule"], x, y, 12, n=1)
    plain, plain_steps, _ = helpers.train_loop(helpers.functional_mlp, initial, OPTIMIZERS["adam-schedule"], x, y, 12)
    assert wrapped_steps == plain_steps == 2 * 7
    for got, want in zip(wrapped, plain):
        np.testing.assert_array_equal(got, want)
    assert not opt._accum_window.built  # (nothing went through a window)
    opt.n = 1
    with pytest.raises(ValueError, match=r"made with n=1.*AccumOptimizer\(optimizer, 4\).*Received: n=4"):
        opt.n = 4
    grown = AccumOptimizer(keras.optimizers.SGD(), 4)
    grown.n = 1  # (made with a window, it goes down to 1 and back)
    grown.n = 4


@helpers.keras3_only
def test_made_with_n_1_around_a_loss_scale_optimizer_it_keeps_its_window_and_can_grow():
    # Keras 3's route scales the loss through the window, so n = 1 keeps it.
    opt = AccumOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), 1)
    opt.n = 4
    assert opt.n == 4


def test_a_negative_batch_size_tensor_is_refused_when_it_runs():
    variable = tf.Variable([1.0])
    opt = AccumOptimizer(keras.optimizers.SGD(), 4)

    @tf.function
    def step(batch_size):
        opt.apply_gradients([(tf.constant([1.0]), variable)], batch_size=batch_size)

    step(tf.constant(0))  # a replica without samples: allowed
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch_size must be >= 0.*Received: batch_size\] \[-3\]"):
        step(tf.constant(-3))
    # (An int32 is shown as it is, another dtype as a string.)
    step(tf.constant(2.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch_size must be >= 0.*Received: batch_size\] \[-2.5\]"):
        step(tf.constant(-2.5))


def test_an_accum_optimizer_inside_an_accumulating_model_is_refused():
    x, y = helpers.data(32)
    model = accumulate(helpers.functional_mlp(), 2)
    model.compile(AccumOptimizer(keras.optimizers.SGD(0.1), 4), "mse")
    with pytest.raises(ValueError, match=r"optimizer is an AccumOptimizer \(n=4\), and the model accumulates"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@helpers.keras3_only
def test_keras3_own_gradient_accumulation_is_refused():
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2"):
        AccumOptimizer(keras.optimizers.Adam(gradient_accumulation_steps=2), 4)


@helpers.keras3_only
def test_keras3_minimize_is_refused_clearly():
    opt = AccumOptimizer(keras.optimizers.SGD(), 4)
    variable = tf.Variable(1.0)
    with pytest.raises(TypeError, match=r"Keras 3 optimizers have no minimize.*Received: minimize\(function"):
        opt.minimize(lambda: variable * 2.0, [variable])


@helpers.keras3_only
def test_keras3_apply_adds_micro_batches_as_apply_gradients_does():
    x, y = helpers.data(32)
    initial = helpers.weights_of(helpers.functional_mlp())

    def train(use_apply):
        model = helpers.fresh(helpers.functional_mlp, initial)
        opt = AccumOptimizer(keras.optimizers.Adam(0.01), N)
        for i in range(0, 32, B):
            with tf.GradientTape() as tape:
                loss = helpers.mse_with_regularizers(model, x[i:i + B], y[i:i + B])
            grads = tape.gradient(loss, model.trainable_variables)
            if use_apply:
                opt.apply(grads, model.trainable_variables)
            else:
                opt.apply_gradients(zip(grads, model.trainable_variables))
        return helpers.weights_of(model), int(opt.iterations.numpy())

    (applied, steps), (reference, reference_steps) = train(True), train(False)
    assert steps == reference_steps == 1
    for got, want in zip(applied, reference):
        np.testing.assert_array_equal(got, want)
    assert any(np.any(w != i) for w, i in zip(applied, initial))
