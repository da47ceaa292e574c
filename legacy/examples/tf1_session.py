"""A TF1-style Session script with gradient accumulation, stopped and restored mid-window.

Runs on TF 1.15 and on TF 2.x (it disables eager execution). A small
regression network written the TF1 way (placeholders, `Session.run(train_op)`,
a global step with a decaying learning rate) trains twice from the same
initial values:

    accumulated  gradaccum.AccumOptimizer(AdamOptimizer, N), micro-batches of B
    big batch    AdamOptimizer, batches of N * B

Halfway through a window, the accumulated run saves a checkpoint with
`tf.compat.v1.train.Saver`, throws its graph and session away, rebuilds them,
restores, and goes on. The script prints how far apart the two runs ended and
exits 1 unless they match to float32 tolerance with equal global steps.

    python legacy/examples/tf1_session.py
"""

import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

import gradaccum

v1 = tf.compat.v1
v1.disable_eager_execution()

N, B, EPOCHS = 4, 8, 3
FEATURES, HIDDEN = 6, 16
STOP_AT = 13  # micro-batches before the restart: 13 % N != 0, i.e. mid-window


def make_data(samples=256, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(FEATURES, 1))).astype("float32")
    return x, y


def build(accumulate):
    """The training graph: placeholders, a 2-layer net, Adam on a decaying rate."""
    x = v1.placeholder(tf.float32, [None, FEATURES], name="x")
    y = v1.placeholder(tf.float32, [None, 1], name="y")
    w1 = v1.get_variable("w1", [FEATURES, HIDDEN], initializer=v1.random_normal_initializer(stddev=0.5, seed=1))
    b1 = v1.get_variable("b1", [HIDDEN], initializer=v1.zeros_initializer())
    w2 = v1.get_variable("w2", [HIDDEN, 1], initializer=v1.random_normal_initializer(stddev=0.5, seed=2))
    prediction = tf.matmul(tf.tanh(tf.matmul(x, w1) + b1), w2)
    loss = tf.reduce_mean(tf.square(prediction - y))
    global_step = v1.train.get_or_create_global_step()
    learning_rate = v1.train.exponential_decay(0.02, global_step, decay_steps=4, decay_rate=0.8)
    optimizer = v1.train.AdamOptimizer(learning_rate)
    if accumulate:
        # micro_batch_size weights each micro-batch by its size (exact for a short last one too).
        optimizer = gradaccum.AccumOptimizer(optimizer, N, micro_batch_size=tf.shape(x)[0])
    train_op = optimizer.minimize(loss, global_step=global_step)
    return {"x": x, "y": y, "train_op": train_op, "global_step": global_step, "weights": [w1, b1, w2]}


def batches(x, y, size):
    for _ in range(EPOCHS):
        for start in range(0, len(x), size):
            yield x[start:start + size], y[start:start + size]


def train_big_batch(x, y):
    with tf.Graph().as_default():
        graph = build(accumulate=False)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            initial = session.run(graph["weights"])
            for x_batch, y_batch in batches(x, y, N * B):
                session.run(graph["train_op"], {graph["x"]: x_batch, graph["y"]: y_batch})
            return initial, session.run(graph["weights"]), session.run(graph["global_step"])


def train_accumulated(x, y, checkpoint_dir):
    micro_batches = list(batches(x, y, B))
    checkpoint = os.path.join(checkpoint_dir, "model.ckpt")
    # Part 1: train STOP_AT micro-batches, save, and drop everything.
    with tf.Graph().as_default():
        graph = build(accumulate=True)
        saver = v1.train.Saver()  # every global variable: weights, slots, accumulators
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            for x_batch, y_batch in micro_batches[:STOP_AT]:
                session.run(graph["train_op"], {graph["x"]: x_batch, graph["y"]: y_batch})
            saver.save(session, checkpoint)
    # Part 2: a new process would do exactly this: rebuild, restore, continue.
    with tf.Graph().as_default():
        graph = build(accumulate=True)
        saver = v1.train.Saver()
        with v1.Session() as session:
            saver.restore(session, checkpoint)
            for x_batch, y_batch in micro_batches[STOP_AT:]:
                session.run(graph["train_op"], {graph["x"]: x_batch, graph["y"]: y_batch})
            return session.run(graph["weights"]), session.run(graph["global_step"])


def main():
    x, y = make_data()
    initial, big, big_steps = train_big_batch(x, y)
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        accumulated, accumulated_steps = train_accumulated(x, y, checkpoint_dir)
    change = max(np.max(np.abs(b - i)) for b, i in zip(big, initial))
    error = max(np.max(np.abs(a - b)) for a, b in zip(accumulated, big)) / change
    print("TensorFlow {}: accumulated (n={}, b={}, restored after {} micro-batches) vs big batch ({}):"
          .format(tf.__version__, N, B, STOP_AT, N * B))
    print("  max |w_accumulated - w_big| = {:.2e} of the weight change".format(error))
    print("  global_step: {} accumulated, {} big batch".format(accumulated_steps, big_steps))
    exact = error <= 1e-5 and accumulated_steps == big_steps
    print("exact" if exact else "MISMATCH")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
