"""BatchNormalization inside accumulate(model, n): moving statistics once per window, pooled.

The oracle: a BatchNormalization layer whose input is the big batch's (it
reads the data through frozen layers) must end with the big batch's moving
mean and variance, to float32 tolerance, and plain training at the
micro-batch must not. Runs eagerly and in graph mode (TF 1.15, and TF 2 with
eager disabled).
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf

import helpers
from gradaccum import _compat, accumulate
from helpers import keras

N, B = 4, 8
EAGER = _compat.executing_eagerly()
if helpers.KERAS3 and not EAGER:
    pytest.skip("Keras 3 has no graph mode (its models train in tf.function)", allow_module_level=True)


def sgd(learning_rate):
    # Keras >= 2.11's default optimizers have no graph mode; their
    # predecessors live on under `legacy`.
    legacy = getattr(keras.optimizers, "legacy", None)
    return (legacy.SGD if legacy is not None and not EAGER else keras.optimizers.SGD)(learning_rate)


def value(variable):
    if helpers.KERAS3:
        return np.array(variable.numpy())
    return np.array(keras.backend.get_value(variable))


def frozen(rank):
    """A frozen layer that maps the data to a rank-`rank` input of the BatchNormalization."""
    if rank == 2:
        return keras.layers.Dense(6, trainable=False, name="frozen")
    conv = {3: keras.layers.Conv1D, 4: keras.layers.Conv2D, 5: keras.layers.Conv3D}[rank]
    return conv(3, 2, trainable=False, name="frozen")


def shape_of(rank):
    return {2: (5,), 3: (6, 2), 4: (5, 5, 2), 5: (4, 4, 4, 2)}[rank]


def bn_model(rank, fused=None, nested=False, trainable=True, axis=-1, momentum=0.8):
    options = {} if fused is None else {"fused": fused}
    inputs = keras.Input(shape_of(rank))
    x = frozen(rank)(inputs)
    bn = keras.layers.BatchNormalization(momentum=momentum, axis=axis, trainable=trainable, name="bn", **options)
    if nested:  # the layer inside a functional model inside the model
        inner_in = keras.Input(x.shape[1:])
        inner = keras.Model(inner_in, bn(inner_in), name="inner")
        x = inner(x)
    else:
        x = bn(x)
    if rank > 2:
        x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2, name="out")(x)
    return keras.Model(inputs, outputs)


def data(rank, samples=100, seed=0):
    rng = np.random.RandomState(seed)
    x = (rng.normal(size=(samples,) + shape_of(rank)) * 3.0 + 1.5).astype("float32")
    y = rng.normal(size=(samples, 2)).astype("float32")
    return x, y


def find_bn(model):
    from gradaccum import _batchnorm
    layers = _batchnorm.layers_of(model, keras)
    assert len(layers) == 1
    return layers[0]


def train(factory, initial, x, y, n=None, b=B, epochs=2, compile_options=None, **options):
    if not EAGER:  # (a graph that keeps every earlier model makes each training slower)
        keras.backend.clear_session()
    model = helpers.fresh(factory, initial)
    if n is not None:
        model = accumulate(model, n, **options)
    model.compile(sgd(0.05), "mse", **(compile_options or {}))
    model.fit(x, y, batch_size=b, epochs=epochs, shuffle=False, verbose=0)
    bn = find_bn(model)
    return [value(bn.moving_mean), value(bn.moving_variance)], int(value(model.optimizer.iterations))


def statistics_error(got, want, initial):
    """max |got - want| relative to the big batch's change of each statistic."""
    return max(np.max(np.abs(g - w)) / np.max(np.abs(w - i)) for g, w, i in zip(got, want, initial))


def assert_pooled(factory, x, y, n=N, micro=False, **options):
    initial = helpers.weights_of(factory())
    accumulated, steps = train(factory, initial, x, y, n=n, **options)
    options.pop("compile_options", None)
    big, big_steps = train(factory, initial, x, y, b=n * B)
    small, _ = train(factory, initial, x, y)
    before = [np.zeros_like(big[0]), np.ones_like(big[1])]
    assert steps == big_steps
    error = statistics_error(accumulated, big, before)
    assert error < 1e-5, "moving statistics differ from the big batch's by {:.3g}".format(error)
    assert statistics_error(small, big, before) > 1e-3
    if micro:  # Keras' update on every micro-batch: plain training's statistics
        assert statistics_error(train(factory, initial, x, y, n=n, batchnorm="micro", **options)[0],
                                small, before) < 1e-5
    helpers.record("batchnorm pooled statistics", error)
    return error


@pytest.mark.parametrize("rank", helpers.core_params([2, 3, 4, 5], [2, 4]))
def test_moving_statistics_are_the_big_batchs(rank):
    # 100 samples: windows of 32, 32, 32 and a short one of 4, each epoch.
    x, y = data(rank)
    assert_pooled(lambda: bn_model(rank), x, y, micro=rank == 4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("momentum", [0.8, 0.99])
def test_fused_and_plain_kernels_and_momentum(fused, momentum):
    # Keras 2's fused kernel moves the variance with Bessel's correction, and
    # its statistics are taken from the averages it moves to (hence Keras'
    # default momentum too, whose 1 - momentum divides them); the plain
    # kernel and Keras 3 hand over their moments as they are.
    if helpers.KERAS3 and fused:
        pytest.skip("Keras 3 has one kernel")
    x, y = data(4)
    assert_pooled(lambda: bn_model(4, fused=None if helpers.KERAS3 else fused, momentum=momentum), x, y)


@pytest.mark.skipif(not EAGER or "jit_compile" not in inspect.signature(keras.Model.compile).parameters,
                    reason="XLA through compile(jit_compile=True): eager Keras >= 2.8")
def test_jit_compile():
    # (Keras 2's fused kernel hands over the batch's statistics under XLA.)
    x, y = data(4)
    assert_pooled(lambda: bn_model(4), x, y, compile_options={"jit_compile": True})


def test_channels_first_and_a_nested_model():
    x, y = data(4)
    # (TF 1.15's fused kernel has no channels-first CPU implementation, plain Keras alike.)
    assert_pooled(lambda: bn_model(4, nested=True, axis=-1 if _compat.IS_TF1 else 1), x, y)


def shared_bn_model():
    inputs = keras.Input((5,))
    bn = keras.layers.BatchNormalization(momentum=0.8, name="bn")
    first = bn(keras.layers.Dense(3, trainable=False, name="frozen_a")(inputs))
    second = bn(keras.layers.Dense(3, trainable=False, name="frozen_b")(inputs))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([first, second])))


def test_a_layer_called_twice_a_step_moves_twice_an_update():
    # As Keras moves it twice in the big batch's step, once per call, in order.
    if not EAGER:
        pytest.skip("graph-mode Keras runs a shared layer's updates unordered (each may read the "
                    "statistics before the other moved them): no one result to match")
    x, y = data(2)
    assert_pooled(shared_bn_model, x, y)


class SubclassedBN(keras.Model):
    def __init__(self, **kwargs):
        super(SubclassedBN, self).__init__(**kwargs)
        self.frozen = keras.layers.Dense(6, trainable=False)
        self.bn = keras.layers.BatchNormalization(momentum=0.8)
        self.out = keras.layers.Dense(2)

    def call(self, inputs, training=None):
        return self.out(self.bn(self.frozen(inputs), training=training))


def subclassed_bn():
    model = SubclassedBN()
    model(np.zeros((1, 5), "float32"))
    return model


@pytest.mark.skipif(not EAGER, reason="subclassed models build eagerly")
def test_a_subclassed_model():
    x, y = data(2)
    assert_pooled(subclassed_bn, x, y)


def test_windows_of_unequal_micro_batches():
    x, y = data(2, samples=90)  # micro-batches of 8 and a last one of 2
    assert_pooled(lambda: bn_model(2), x, y, n=3)


def test_a_frozen_layer_stays_as_plain_keras_keeps_it():
    x, y = data(2)
    initial = helpers.weights_of(bn_model(2, trainable=False))
    accumulated, _ = train(lambda: bn_model(2, trainable=False), initial, x, y, n=N)
    big, _ = train(lambda: bn_model(2, trainable=False), initial, x, y, b=N * B)
    for got, want in zip(accumulated, big):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if not _compat.IS_TF1:  # (TF 1's Keras trains a frozen BatchNormalization's statistics)
        np.testing.assert_array_equal(accumulated[0], 0.0)


@pytest.mark.core
def test_the_statistics_move_only_when_the_window_is_applied():
    x, y = data(4, samples=24)
    model = accumulate(bn_model(4, nested=True), N, epoch_end="carry")
    model.compile(sgd(0.05), "mse")
    bn = find_bn(model)
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)  # 3 micro-batches of a window of 4
    np.testing.assert_array_equal(value(bn.moving_mean), 0.0)
    np.testing.assert_array_equal(value(bn.moving_variance), 1.0)
    model.fit(x[:B], y[:B], batch_size=B, shuffle=False, verbose=0)  # the 4th: the update
    assert int(value(model.optimizer.iterations)) == 1
    assert np.all(value(bn.moving_mean) != 0.0)


def test_a_layer_called_with_training_false_moves_as_in_plain_keras():
    # (Keras 2 keeps such a call's statistics; Keras 3's functional models
    # pass the model's training flag to every layer, so plain Keras 3 moves
    # them: the accumulating model does what that Keras does, once a window.)
    def factory():
        inputs = keras.Input((5,))
        bn = keras.layers.BatchNormalization(momentum=0.8, name="bn")
        hidden = bn(keras.layers.Dense(4, trainable=False)(inputs), training=False)
        return keras.Model(inputs, keras.layers.Dense(2)(hidden))

    x, y = data(2)
    initial = helpers.weights_of(factory())
    accumulated, _ = train(factory, initial, x, y, n=N)
    big, _ = train(factory, initial, x, y, b=N * B)
    for got, want in zip(accumulated, big):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not helpers.KERAS3:
        np.testing.assert_array_equal(accumulated[0], 0.0)


def test_the_open_window_keeps_its_statistics_in_a_checkpoint(tmp_path):
    if not EAGER:
        pytest.skip("tf.train.Checkpoint of a Keras model: eager")
    x, y = data(2, samples=48)
    initial = helpers.weights_of(bn_model(2))

    def compiled():
        model = accumulate(helpers.fresh(lambda: bn_model(2), initial), N, epoch_end="carry")
        model.compile(sgd(0.05), "mse")
        return model

    uninterrupted = compiled()
    uninterrupted.fit(x, y, batch_size=B, shuffle=False, verbose=0)  # 6 micro-batches: 1 update, 2 open
    uninterrupted.fit(x[:16], y[:16], batch_size=B, shuffle=False, verbose=0)  # the second update
    stopped = compiled()
    stopped.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=stopped, optimizer=stopped.optimizer).write(str(tmp_path / "ckpt"))
    resumed = compiled()
    if helpers.KERAS3:  # (Keras 3 restores an optimizer's variables once they exist)
        resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
    resumed.fit(x[:16], y[:16], batch_size=B, shuffle=False, verbose=0)
    for model in (uninterrupted, resumed):
        assert int(value(model.optimizer.iterations)) == 2
    np.testing.assert_allclose(value(find_bn(resumed).moving_mean), value(find_bn(uninterrupted).moving_mean),
                               rtol=1e-6)
    np.testing.assert_allclose(value(find_bn(resumed).moving_variance),
                               value(find_bn(uninterrupted).moving_variance), rtol=1e-6)


def has_renorm():
    return "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters


def refused_layers():
    cases = []
    if has_renorm():  # (Keras 3 has it from 3.7)
        cases.append(("renorm", lambda: keras.layers.BatchNormalization(renorm=True), "renorm=True"))
    if helpers.KERAS3:
        cases.append(("synchronized", lambda: keras.layers.BatchNormalization(synchronized=True),
                      "synchronized=True"))
    else:
        cases.append(("virtual_batch_size", lambda: keras.layers.BatchNormalization(virtual_batch_size=4),
                      "virtual_batch_size=4"))
        sync = getattr(getattr(keras.layers, "experimental", None), "SyncBatchNormalization", None)
        if sync is not None and not _compat.IS_TF1:
            # (Keras 2.15 and tf-keras mark it synchronized=True; older Keras 2, by its class.)
            cases.append(("SyncBatchNormalization", sync, "(a SyncBatchNormalization|synchronized=True)"))
    return cases


@pytest.mark.parametrize("name, make, received", refused_layers(), ids=[case[0] for case in refused_layers()])
def test_statistics_it_cannot_pool_are_refused_unless_micro(name, make, received):
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2)(make()(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(NotImplementedError, match=r"has {}.*batchnorm=\"micro\".*Received: {}".format(
            received, received)):
        accumulate(model, N)
    assert accumulate(model, N, batchnorm="micro").batchnorm == "micro"


@pytest.mark.errors
@pytest.mark.parametrize("batchnorm", ["Pooled", "per_window", None, 1])
def test_an_unknown_batchnorm_choice_is_refused(batchnorm):
    with pytest.raises(ValueError, match=r"batchnorm must be one of \('pooled', 'micro'\)\. Received: batchnorm="):
        accumulate(helpers.functional_mlp(), N, batchnorm=batchnorm)


def test_the_choice_is_saved_with_the_model():
    model = accumulate(bn_model(2), N, batchnorm="micro")
    config = model.get_config()
    assert config["batchnorm"] == "micro"
    assert type(model).from_config(config).batchnorm == "micro"


@pytest.mark.heavy
@helpers.long_run
def test_a_keras_applications_model():
    if not EAGER:
        pytest.skip("eager")
    tf.random.set_seed(0)

    def factory():
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3)
        model.get_layer("Conv1").trainable = False  # so that bn_Conv1's input is the big batch's
        return model

    rng = np.random.RandomState(0)
    x = rng.uniform(size=(40, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.randint(3, size=40), 3)
    initial = helpers.weights_of(factory())
    results = {}
    for key, n, b in (("accumulated", N, 5), ("big", None, 20), ("small", None, 5)):
        model = helpers.fresh(factory, initial)
        if n:
            model = accumulate(model, n)
        model.compile(sgd(0.01), "categorical_crossentropy")
        model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)
        results[key] = [value(model.get_layer("bn_Conv1").moving_mean),
                        value(model.get_layer("bn_Conv1").moving_variance)]
    before = [np.zeros_like(results["big"][0]), np.ones_like(results["big"][1])]
    assert statistics_error(results["accumulated"], results["big"], before) < 1e-4
    assert statistics_error(results["small"], results["big"], before) > 1e-3


def test_mixed_precision():
    if not EAGER:
        pytest.skip("mixed precision trains eagerly")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = data(4)
        assert_pooled(lambda: bn_model(4), x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.heavy
def test_under_mirrored_strategy_statistics_pool_per_replica():
    # Each replica pools its part of each micro-batch, as Keras keeps
    # BatchNormalization's statistics per replica. Keras 2 reads them as the
    # replicas' mean: with equal parts, the moving mean is the big batch's
    # under the same strategy; the variance is close, not equal (a replica's
    # window holds other samples than its part of the big batch). Keras 3
    # keeps each replica's own (and saves the first's): it trains, and its
    # statistics moved.
    if not EAGER:
        pytest.skip("strategies train eagerly")
    x, y = data(2, samples=96)  # windows of 64 and 32 samples, 8 per replica and micro-batch
    initial = helpers.weights_of(bn_model(2))
    results = {}
    for key, n, b in (("accumulated", N, 16), ("big", None, N * 16), ("small", None, 16)):
        # (ReductionToOneDevice, as test_distribute: no collectives, whose state a
        # process keeps from one strategy to the next.)
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
        with strategy.scope():
            model = helpers.fresh(lambda: bn_model(2), initial)
            if n:
                model = accumulate(model, n)
            model.compile(sgd(0.05), "mse")
        model.fit(x, y, batch_size=b, epochs=2, shuffle=False, verbose=0)
        bn = find_bn(model)
        results[key] = ([value(bn.moving_mean), value(bn.moving_variance)], int(value(model.optimizer.iterations)))
    assert results["accumulated"][1] == results["big"][1] == 4
    assert np.all(results["accumulated"][0][0] != 0.0)
    if not helpers.KERAS3:
        before = [np.zeros_like(results["big"][0][0])]
        assert statistics_error(results["accumulated"][0][:1], results["big"][0][:1], before) < 1e-5
        assert statistics_error(results["small"][0][:1], results["big"][0][:1], before) > 1e-3
