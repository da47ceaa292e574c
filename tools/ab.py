"""Side by side in one process: the working tree's gradaccum against a git revision's.

    .tox/bench/bin/python tools/ab.py REV [--n 2,8] [--model mlp] [--windows 240] [--instances 6] [--route fit]

A library change that should make training faster is judged here before the
benchmark's full run: the revision's `gradaccum/` is exported (`git archive`)
into a temporary folder as the package `gradaccum_ab`, its Keras
registrations renamed so that both import, and each side trains the
benchmark's custom loop (tools/benchmark.py's models, data, SGD with momentum,
one thread each pool), with Keras 3's `gradient_accumulation_steps` as a
third variant where the Keras is 3. With `--route fit` each side is
`accumulate(model, n)` instead, stepped through `fit`'s train function as
benchmark.py steps its `fit` variants (4 traces an instance), and the
option is compiled into a plain model. As benchmark.py's throughput part does,
every variant takes one micro-step in turn, in a new random order each step,
over several instances each; the figure is the ratio of their times per
window (n consecutive steps: one update), its median, and the median of each
fifth of the run, whose spread is the figure's own repeatability. The median
time of each position in the window follows, to show where a difference is.

`tools/ab.py HEAD` on a clean tree compares the library with itself: the
control, which says what the figures can resolve. With every instance of a
side built before the next side's, the side built first measured 1.000,
0.994 and 0.980 of the other (3 instances, n = 2, 4, 8), then 0.997, 0.991,
0.983 and 0.985 (12 instances, n = 8, 2, 4, 8), its fifths as tight as any
(0.980-0.988 in the last): more instances did not remove it, so it was not
their chance, but the order. The instances are now built in turns, one of
every side a turn in a random order; the control then measured 0.993,
1.003, 1.002 and 0.994 (6 instances, n = 8, 4, 2, 8): the resolution is
about 1%, and a difference the fifths agree on can still be the build's.

The tool refuses to run where the revision's optimizer is not its own (its
class's module outside `gradaccum_ab`): a copy whose facade loads the
installed package's routes compares the working tree with itself. Revisions
before 2cdb1a3 named their routes absolutely; their copies are rewritten to
their own name.
"""

import argparse
import gc
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import benchmark  # noqa: E402  (after the paths, as a script beside it)

ALT = "gradaccum_ab"


def export(revision, folder):
    """Writes `revision`'s gradaccum/ into `folder` as the package ALT; returns the package's path."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "gradaccum"],
                             check=True, stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder)
    package = os.path.join(folder, ALT)
    os.rename(os.path.join(folder, "gradaccum"), package)
    for name in os.listdir(package):
        if name.endswith(".py"):
            path = os.path.join(package, name)
            with open(path) as handle:
                text = handle.read()
            text = text.replace('package="gradaccum"', 'package="{}"'.format(ALT))
            text = text.replace('"gradaccum._', '"{}._'.format(ALT))  # (routes named absolutely)
            with open(path, "w") as handle:
                handle.write(text)
    return package


def compare(args, keras, packages):
    tf = benchmark._tf()
    from gradaccum import _compat

    x, y = benchmark.data(args.model, 8 * 32)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).cache().repeat()
    make_model = benchmark.MODELS[args.model]

    def compiled(model, optimizer):
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model
    for n in [int(value) for value in args.n.split(",")]:
        if args.route == "fit":  # a side's accumulating model, and the option's
            def make_ours(package):
                return compiled(package.accumulate(make_model(keras), n), benchmark.sgd(keras))

            def make_option():
                return compiled(make_model(keras), benchmark.sgd(keras, gradient_accumulation_steps=n))
        else:  # a side's optimizer for the custom loop, and the option's
            def make_ours(package):
                return package.AccumOptimizer(benchmark.sgd(keras), n)

            def make_option():
                return benchmark.sgd(keras, gradient_accumulation_steps=n)
        makers = {side: (lambda package=package: (make_ours(package), True)) for side, package in packages.items()}
        if _compat.keras_major(keras) >= 3 and n > 1:
            makers["keras3-option"] = lambda: (make_option(), False)
        runs = {side: [] for side in makers}
        order = np.random.RandomState(0)
        # (Built in turns: the side built first ran slow otherwise; see the module's docstring.)
        for side in benchmark.in_turns(makers, args.instances, order):
            made, ours = makers[side]()
            if ours and not type(made).__module__.startswith(packages[side].__name__ + "."):
                raise SystemExit("ab.py: {}'s {} is {}.{}, not its own package's; the comparison "
                                 "would run one library twice".format(
                                     side, "model" if args.route == "fit" else "optimizer",
                                     type(made).__module__, type(made).__name__))
            if args.route == "fit":
                made.fit(x[:2 * n * 32], y[:2 * n * 32], batch_size=32, epochs=1, shuffle=False, verbose=0)
                run = benchmark.step_runner(side, made, batches, n, benchmark.TRACES, phase=len(runs[side]))
                for _ in range(run.warm_up):  # trace, warm up
                    run()
                runs[side].append((run, None))
            else:
                step, batch = benchmark.loop_step(keras, make_model(keras), made, ours), iter(batches)
                for _ in range(4 * n):  # trace, warm up
                    step(*next(batch))
                runs[side].append((step, batch))
        times = {side: [] for side in runs}
        gc.collect()
        gc.disable()
        try:
            for index in range(args.windows * n):
                instance = benchmark.instance_of(index, n, 1, args.instances)
                for side in order.permutation(list(runs)):
                    step, batch = runs[side][instance]
                    inputs = next(batch) if batch is not None else ()  # (a loop's batch, fetched untimed)
                    start = time.perf_counter()
                    step(*inputs)
                    times[side].append(time.perf_counter() - start)
        finally:
            gc.enable()
        steps = {side: np.asarray(measured).reshape(-1, n) for side, measured in times.items()}
        windows = {side: measured.sum(axis=1) for side, measured in steps.items()}
        print("{} n={}, {} windows x {} instances; speed ratio per window (above 1: the first is "
              "faster), median [fifths]:".format(args.model, n, args.windows, args.instances))
        for first, second in [("working tree", args.revision), ("working tree", "keras3-option"),
                              (args.revision, "keras3-option")]:
            if second in windows:
                ratios = windows[second] / windows[first]
                print("  {} / {}: {:.3f} [{}]".format(first, second, np.median(ratios), " ".join(
                    "{:.3f}".format(np.median(part)) for part in np.array_split(ratios, 5))))
        print("  median step by position in the window (us):")
        for side, measured in steps.items():
            print("    {:<14} {}".format(side, " ".join(
                "{:.0f}".format(np.median(measured[:, j]) * 1e6) for j in range(n))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="a git revision, e.g. HEAD or a commit")
    parser.add_argument("--n", default="2,8", help="micro-batches per update, comma-separated")
    parser.add_argument("--model", default="mlp", choices=sorted(benchmark.MODELS))
    parser.add_argument("--windows", type=int, default=240, help="timed windows per variant")
    parser.add_argument("--instances", type=int, default=6, help="models per variant, stepped in turn")
    parser.add_argument("--route", default="loop", choices=["loop", "fit"],
                        help="loop: AccumOptimizer in a custom loop; fit: accumulate(model, n) through "
                             "fit's train function (its traces as benchmark.py's: step_runner)")
    args = parser.parse_args()
    for name, value, least in (("--windows", args.windows, 5), ("--instances", args.instances, 1)):
        if value < least:  # (--windows: the ratios are reported per fifth of them)
            parser.error("{} must be >= {}. Received: {}".format(name, least, value))
    for value in args.n.split(","):
        if not value.isdigit() or int(value) < 1:
            parser.error("--n must be integers >= 1, comma-separated. Received: {!r}".format(args.n))
    folder = tempfile.mkdtemp(prefix="gradaccum-ab-")
    try:
        export(args.revision, folder)
        sys.path.insert(0, folder)
        benchmark.threads()
        keras = benchmark._keras()
        import gradaccum

        packages = {"working tree": gradaccum, args.revision: importlib.import_module(ALT)}
        compare(args, keras, packages)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
