"""Benchmarks: throughput, memory and convergence of accumulate(model, n) against the alternatives.

Run it through tools/benchmark.sh, which builds the two environments and
merges their results; this script measures what the interpreter running it
can import:

- gradaccum's `accumulate(model, n)` and its optimizer wrapper
  `AccumOptimizer(optimizer, n)` at micro-batch b, plain Keras at b, and a
  "floor" that computes the gradients (forward and backward) and reduces them
  to one number without applying them, everywhere;
- Keras 3's optimizer option `gradient_accumulation_steps=n`, on Keras 3;
- gradient-accumulator 0.5.2's `GradientAccumulateModel` and
  `GradientAccumulateOptimizer`, where installed.

Throughput variants are interleaved in one process, round after round, and
reported as best-of-rounds with their spread, and as ratios to plain training
at the same micro-batch measured in the same rounds: a lone absolute time on
a shared machine is not a result. Memory is measured one configuration per
child process (peak RSS). Convergence overlays the loss curves of accumulation
(b, n), the big batch n*b and plain b, and prints the max weight difference.

    python tools/benchmark.py --label keras3 --out tools/benchmark [--quick]
    python tools/benchmark.py --merge tools/benchmark   # results.md from every label
"""

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = (1, 2, 4, 8)


def _tf():
    import tensorflow as tf
    return tf


def _keras():
    from gradaccum import _compat
    return _compat.keras2_module() or _compat.keras3_module()


# ---------------------------------------------------------------- models, data

def mlp(keras, activation="relu"):
    inputs = keras.Input((256,))
    hidden = keras.layers.Dense(1024, activation=activation)(inputs)
    hidden = keras.layers.Dense(1024, activation=activation)(hidden)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden), name="mlp")


def cnn(keras, size=32, width=32, head=0):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if head:  # parameters enough that their copy shows in a process's RSS
        x = keras.layers.Dense(2 * head, activation="relu")(x)
        x = keras.layers.Dense(head, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="cnn")


MODELS = {"mlp": mlp, "cnn": cnn}


def data(model_name, samples, seed=0):
    rng = np.random.RandomState(seed)
    shape = (samples, 256) if model_name == "mlp" else (samples, 32, 32, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.randint(0, 10, size=(samples,)).astype("int64")
    return x, y


# ---------------------------------------------------------------- variants

def floor_model(keras, model):
    """`model` whose training step computes the gradients and reduces them to one number."""
    tf = _tf()

    class Floor(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, inputs, training=None):
            return self.inner(inputs, training=training)

        def train_step(self, batch):
            x, y = batch[0], batch[1]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, self.inner(x, training=True), from_logits=True))
            grads = tape.gradient(loss, self.inner.trainable_variables)
            return {"g": tf.add_n([tf.reduce_sum(g) for g in grads])}

    return Floor(model)


def variants(keras):
    """name -> (make(model, n) -> compiled model). What this environment can run."""
    from gradaccum import AccumOptimizer, _compat, accumulate

    def optimizer(**kwargs):
        return keras.optimizers.SGD(0.01, momentum=0.9, **kwargs)

    def compiled(model, opt):
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    found = {
        "plain": lambda model, n: compiled(model, optimizer()),
        "gradaccum": lambda model, n: compiled(accumulate(model, n), optimizer()),
        # The optimizer wrapper, as custom loops and models with their own
        # train_step use it (here through Keras' train_step).
        "gradaccum-optimizer": lambda model, n: compiled(
            model, AccumOptimizer(optimizer(), n) if n > 1 else optimizer()),
        "floor": lambda model, n: compiled(floor_model(keras, model), optimizer()),
    }
    if _compat.keras_major(keras) >= 3:
        found["keras3-option"] = lambda model, n: compiled(
            model, optimizer(gradient_accumulation_steps=n) if n > 1 else optimizer())
    try:
        from gradient_accumulator import GradientAccumulateModel, GradientAccumulateOptimizer
    except ImportError:
        pass
    else:
        found["gradient-accumulator"] = lambda model, n: compiled(
            GradientAccumulateModel(accum_steps=n, inputs=model.input, outputs=model.output), optimizer())
        # Its optimizer wrapper needs an OptimizerV2 (it calls _create_slots):
        # on Keras >= 2.11 that is the legacy SGD, the same algorithm.
        legacy_sgd = getattr(keras.optimizers, "legacy", keras.optimizers).SGD
        found["gradient-accumulator-optimizer"] = lambda model, n: compiled(
            model, GradientAccumulateOptimizer(optimizer=legacy_sgd(0.01, momentum=0.9), accum_steps=n)
            if n > 1 else optimizer())
    return found


# ---------------------------------------------------------------- throughput

def throughput(args):
    keras = _keras()
    found = variants(keras)
    rounds, steps, b = (3, 64, 32) if args.quick else (7, 256, 32)
    results = []
    for model_name in MODELS:
        for n in NS:
            samples = b * steps  # the same micro-steps per timed epoch for every n
            x, y = data(model_name, samples)
            built = {}
            for name, make in found.items():
                if name == "floor" and n > 1:
                    continue  # the floor does not depend on n; timed at n = 1 and reused
                model = make(MODELS[model_name](keras), n)
                model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)  # trace, warm up
                built[name] = model
            times = {name: [] for name in built}
            for _ in range(rounds):
                for name, model in built.items():  # interleaved, round after round
                    start = time.perf_counter()
                    model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)
                    times[name].append(time.perf_counter() - start)
            for name, measured in times.items():
                best = min(measured)
                results.append({"model": model_name, "n": n, "b": b, "variant": name,
                                "samples_per_s": samples / best, "best_s": best,
                                "spread": (max(measured) - best) / best, "rounds": rounds})
            print("throughput", model_name, "n={}".format(n),
                  {k: round(samples / min(v)) for k, v in times.items()}, flush=True)
    # Ratios to plain (and to the floor, timed at n = 1) at the same micro-batch.
    for row in results:
        same = [r for r in results if r["model"] == row["model"] and r["n"] == row["n"]]
        plain = next(r for r in same if r["variant"] == "plain")
        floor = next((r for r in results if r["model"] == row["model"] and r["variant"] == "floor"), None)
        row["vs_plain"] = row["samples_per_s"] / plain["samples_per_s"]
        if floor is not None:
            row["vs_floor"] = row["samples_per_s"] / floor["samples_per_s"]
    return results


# ---------------------------------------------------------------- memory

# Activations dominate (96x96 images through 64-128 channels: over 100 MiB at
# b=8), and the parameters (about 35 MiB, mostly the dense head) are enough to
# show their one extra float32 copy in a process's peak RSS.
MEMORY_MODEL = {"size": 96, "width": 64, "head": 2048}


def memory_child(variant, b, n, samples):
    """Peak RSS (bytes) of training `variant` on `samples` samples, in this fresh process."""
    keras = _keras()
    model = cnn(keras, **MEMORY_MODEL)
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    make = variants(keras)[variant]
    trained = make(model, n)
    x = np.random.RandomState(0).normal(size=(samples,) + (MEMORY_MODEL["size"],) * 2 + (3,))
    y = np.zeros(len(x), "int64")
    trained.fit(x.astype("float32"), y, batch_size=b, epochs=1, verbose=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    window = getattr(trained, "_accum_window", None)
    state = sum(int(np.prod(v.shape)) * _tf().as_dtype(v.dtype).size
                for v in (window.all_variables() if window is not None else []))
    print(json.dumps({"peak_rss": peak, "param_bytes": params * 4, "accumulator_bytes": state}))


def memory(args):
    b, n = (8, 4) if args.quick else (16, 8)
    runs = [("plain", b, 1), ("plain", n * b, 1), ("gradaccum", b, n)]
    repeats = 2 if args.quick else 3
    results = []
    for variant, batch, steps in runs:
        peaks = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--memory-child", variant, str(batch), str(steps),
                 str(2 * n * b)],  # the same samples for every row: 2 updates of n*b
                stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            peaks.append(measured["peak_rss"])
        results.append({"variant": variant, "b": batch, "n": steps, "peak_rss": min(peaks),
                        "peak_rss_runs": peaks, "param_bytes": measured["param_bytes"],
                        "accumulator_bytes": measured["accumulator_bytes"]})
        print("memory", results[-1], flush=True)
    plain_b = results[0]["peak_rss"]
    for row in results:
        row["over_plain_b"] = row["peak_rss"] - plain_b
        row["over_plain_b_in_params"] = row["over_plain_b"] / float(row["param_bytes"])
    return results


# ---------------------------------------------------------------- convergence

def convergence(args, out):
    keras = _keras()
    tf = _tf()
    from gradaccum import accumulate
    b, n, epochs = 16, 4, (6 if args.quick else 20)
    x, y = data("mlp", 2048, seed=1)
    y = (x[:, :10].argmax(axis=1)).astype("int64")  # learnable labels
    tf.random.set_seed(0)
    # tanh, not ReLU: with ReLU a unit whose input is near zero flips after a
    # float32 rounding difference, and from then on any two computations of
    # the same training diverge (measured: 7e-7 of the change after 2
    # epochs, 2e-3 after 4, for accumulation against the big batch).
    initial = mlp(keras, "tanh").get_weights()

    def run(batch, steps):
        model = mlp(keras, "tanh")
        model.set_weights(initial)
        if steps > 1:
            model = accumulate(model, steps)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
        return history.history["loss"], [np.array(w) for w in model.get_weights()]

    curves = {"accumulate(b={}, n={})".format(b, n): run(b, n),
              "big batch {}".format(n * b): run(n * b, 1),
              "plain b={}".format(b): run(b, 1)}
    names = list(curves)
    acc, big = curves[names[0]][1], curves[names[1]][1]
    diff = max(float(np.max(np.abs(a - c))) for a, c in zip(acc, big))
    change = max(float(np.max(np.abs(c - i))) for c, i in zip(big, initial))
    print("convergence: max |w_acc - w_big| = {:.3g} ({:.3g} of the change)".format(diff, diff / change), flush=True)
    png = os.path.join(out, "convergence.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        png = None
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        styles = ["-", "--", ":"]
        for name, style in zip(names, styles):
            ax.plot(range(1, epochs + 1), curves[name][0], style, label=name, linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (epoch mean)")
        ax.set_title("max |w_acc - w_big| = {:.2g} of the change".format(diff / change))
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    return {"losses": {name: curves[name][0] for name in names}, "max_weight_diff": diff,
            "of_change": diff / change, "png": png and os.path.basename(png)}


# ---------------------------------------------------------------- reporting

def environment():
    tf = _tf()
    keras = _keras()
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": "{} {}".format(keras.__name__, getattr(keras, "__version__", "")),
            "machine": "{} ({} CPUs)".format(platform.machine(), os.cpu_count()),
            "gpu": [d.name for d in tf.config.list_physical_devices("GPU")],
            "date": time.strftime("%Y-%m-%d")}


def summary(runs):
    """One row per model and n: every throughput ratio, each measured within its own environment."""
    columns = []  # (header, label, variant, against)
    for run in runs:
        names = {row["variant"] for row in run.get("throughput", [])}
        label = run["label"]
        columns.append(("gradaccum / plain ({})".format(label), label, "gradaccum", "vs_plain"))
        if "floor" in names:
            columns.append(("gradaccum / floor ({})".format(label), label, "gradaccum", "vs_floor"))
        for other in sorted(names - {"plain", "gradaccum", "floor"}):
            columns.append(("{} / plain ({})".format(other, label), label, other, "vs_plain"))
    if not columns:
        return []
    lines = ["## Summary: throughput ratios at the same micro-batch", "",
             "| model | n | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    by_label = {run["label"]: run for run in runs}
    for model in MODELS:
        for n in NS:
            cells = []
            for _, label, variant, against in columns:
                row = next((r for r in by_label[label].get("throughput", [])
                            if r["model"] == model and r["n"] == n and r["variant"] == variant), None)
                cells.append("{:.3f}".format(row[against]) if row and against in row else "-")
            lines.append("| {} | {} | {} |".format(model, n, " | ".join(cells)))
    return lines + [""]


def merge(out):
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "benchmark-*.json"))):
        with open(path) as handle:
            runs.append(json.load(handle))
    lines = ["# Benchmark results", ""]
    for run in runs:
        env = run["environment"]
        lines += ["## {} ({})".format(run["label"], "quick" if run["quick"] else "full"), "",
                  "{date}; Python {python}, TensorFlow {tensorflow}, {keras}; {machine}; GPU: {gpus}.".format(
                      gpus=", ".join(env["gpu"]) or "none", **env), ""]
        if run.get("throughput"):
            lines += ["Throughput, samples/s (best of {} interleaved rounds; spread = (worst - best) / best); "
                      "ratios to plain training at the same micro-batch b={} and to the floor (gradients "
                      "only, never applied).".format(run["throughput"][0]["rounds"], run["throughput"][0]["b"]), "",
                      "| model | n | variant | samples/s | spread | vs plain | vs floor |",
                      "|---|---|---|---|---|---|---|"]
            for row in run["throughput"]:
                lines.append("| {model} | {n} | {variant} | {samples_per_s:.0f} | {spread:.1%} | {vs_plain:.3f} | {floor} |"
                             .format(floor="{:.3f}".format(row["vs_floor"]) if "vs_floor" in row else "-", **row))
            lines.append("")
        if run.get("memory"):
            lines += ["Peak RSS, one process per run, the lowest of the runs (CNN on 96x96 images: "
                      "activations dominate); and the bytes of the variables gradaccum adds, counted.", "",
                      "| variant | b | n | peak RSS (MiB), runs | over plain at b (MiB) | in parameter bytes "
                      "| accumulator variables |",
                      "|---|---|---|---|---|---|---|"]
            for row in run["memory"]:
                lines.append("| {variant} | {b} | {n} | {mib:.0f} ({runs}) | {over:.1f} | {over_plain_b_in_params:.2f}x "
                             "| {state} |".format(
                                 mib=row["peak_rss"] / 2 ** 20, over=row["over_plain_b"] / 2 ** 20,
                                 runs=", ".join("{:.0f}".format(p / 2 ** 20) for p in row["peak_rss_runs"]),
                                 state="{:.2f} MiB = {:.3f}x".format(
                                     row["accumulator_bytes"] / 2 ** 20,
                                     row["accumulator_bytes"] / float(row["param_bytes"]))
                                 if row["accumulator_bytes"] else "-", **row))
            lines += ["", "Trainable parameters: {:.2f} MiB (float32).".format(
                run["memory"][0]["param_bytes"] / 2 ** 20), ""]
        if run.get("convergence"):
            conv = run["convergence"]
            lines += ["Convergence: max |w_acc - w_big| = {:.3g} ({:.3g} of the weight change); plot: {}.".format(
                conv["max_weight_diff"], conv["of_change"], conv["png"]), ""]
    lines += summary(runs)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "benchmark"))
    parser.add_argument("--label", default="run")
    parser.add_argument("--parts", default="throughput,memory,convergence")
    parser.add_argument("--merge", metavar="DIR", help="write DIR/results.md from DIR/benchmark-*.json")
    parser.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "B", "N", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, b, n, samples = args.memory_child
        return memory_child(variant, int(b), int(n), int(samples))
    if args.merge:
        return merge(args.merge)
    os.makedirs(args.out, exist_ok=True)
    parts = set(args.parts.split(","))
    unknown = parts - {"throughput", "memory", "convergence"}
    if unknown:
        parser.error("--parts: unknown {}; allowed: throughput, memory, convergence".format(sorted(unknown)))
    result = {"label": args.label, "quick": args.quick, "environment": environment()}
    if "throughput" in parts:
        result["throughput"] = throughput(args)
    if "memory" in parts:
        result["memory"] = memory(args)
    if "convergence" in parts:
        result["convergence"] = convergence(args, args.out)
    with open(os.path.join(args.out, "benchmark-{}.json".format(args.label)), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
