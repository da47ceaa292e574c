"""A TF1-style Keras script (graph mode) with gradient accumulation.

Runs on TF 1.15 and on TF 2.x with Keras 2 (it disables eager execution; on
TF >= 2.16 set TF_USE_LEGACY_KERAS=1 with tf-keras installed). The model is
compiled with a `tf.compat.v1.train` optimizer, as TF1 Keras code often was,
and fit on arrays whose size is not a multiple of the big batch, with
validation. It trains twice from the same initial weights:

    accumulated  gradaccum.accumulate(model, N).fit(batch_size=B)
    big batch    model.fit(batch_size=N * B)

and exits 1 unless the weights match to float32 tolerance with equal update
counts.

    python legacy/examples/tf1_keras.py
"""

import sys

import numpy as np
import tensorflow as tf

import gradaccum

tf.compat.v1.disable_eager_execution()
keras = tf.keras

N, B, EPOCHS = 4, 8, 3


def make_data(samples=100, seed=0):  # 100 = 3 * 32 + 4: each epoch ends in a short window
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(samples, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 2))).astype("float32")
    return x, y


def build_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="tanh", kernel_regularizer=keras.regularizers.l2(1e-3))(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def train(model, x, y, batch_size):
    model.compile(optimizer=tf.compat.v1.train.MomentumOptimizer(0.05, 0.9, use_nesterov=True), loss="mse")
    model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0,
              validation_data=(x[:20], y[:20]))
    return model.get_weights(), int(keras.backend.get_value(model.optimizer.iterations))


def main():
    x, y = make_data()
    reference = build_model()
    initial = reference.get_weights()
    big, big_updates = train(reference, x, y, N * B)

    model = build_model()
    model.set_weights(initial)
    accumulated, updates = train(gradaccum.accumulate(model, N), x, y, B)

    change = max(np.max(np.abs(b - i)) for b, i in zip(big, initial))
    error = max(np.max(np.abs(a - b)) for a, b in zip(accumulated, big)) / change
    print("TensorFlow {} (Keras {}, graph mode): accumulated (n={}, b={}) vs big batch ({}):".format(
        tf.__version__, getattr(keras, "__version__", "2"), N, B, N * B))
    print("  max |w_accumulated - w_big| = {:.2e} of the weight change".format(error))
    print("  updates: {} accumulated, {} big batch".format(updates, big_updates))
    exact = error <= 1e-5 and updates == big_updates
    print("exact" if exact else "MISMATCH")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
