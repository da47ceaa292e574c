"""How far BatchNormalization models trained with accumulation end from the big batch.

A small BatchNormalization CNN is trained from the same initial weights at
batch 32 (the reference), at batch 8 with accumulation over 4 (gradaccum's
pooled statistics, and its "micro" opt-out), at batch 8 plainly, and, where
gradient-accumulator is installed, with its GradientAccumulateModel and
AccumBatchNormalization layers. Printed per run: the gap of the trainable
weights and of the moving statistics to the reference, each relative to the
reference's change, and the gap of inference predictions relative to their
spread. Forward normalization uses each micro-batch's own statistics in
every accumulator, so the trainable weights cannot match exactly.

    python tools/batchnorm_gap.py            (with gradaccum importable)
    python tools/batchnorm_gap.py --cost     (what pooling costs a step)

With --cost it times a BatchNormalization CNN's step, accumulating with
pooled statistics against "micro" and plain training at the same
micro-batch, by tools/benchmark.py's method (one TF thread, the variants
interleaved step by step in a new random order, medians per round, ratios
within rounds).
"""

import argparse
import gc
import os
import sys
import time
import warnings

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gradaccum import _compat, accumulate  # noqa: E402

keras = _compat.keras2_module() or _compat.keras3_module()
N, B, EPOCHS = 4, 8, 3


def cnn(batchnorm):
    inputs = keras.Input((12, 12, 3))
    x = inputs
    for filters in (8, 8):
        x = keras.layers.Conv2D(filters, 3, use_bias=False)(x)
        x = batchnorm()(x)
        x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(256, 12, 12, 3)).astype("float32") * 2.0 + 0.5
    y = keras.utils.to_categorical(rng.randint(3, size=256), 3)
    return x, y


def trained(kind, initial, x, y):
    tf.random.set_seed(0)
    if kind == "gradient-accumulator":
        from gradient_accumulator import AccumBatchNormalization, GradientAccumulateModel
        base = cnn(lambda: AccumBatchNormalization(accum_steps=N))
        model = GradientAccumulateModel(accum_steps=N, inputs=base.input, outputs=base.output)
        batch_size = B
    else:
        base = cnn(keras.layers.BatchNormalization)
        model, batch_size = base, B
        if kind == "big batch":
            batch_size = N * B
        elif kind.startswith("accumulate"):
            options = {"batchnorm": "micro"} if "micro" in kind else {}
            model = accumulate(base, N, **options)
    set_weights(base, initial)
    model.compile(keras.optimizers.SGD(0.01), keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    return base


def parts(model):
    """(trainable weights, moving statistics) by layer order, whatever the BatchNormalization class."""
    trainable, moving = [], []
    for layer in model.layers:
        for weight in layer.weights:
            name = weight.name.split("/")[-1].split(":")[0]
            value = np.array(weight.numpy())
            if name.startswith("moving_"):
                moving.append(value)
            elif weight.trainable or name in ("kernel", "bias", "gamma", "beta"):
                trainable.append(value)
    return trainable, moving


def set_weights(model, initial):
    trainable, moving = initial
    t, m = iter(trainable), iter(moving)
    for layer in model.layers:
        for weight in layer.weights:
            name = weight.name.split("/")[-1].split(":")[0]
            if name.startswith("moving_"):
                weight.assign(next(m))
            elif weight.trainable or name in ("kernel", "bias", "gamma", "beta"):
                weight.assign(next(t))


def gap(got, want, start):
    diff = max(np.max(np.abs(g - w)) for g, w in zip(got, want))
    change = max(np.max(np.abs(w - s)) for w, s in zip(want, start))
    return diff / change


def bn_cnn(width=32):
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters, pool in ((width, False), (2 * width, True), (2 * width, False)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        if pool:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def cost(rounds=5, steps=32, n=N, b=32):
    """Median within-round step-time ratios: pooled against micro, and against plain."""
    import benchmark  # tools/benchmark.py
    benchmark.threads()
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64 * b, 32, 32, 3)).astype("float32")
    y = rng.randint(0, 10, size=(64 * b,)).astype("int64")
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(b).cache().repeat()
    runs = {}
    for name in ("plain", "pooled", "micro"):
        model = bn_cnn()
        if name != "plain":
            model = accumulate(model, n, batchnorm=name)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)
        runs[name] = benchmark.step_runner(name, model, batches)
        for _ in range(2 * n):
            runs[name]()
    medians = {name: [] for name in runs}
    order = np.random.RandomState(0)
    for round_ in range(rounds + 1):
        times = {name: [] for name in runs}
        gc.collect()
        gc.disable()
        try:
            for _ in range(steps):
                for name in order.permutation(list(runs)):
                    start = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - start)
        finally:
            gc.enable()
        if round_:
            for name in runs:
                medians[name].append(float(np.median(times[name])))
    print("Keras {}, TF {}: BatchNormalization CNN 32x32x3 (3 conv + BN), b = {}, n = {}, {} rounds "
          "of {} steps".format(keras.__version__, tf.__version__, b, n, rounds, steps))
    for name, measured in medians.items():
        print("{:8s} median step {:.2f} ms, spread over rounds {:.1%}".format(
            name, 1e3 * np.median(measured), benchmark.spread(measured)))
    for slower, faster in (("pooled", "micro"), ("pooled", "plain"), ("micro", "plain")):
        ratios = [t / o for t, o in zip(medians[slower], medians[faster])]
        print("{} / {} step time: median {:.3f}, rounds {}".format(
            slower, faster, np.median(ratios), " ".join("{:.3f}".format(r) for r in ratios)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cost", action="store_true", help="time the step instead")
    if parser.parse_args().cost:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        cost()
        return
    warnings.simplefilter("ignore")
    x, y = data()
    initial = parts(cnn(keras.layers.BatchNormalization))
    kinds = ["big batch", "accumulate (pooled)", "accumulate (micro)", "plain batch 8"]
    try:
        import gradient_accumulator  # noqa: F401
        kinds.append("gradient-accumulator")
    except ImportError:
        pass
    runs = {kind: trained(kind, initial, x, y) for kind in kinds}
    reference = parts(runs["big batch"])
    predictions = runs["big batch"].predict(x[:64], verbose=0)
    print("Keras {}, TF {}: CNN 12x12x3, two BatchNormalization layers, n = {}, b = {}, {} epochs, "
          "SGD 0.01".format(keras.__version__, tf.__version__, N, B, EPOCHS))
    print("{:24s} {:>16s} {:>18s} {:>20s}".format("run", "trainable gap", "moving stats gap",
                                                "prediction gap"))
    for kind in kinds[1:]:
        trainable, moving = parts(runs[kind])
        predicted = runs[kind].predict(x[:64], verbose=0)
        print("{:24s} {:16.3g} {:18.3g} {:20.3g}".format(
            kind, gap(trainable, reference[0], initial[0]), gap(moving, reference[1], initial[1]),
            np.max(np.abs(predicted - predictions)) / np.ptp(predictions)))


if __name__ == "__main__":
    main()
