"""AccumOptimizer in custom loops under MirroredStrategy and under mixed precision, against the big batch.

MirroredStrategy: two replicas on the two logical CPUs that conftest makes.
The loop follows TensorFlow's custom-loop guide: each replica averages its
per-sample losses over the global micro-batch (`tf.nn.compute_average_loss`)
and passes that global size as `batch_size`, so the replicas' window means
add up to the big global batch's gradient. The gradients are all-reduced once
per window, by the wrapped optimizer.

Mixed precision: the arrangement Keras documents for custom loops, with the
LossScaleOptimizer inside: AccumOptimizer(LossScaleOptimizer(optimizer), n).
"""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import keras
from gradaccum import AccumOptimizer
from test_distribute import DEVICES, CountingReduction
from test_mixed_precision import INITIAL_SCALE, MIXED_TOL, OVERFLOW_SAMPLE, loss_scale, mixed_float16  # noqa: F401

helpers.require_mode(eager=True)
pytestmark = pytest.mark.heavy

N = 4
GLOBAL_B = 16
OPTIMIZERS = {name: helpers.OPTIMIZERS[name] for name in ("momentum", "adam")}


def mirrored_loop(initial, n, global_batch, make_optimizer, samples, count_global_size=False):
    """(weights, optimizer steps, gradient all-reduces run) of 2 epochs of a custom loop."""
    reduction = CountingReduction()
    strategy = tf.distribute.MirroredStrategy(DEVICES, cross_device_ops=reduction)
    with strategy.scope():
        model = helpers.fresh(helpers.functional_mlp, initial)
        optimizer = make_optimizer() if n is None else AccumOptimizer(make_optimizer(), n)
    x, y = helpers.data(samples)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch))
    variables = model.trainable_variables

    def replica_step(x_batch, y_batch, size):
        if count_global_size:  # as a loop that does not know it would: all-reduce the sizes
            size = tf.distribute.get_replica_context().all_reduce("sum", tf.shape(x_batch)[0])
        with tf.GradientTape() as tape:
            per_sample = tf.reduce_mean(tf.square(model(x_batch, training=True) - y_batch), axis=1)
            loss = (tf.nn.compute_average_loss(per_sample, global_batch_size=size)
                    + tf.nn.scale_regularization_loss(tf.add_n(model.losses)))
        grads = tape.gradient(loss, variables)
        if n is None:
            optimizer.apply_gradients(zip(grads, variables))
        else:
            optimizer.apply_gradients(zip(grads, variables), batch_size=size)

    @tf.function
    def step(inputs, size):
        strategy.run(replica_step, args=inputs + (size,))

    # The global micro-batches' sizes (the last one may be short).
    sizes = [min(global_batch, samples - start) for start in range(0, samples, global_batch)]
    for _ in range(2):
        for inputs, size in zip(dataset, sizes):
            step(inputs, tf.constant(size))
        if n is not None:
            # Outside the strategy's scope, the window is applied in its
            # replicas; in a tf.function, so that CountingReduction counts.
            tf.function(optimizer.flush)()
    return helpers.weights_of(model), int(optimizer.iterations.numpy()), int(reduction.runs.numpy())


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_mirrored_custom_loop_matches_the_big_batch_and_all_reduces_once_per_update(optimizer):
    make_optimizer = OPTIMIZERS[optimizer]
    initial = helpers.weights_of(helpers.functional_mlp())
    accumulated, big, small = helpers.differential(
        "loop-mirrored/" + optimizer, initial,
        lambda n, batch_size: mirrored_loop(initial, n, batch_size, make_optimizer, 96), N, GLOBAL_B)
    # 96 samples: 6 micro-batches of 16 per epoch, windows of 4 and 2 (flushed).
    assert big[1] == 4
    per_step, remainder = divmod(small[2], small[1])
    assert per_step >= 1 and remainder == 0, "plain: {} all-reduces in {} steps".format(small[2], small[1])
    assert accumulated[2] == per_step * accumulated[1], (
        "accumulated: {} all-reduces for {} updates of 12 micro-steps; plain does {} per step".format(
            accumulated[2], accumulated[1], per_step))
    helpers.record("loop-mirrored/{}/all-reduces accumulated vs plain".format(optimizer),
                   accumulated[2] / float(small[2]))


@pytest.mark.parametrize("where", ["outside", "scope", "strategy.run"])
def test_flush_applies_the_sum_of_the_replicas_means_wherever_it_is_called(where):
    # Two replicas, each with a window of two micro-batches of global size 16:
    # replica 0 adds gradients 1 and 2, replica 1 adds 2 and 4. The update is
    # the sum of their means (1.5 + 3), as the optimizer all-reduces it.
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        variable = tf.Variable([0.0, 0.0])
        optimizer = AccumOptimizer(keras.optimizers.SGD(1.0), N)

    def replica_step(gradient):
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1, tf.float32)
        optimizer.apply_gradients([(gradient * replica, variable)], batch_size=16)

    step = tf.function(lambda gradient: strategy.run(replica_step, args=(gradient,)))
    step(tf.constant([1.0, 1.0]))
    step(tf.constant([2.0, 2.0]))
    np.testing.assert_array_equal(variable.numpy(), [0.0, 0.0])
    if where == "outside":
        applied = optimizer.flush()
    elif where == "scope":
        with strategy.scope():
            applied = optimizer.flush()
    else:
        applied = strategy.experimental_local_results(
            tf.function(lambda: strategy.run(optimizer.flush))())[0]
    assert bool(applied)
    np.testing.assert_allclose(variable.numpy(), [-4.5, -4.5])
    assert int(optimizer.iterations.numpy()) == 1
    assert not bool(optimizer.flush())  # empty now


def test_a_replica_with_no_samples_adds_nothing_and_nothing_goes_nan():
    # 97 samples: the last global micro-batch holds 1 sample, so one replica
    # gets none. Its gradients are zero and its weight the global size.
    initial = helpers.weights_of(helpers.functional_mlp())
    accumulated = mirrored_loop(initial, N, GLOBAL_B, OPTIMIZERS["momentum"], 97, count_global_size=True)
    big = mirrored_loop(initial, None, N * GLOBAL_B, OPTIMIZERS["momentum"], 97, count_global_size=True)
    assert all(np.all(np.isfinite(w)) for w in accumulated[0])
    assert accumulated[1] == big[1] == 4
    helpers.record("loop-mirrored/zero-sample replica",
                   helpers.assert_same_training(initial, accumulated[0], big[0]))


# --- mixed precision ---

def mixed_loop(initial, n, batch_size, make_optimizer, x, y):
    """(weights, steps, loss scale) of 2 epochs under mixed_float16, Keras' custom-loop recipe."""
    model = helpers.fresh(helpers.functional_mlp, initial)
    inner = keras.mixed_precision.LossScaleOptimizer(make_optimizer())
    optimizer = inner if n is None else AccumOptimizer(inner, n)
    variables = model.trainable_variables
    if helpers.KERAS3:
        optimizer.build(variables)

    @tf.function
    def step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            prediction = tf.cast(model(x_batch, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(prediction - y_batch)) + tf.add_n(
                [tf.cast(term, tf.float32) for term in model.losses])
            if helpers.KERAS3:  # Keras 3: scale the loss; apply_gradients unscales
                loss = optimizer.scale_loss(loss)
            else:  # Keras 2: scale the loss, unscale the gradients yourself
                loss = optimizer.get_scaled_loss(loss)
        grads = tape.gradient(loss, variables)
        if not helpers.KERAS3:
            grads = optimizer.get_unscaled_gradients(grads)
        kwargs = {} if n is None else {"batch_size": tf.shape(x_batch)[0]}
        optimizer.apply_gradients(zip(grads, variables), **kwargs)

    for _ in range(2):
        for start in range(0, len(x), batch_size):
            step(x[start:start + batch_size], y[start:start + batch_size])
        if n is not None:
            optimizer.flush()
    return helpers.weights_of(model), int(optimizer.iterations.numpy()), loss_scale(inner)


@pytest.mark.parametrize("overflow", [False, True], ids=["finite", "overflow"])
def test_mixed_precision_custom_loop_matches_the_big_batch(mixed_float16, overflow):
    x, y = helpers.data()
    if overflow:  # the second window of each epoch overflows: skipped whole
        x[OVERFLOW_SAMPLE] = 1e5
    initial = helpers.weights_of(helpers.functional_mlp())
    make_optimizer = OPTIMIZERS["momentum"]
    accumulated, big, _ = helpers.differential(
        "loop-mixed/" + ("overflow" if overflow else "finite"), initial,
        lambda n, batch_size: mixed_loop(initial, n, batch_size, make_optimizer, x, y), N, 8,
        rel_tol=MIXED_TOL)
    assert accumulated[2] == big[2], "loss scale: accumulated {} vs big batch {}".format(accumulated[2], big[2])
    if overflow:
        assert accumulated[2] == INITIAL_SCALE / 4


def test_a_loss_scale_optimizer_around_the_wrapper_is_refused(mixed_float16):
    # It would check and skip each micro-batch on its own. Keras wraps the
    # compiled optimizer in one under a mixed_float16 policy, too.
    model = helpers.functional_mlp()
    with pytest.raises(ValueError, match=r"a LossScaleOptimizer around an AccumOptimizer would check"):
        outer = keras.mixed_precision.LossScaleOptimizer(AccumOptimizer(keras.optimizers.SGD(0.1), N))
        # (Refused above where Keras tells the wrapped optimizer; Keras 3
        # before 3.7 tells it nothing until it builds it, before any update.)
        outer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"Received: LossScaleOptimizer\(AccumOptimizer\(n=4\)\)"):
        model.compile(AccumOptimizer(keras.optimizers.SGD(0.1), N), "mse")
        model.fit(*helpers.data(8), verbose=0)
