"""AccumOptimizer: Session-run graphs (TF 1.x, and TF 2.x with eager disabled).

Differential: n runs of a micro-batch through AccumOptimizer(inner, n) against
one run of the n-times bigger batch through `inner` alone, from the same
initial values, in separate graphs. No Keras is used, so this runs on every
runtime, Keras 3 ones included.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import oracles
from gradaccum import AccumOptimizer, _compat

if _compat.executing_eagerly():
    pytest.skip("graph-mode tests; this run is in eager mode (TF 2.x runs them with --graph-mode)",
                allow_module_level=True)

v1 = tf.compat.v1
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "legacy", "examples")
FEATURES, ROWS = 5, 40  # rows: enough that a window leaves some untouched

OPTIMIZERS = {
    "sgd": lambda lr: v1.train.GradientDescentOptimizer(lr),
    "momentum": lambda lr: v1.train.MomentumOptimizer(lr, 0.9),
    "nesterov": lambda lr: v1.train.MomentumOptimizer(lr, 0.9, use_nesterov=True),
    "adam": lambda lr: v1.train.AdamOptimizer(lr),
    "rmsprop": lambda lr: v1.train.RMSPropOptimizer(lr, momentum=0.5),
    "adagrad": lambda lr: v1.train.AdagradOptimizer(lr),
}


def data(samples=96, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    rows = rng.randint(0, ROWS, size=(samples, 2)).astype("int32")
    y = (np.tanh(x @ rng.normal(size=(FEATURES, 1))) + 0.1 * rng.normal(size=(samples, 1))).astype("float32")
    return x, rows, y


class Net(object):
    """A small regression net with an embedding, built in the current graph."""

    def __init__(self, make_optimizer, n=None, decay=True, micro_batch_size=False, split=False, **options):
        self.x = v1.placeholder(tf.float32, [None, FEATURES])
        self.rows = v1.placeholder(tf.int32, [None, 2])
        self.y = v1.placeholder(tf.float32, [None, 1])
        init = v1.random_normal_initializer(stddev=0.5, seed=3)
        self.w = v1.get_variable("w", [FEATURES, 4], initializer=init)
        self.embedding = v1.get_variable("embedding", [ROWS, 4], initializer=init)  # sparse gradients
        self.out = v1.get_variable("out", [4, 1], initializer=init)
        self.weights = [self.w, self.embedding, self.out]
        features = tf.matmul(self.x, self.w) + tf.reduce_sum(tf.gather(self.embedding, self.rows), axis=1)
        self.loss = tf.reduce_mean(tf.square(tf.matmul(tf.tanh(features), self.out) - self.y))
        self.global_step = v1.train.get_or_create_global_step()
        rate = v1.train.exponential_decay(0.05, self.global_step, 3, 0.7) if decay else 0.05
        self.inner = make_optimizer(rate)
        self.optimizer = self.inner
        if n is not None:
            size = tf.shape(self.x)[0] if micro_batch_size else None
            self.optimizer = AccumOptimizer(self.inner, n, micro_batch_size=size, **options)
        if split:  # what minimize does, spelled out by the caller
            grads_and_vars = self.optimizer.compute_gradients(self.loss)
            self.train_op = self.optimizer.apply_gradients(grads_and_vars, global_step=self.global_step)
        else:
            self.train_op = self.optimizer.minimize(self.loss, global_step=self.global_step)

    def feed(self, batch):
        x, rows, y = batch
        return {self.x: x, self.rows: rows, self.y: y}


def batches(arrays, size, epochs=2):
    samples = len(arrays[0])
    return [tuple(a[start:start + size] for a in arrays)
            for _ in range(epochs) for start in range(0, samples, size)]


def train(make_optimizer, feeds, n=None, **kwargs):
    """(initial weights, final weights, global step) after running train_op on each batch."""
    with tf.Graph().as_default():
        net = Net(make_optimizer, n, **kwargs)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            initial = session.run(net.weights)
            for batch in feeds:
                session.run(net.train_op, net.feed(batch))
            return initial, session.run(net.weights), session.run(net.global_step)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_exact_against_the_big_batch_with_a_decaying_rate(name):
    arrays, n, b = data(), 4, 6
    initial = train(OPTIMIZERS[name], [])[0]  # every run's graph starts from these (seeded)
    _, big, _ = oracles.differential(
        "graph-optimizer/" + name, initial,
        lambda k, size: train(OPTIMIZERS[name], batches(arrays, size), k)[1:], n, b)
    assert big[1] == 2 * 96 // (n * b)


def test_micro_batch_size_weights_unequal_micro_batches():
    # Windows of micro-batches 8, 8, 8, 6: the big batch of 30 weights the
    # short one by 6/30, not 1/4.
    arrays = data(samples=90)
    sizes = [8, 8, 8, 6]
    micro, start = [], 0
    while start < 90:
        for size in sizes:
            micro.append(tuple(a[start:start + size] for a in arrays))
            start += size
    initial, weighted, _ = train(OPTIMIZERS["adam"], micro, 4, micro_batch_size=True)
    _, big, _ = train(OPTIMIZERS["adam"], batches(arrays, 30, epochs=1))
    _, unweighted, _ = train(OPTIMIZERS["adam"], micro, 4)
    oracles.assert_same_training(initial, weighted, big)
    oracles.assert_discriminates(initial, unweighted, big)


def test_skip_nonfinite_skips_a_window_with_an_inf_whole_and_counts_it():
    x, rows, y = data()
    y = y.copy()
    y[30, 0] = np.inf  # window 2 of 4 per epoch (samples 24-47)
    keep = np.r_[0:24, 48:96]
    initial, skipping, steps = train(OPTIMIZERS["adam"], batches((x, rows, y), 6), 4, skip_nonfinite=True)
    _, big, big_steps = train(OPTIMIZERS["adam"], batches((x[keep], rows[keep], y[keep]), 24))
    assert steps == big_steps == 6
    oracles.record("graph-optimizer/skip_nonfinite", oracles.assert_same_training(initial, skipping, big))
    _, plain, _ = train(OPTIMIZERS["adam"], batches((x, rows, y), 6), 4)
    assert not all(np.isfinite(w).all() for w in plain)  # without the option: as the big batch
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["adam"], 4, skip_nonfinite=True)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            for batch in batches((x, rows, y), 6):
                session.run(net.train_op, net.feed(batch))
            assert session.run(net.optimizer.skipped) == 2


def test_state_moves_only_on_update_runs():
    n = 3
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["adam"], n)
        state = net.inner.variables()  # slots and beta powers
        assert len(state) == 2 * len(net.weights) + 2
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            for run, batch in enumerate(batches(data(), 8)[:2 * n], start=1):
                before = session.run(net.weights + state + [net.global_step])
                session.run(net.train_op, net.feed(batch))
                after = session.run(net.weights + state + [net.global_step])
                moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
                if run % n:
                    assert not any(moved), "run {} is a micro-step, but state moved".format(run)
                else:
                    assert all(moved), "run {} completes a window, but not everything moved".format(run)
                    assert after[-1] == before[-1] + 1


def test_an_update_applies_the_mean_gradient():
    # SGD with a constant rate: w_new = w - rate * mean_k(g_k), the g_k taken at w.
    n, rate = 3, 0.05
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["sgd"], n, decay=False)
        gradients = tf.gradients(net.loss, net.weights)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            start = session.run(net.weights)
            expected = [np.zeros_like(w) for w in start]
            for batch in batches(data(), 8)[:n]:
                dense = session.run([tf.convert_to_tensor(g) for g in gradients], net.feed(batch))
                expected = [e + g / n for e, g in zip(expected, dense)]
                session.run(net.train_op, net.feed(batch))
            for got, w, mean in zip(session.run(net.weights), start, expected):
                np.testing.assert_allclose(got, w - rate * mean, rtol=1e-5, atol=1e-7)


def test_slots_are_ordinary_variables_outside_the_cond():
    with tf.Graph().as_default() as graph:
        net = Net(OPTIMIZERS["adam"], 2)
        everything = v1.global_variables()
        own = net.optimizer.variables()
        # Slots, beta powers and accumulators all exist before any run, in this
        # graph's global collection, and initialize like any variable.
        assert set(map(id, net.inner.variables())) <= set(map(id, own)) <= set(map(id, everything))
        assert len(own) > len(net.inner.variables())  # the accumulators
        assert not any(var.trainable for var in own)
        assert all(var.graph is graph for var in own)
        for var in everything:
            context = getattr(var.initializer, "_control_flow_context", None)
            assert context is None, "{} is initialized inside a {}".format(var.name, type(context).__name__)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            assert session.run(net.optimizer.get_slot(net.w, "m")).shape == (FEATURES, 4)


def test_the_optimizer_surface_delegates():
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["momentum"], 2)
        assert net.optimizer.get_slot_names() == net.inner.get_slot_names() == ["momentum"]
        assert net.optimizer.get_slot(net.w, "momentum") is net.inner.get_slot(net.w, "momentum")
        assert net.optimizer.n == 2 and net.optimizer.optimizer is net.inner


def test_compute_then_apply_equals_minimize():
    feeds = batches(data(), 8)
    initial, split, split_steps = train(OPTIMIZERS["adam"], feeds, 4, split=True)
    _, minimized, steps = train(OPTIMIZERS["adam"], feeds, 4)
    assert split_steps == steps
    oracles.assert_same_training(initial, split, minimized, rel_tol=0)


def test_var_list_and_none_gradients():
    # `unused` has a None gradient; `out` is left out by var_list.
    with tf.Graph().as_default():
        unused = v1.get_variable("unused", [3], initializer=v1.ones_initializer())
        x = v1.placeholder(tf.float32, [None, 2])
        w = v1.get_variable("w", [2, 1], initializer=v1.ones_initializer())
        out = v1.get_variable("out", [1], initializer=v1.ones_initializer())
        loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + out))
        optimizer = AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), 2)
        grads_and_vars = optimizer.compute_gradients(loss, var_list=[w, unused])
        assert [g is None for g, _ in grads_and_vars] == [False, True]
        train_op = optimizer.apply_gradients(grads_and_vars)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            for _ in range(2):
                session.run(train_op, {x: np.ones((4, 2), "float32")})
            w_value, unused_value, out_value = session.run([w, unused, out])
        assert not np.array_equal(w_value, np.ones((2, 1)))
        np.testing.assert_array_equal(unused_value, np.ones(3))
        np.testing.assert_array_equal(out_value, np.ones(1))


def test_no_gradient_at_all_is_a_clear_error():
    with tf.Graph().as_default():
        w = v1.get_variable("w", [2], initializer=v1.ones_initializer())
        optimizer = AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), 2)
        with pytest.raises(ValueError, match="No gradients provided for any variable|no gradients provided"):
            optimizer.minimize(tf.constant(1.0), var_list=[w])


def test_a_strategy_is_refused_in_graph_mode():
    with tf.Graph().as_default():
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            w = v1.get_variable("w", [2], initializer=v1.ones_initializer())
            optimizer = AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), 2)

            def step():
                return optimizer.minimize(tf.reduce_sum(w * w), var_list=[w])

            with pytest.raises(NotImplementedError, match=r"strategies are not supported in graph "
                                                          r"mode.*Received: strategy Mirrored"):
                strategy.extended.call_for_each_replica(step)


def _restart(stop_at, restore_accumulators):
    """Trains with AccumOptimizer, stopping after `stop_at` micro-batches and restoring from a checkpoint."""
    feeds = batches(data(), 8)
    path = os.path.join(_restart.directory, "ckpt-{}-{}".format(stop_at, restore_accumulators))
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["adam"], 4)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            initial = session.run(net.weights)
            for batch in feeds[:stop_at]:
                session.run(net.train_op, net.feed(batch))
            v1.train.Saver().save(session, path)
    with tf.Graph().as_default():
        net = Net(OPTIMIZERS["adam"], 4)
        saved = v1.global_variables()
        if not restore_accumulators:
            saved = [var for var in saved if "gradaccum" not in var.name]
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            v1.train.Saver(saved).restore(session, path)
            for batch in feeds[stop_at:]:
                session.run(net.train_op, net.feed(batch))
            return initial, session.run(net.weights), session.run(net.global_step)


def test_a_script_restored_mid_window_continues_exactly(tmp_path):
    _restart.directory = str(tmp_path)
    feeds = batches(data(), 8)
    initial, uninterrupted, steps = train(OPTIMIZERS["adam"], feeds, 4)
    _, restored, restored_steps = _restart(stop_at=6, restore_accumulators=True)  # 6 % 4: mid-window
    assert restored_steps == steps
    oracles.assert_same_training(initial, restored, uninterrupted, rel_tol=0)
    # Without the accumulators, the restored run loses half a window: a real difference.
    _, forgetful, _ = _restart(stop_at=6, restore_accumulators=False)
    oracles.assert_discriminates(initial, forgetful, uninterrupted)


@pytest.mark.parametrize("make", [lambda: "adam", lambda: None, lambda: tf.keras.optimizers.SGD(0.1)],
                         ids=["str", "None", "keras-optimizer"])
def test_an_optimizer_that_is_not_a_v1_optimizer_is_refused(make):
    with tf.Graph().as_default():
        optimizer = make()
        with pytest.raises(TypeError, match=r"must be a tf.compat.v1.train.Optimizer.*Received: optimizer="):
            AccumOptimizer(optimizer, 4)


@pytest.mark.parametrize("n, error", [(0, ValueError), (2.0, TypeError), (False, TypeError), ("4", TypeError)])
def test_invalid_n_is_refused(n, error):
    with pytest.raises(error, match=r"AccumOptimizer: n must be an integer >= 1.*Received: n="):
        AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), n)


def test_wrapping_twice_is_refused():
    once = AccumOptimizer(v1.train.GradientDescentOptimizer(0.1), 2)
    with pytest.raises(ValueError, match=r"already accumulates \(n=2\)"):
        AccumOptimizer(once, 2)


def test_the_session_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "tf1_session.py")], cwd=str(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0 and "\nexact\n" in result.stdout, result.stdout[-3000:]
