"""Each private attribute of Keras or TensorFlow that gradaccum reads, through its helper in _compat.

One test per helper, on every Keras of the matrix: a release that moves an
attribute fails here, by the helper's name, rather than training wrong
somewhere else.
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import _compat

EAGER = _compat.executing_eagerly()
keras2_only = pytest.mark.skipif(helpers.KERAS3, reason="a Keras 2 attribute; this is Keras 3")

# Every Keras of the matrix, the TF minors of the core subset included.
pytestmark = [pytest.mark.core, pytest.mark.python]


def test_is_graph_network():
    if helpers.KERAS3:
        assert _compat.is_graph_network(helpers.functional_mlp()) is None
        return
    assert _compat.is_graph_network(helpers.functional_mlp()) is True
    assert _compat.is_graph_network(helpers.sequential_mlp()) is True
    assert _compat.is_graph_network(helpers.subclassed_mlp()) is False


def test_built_input_shape():
    assert _compat.built_input_shape(helpers.subclassed_mlp()) in ((None, 5), None)
    if EAGER:  # graph-mode Keras 2 records no shape (the wrapper is then marked built)
        assert _compat.built_input_shape(helpers.subclassed_mlp()) == (None, 5)
    assert not helpers.SubclassedMLP().built


@keras2_only
def test_keras2_compile_args():
    model = helpers.functional_mlp()
    assert _compat.keras2_compile_args(model, keras) is None
    optimizer = keras.optimizers.SGD(0.1) if EAGER else getattr(keras.optimizers, "legacy", keras.optimizers).SGD(0.1)
    options = {"jit_compile": True} if EAGER and helpers.HAS_JIT_COMPILE else {}
    model.compile(optimizer, loss="mse", loss_weights=[0.5], metrics=["mae"], **options)
    args = _compat.keras2_compile_args(model, keras)
    assert args["optimizer"] is model.optimizer
    assert args["loss"] == "mse" and list(args["loss_weights"]) == [0.5]
    assert "mae" in list(tf.nest.flatten(args["metrics"]))
    if options:
        assert args["jit_compile"] is True


@pytest.mark.skipif(not helpers.KERAS3, reason="a Keras 3 attribute; this is Keras 2")
def test_keras3_compile_args():
    model = helpers.functional_mlp()
    assert _compat.keras3_compile_args(model, keras) is None
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer, loss="mse", loss_weights=[0.5], metrics=["mae"], jit_compile=True,
                  steps_per_execution=3)
    args = _compat.keras3_compile_args(model, keras)
    assert args["optimizer"] is optimizer
    assert args["loss"] == "mse" and list(args["loss_weights"]) == [0.5] and args["metrics"] == ["mae"]
    assert args["jit_compile"] is True and args["steps_per_execution"] == 3


@keras2_only
@pytest.mark.skipif(EAGER, reason="graph-mode Keras records the strategy it was compiled under")
def test_keras2_compiled_strategy():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = helpers.functional_mlp()
        model.compile(getattr(keras.optimizers, "legacy", keras.optimizers).SGD(0.1), "mse")
    assert _compat.keras2_compiled_strategy(model) is strategy
    plain = helpers.functional_mlp()
    plain.compile("sgd", "mse")
    assert _compat.keras2_compiled_strategy(plain) is None


@pytest.mark.skipif(not EAGER, reason="checkpoints of eager objects")
def test_track_makes_a_checkpoint_dependency(tmp_path):
    parent, child = tf.Module(), tf.Module()
    child.value = tf.Variable(3.0)
    _compat.track(parent, child, "gradaccum")
    path = tf.train.Checkpoint(parent=parent).write(str(tmp_path / "ckpt"))
    names = list(tf.train.load_checkpoint(path).get_variable_to_shape_map())
    assert any("parent/gradaccum/value" in name for name in names), names


@pytest.mark.skipif(not EAGER or helpers.KERAS3, reason="the Keras 2 optimizer wrapper's TensorFlow mixins")
def test_keras2_wrapper_checkpoints_as_the_optimizer_it_wraps(tmp_path):
    # DelegatingTrackableMixin: the wrapper's checkpoint is the wrapped
    # optimizer's, plus the window ("gradaccum").
    from gradaccum import AccumOptimizer
    variable = tf.Variable([1.0, 2.0])
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer = AccumOptimizer(inner, 2)
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), variable)])
    path = tf.train.Checkpoint(optimizer=optimizer, variable=variable).write(str(tmp_path / "ckpt"))
    names = list(tf.train.load_checkpoint(path).get_variable_to_shape_map())
    # The wrapped optimizer's step counter ("iter" or "_iterations"), at the top.
    assert any(name.startswith("optimizer/") and "iter" in name.split("/")[1] for name in names), names
    assert any(name.startswith("optimizer/gradaccum/") for name in names), names
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])


@helpers.keras3_only
@pytest.mark.skipif(not EAGER, reason="Keras 3 trains in eager mode")
def test_keras3_after_backup_saves(tmp_path):
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=2)
    saves = []
    _compat.keras3_after_backup_saves(backup, lambda: saves.append(len(tf.io.gfile.listdir(backup.backup_dir))))
    model = helpers.functional_mlp()
    model.compile("sgd", "mse")
    model.fit(*helpers.data(32), batch_size=8, epochs=1, verbose=0, callbacks=[backup])
    assert len(saves) == 2 and all(files >= 1 for files in saves)  # after batches 2 and 4, once written


def batchnorm_model():
    inputs = keras.Input((4, 4, 2))
    inner_in = keras.Input((4, 4, 2))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(name="inner_bn")(inner_in), name="inner")
    outputs = keras.layers.BatchNormalization(name="outer_bn")(inner(inputs))
    return keras.Model(inputs, outputs)


def test_sublayers_and_batchnorm_base():
    model = batchnorm_model()
    names = [layer.name for layer in _compat.sublayers(model)]
    assert "inner_bn" in names and "outer_bn" in names and "inner" in names
    base = _compat.batchnorm_base(keras)
    assert issubclass(keras.layers.BatchNormalization, base)
    assert sorted(layer.name for layer in _compat.sublayers(model) if isinstance(layer, base)) == [
        "inner_bn", "outer_bn"]


def test_batchnorm_trains():
    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    assert _compat.batchnorm_trains(layer, True) is True or tf.is_tensor(_compat.batchnorm_trains(layer, True))
    assert not _compat.batchnorm_trains(layer, False)
    layer.trainable = False
    frozen = _compat.batchnorm_trains(layer, True)
    if _compat.IS_TF1:  # TF 1's Keras trains a frozen layer's statistics
        assert frozen is True
    else:
        assert frozen is False


def test_batchnorm_bessel():
    plain = keras.layers.BatchNormalization()
    plain.build((None, 3))
    assert _compat.batchnorm_bessel(plain) is False
    image = keras.layers.BatchNormalization()
    image.build((None, 4, 4, 3))
    # Keras 2's fused kernel (4-D inputs) moves the variance with the unbiased one.
    assert _compat.batchnorm_bessel(image) is (not helpers.KERAS3)


def test_batchnorm_moments_and_update_methods():
    # Where the layer's batch statistics can be taken from: the method that
    # computes them (Keras 3, Keras 2's plain kernel), or the methods that
    # Keras 2's fused kernel moves its averages through.
    plain = keras.layers.BatchNormalization(**({} if helpers.KERAS3 else {"fused": False}))
    plain.build((None, 4, 4, 3))
    assert _compat.batchnorm_moments_method(plain) == "_moments"
    assert _compat.batchnorm_update_methods(plain) == {}
    if not helpers.KERAS3:
        fused = keras.layers.BatchNormalization(fused=True)
        fused.build((None, 4, 4, 3))
        assert _compat.batchnorm_moments_method(fused) is None
        assert _compat.batchnorm_update_methods(fused) == {
            "_assign_moving_average": "batch", "_assign_new_value": "average"}


def test_batchnorm_refusal():
    assert _compat.batchnorm_refusal(keras.layers.BatchNormalization()) is None
    if "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters:  # (Keras 3.7+)
        assert _compat.batchnorm_refusal(keras.layers.BatchNormalization(renorm=True)) == "renorm=True"
    if helpers.KERAS3:
        assert _compat.batchnorm_refusal(keras.layers.BatchNormalization(synchronized=True)) == "synchronized=True"


@pytest.mark.skipif(EAGER or helpers.KERAS3, reason="graph-mode Keras 2 keeps each call's input tensor")
def test_node_inputs():
    model = batchnorm_model()
    inputs = _compat.node_inputs(model.get_layer("outer_bn"))
    assert len(inputs) == 1 and tf.is_tensor(inputs[0]) and inputs[0].shape.as_list() == [None, 4, 4, 2]
    assert len(_compat.node_inputs(model.get_layer("inner").get_layer("inner_bn"))) == 2
