"""The main job: accumulation at micro-batch b trains exactly like the big batch n*b.

Trains one model three ways from the same initial weights, on generated data:
    accumulated  accumulate(model, n), batch_size=b
    big batch    plain Keras, batch_size=n*b
    small batch  plain Keras, batch_size=b   (to show the comparison is not trivial)
and prints how far the weights ended up from each other. Exits 1 on a mismatch.

    bash tools/demo.sh            # from a fresh machine
    python tools/demo.py --n 8    # where gradaccum and TensorFlow are installed
"""

import argparse
import sys

import numpy as np
import tensorflow as tf

from gradaccum import accumulate


def build_model(n_features):
    inputs = tf.keras.Input((n_features,))
    hidden = tf.keras.layers.Dense(32, activation="relu",
                                   kernel_regularizer=tf.keras.regularizers.l2(1e-3))(inputs)
    outputs = tf.keras.layers.Dense(1)(hidden)
    return tf.keras.Model(inputs, outputs)


def train(model, x, y, batch_size, epochs):
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [np.array(w) for w in model.get_weights()], int(model.optimizer.iterations.numpy()), history


def max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size b")
    parser.add_argument("--samples", type=int, default=1000, help="data size (need not divide n*b)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    rng = np.random.RandomState(0)
    x = rng.normal(size=(args.samples, 10)).astype("float32")
    y = (np.sin(x[:, :1]) + 0.1 * rng.normal(size=(args.samples, 1))).astype("float32")
    tf.keras.utils.set_random_seed(0)
    initial = build_model(10).get_weights()

    def fresh():
        model = build_model(10)
        model.set_weights(initial)
        return model

    big_batch = args.n * args.batch_size
    acc_w, acc_steps, history = train(accumulate(fresh(), args.n), x, y, args.batch_size, args.epochs)
    big_w, big_steps, _ = train(fresh(), x, y, big_batch, args.epochs)
    small_w, small_steps, _ = train(fresh(), x, y, args.batch_size, args.epochs)

    change = max_diff(big_w, initial)
    acc_err, small_err = max_diff(acc_w, big_w), max_diff(small_w, big_w)
    print("TensorFlow {}, {} samples, {} epochs, Adam(1e-2), L2-regularised MLP".format(
        tf.__version__, args.samples, args.epochs))
    print("{:<34} {:>10} {:>22} {:>12}".format("run", "updates", "max |w - w_big|", "of change"))
    rows = [("accumulate(model, {}), batch {}".format(args.n, args.batch_size), acc_steps, acc_err),
            ("plain, batch {} (the reference)".format(big_batch), big_steps, 0.0),
            ("plain, batch {}".format(args.batch_size), small_steps, small_err)]
    for name, steps, err in rows:
        print("{:<34} {:>10} {:>22.3e} {:>12.2e}".format(name, steps, err, err / change))
    print("updates per epoch, as fit logged them: {}".format(history.history["updates"]))
    ok = acc_steps == big_steps and acc_err <= 1e-5 * change
    print("MATCH: accumulated weights equal the big batch to float32 tolerance" if ok
          else "MISMATCH: accumulated training differs from the big batch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
