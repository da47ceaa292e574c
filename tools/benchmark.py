"""Benchmarks: throughput, memory and convergence of accumulate(model, n) against the alternatives.

Run it through tools/benchmark.sh, which builds the two environments and
merges their results; this script measures what the interpreter running it
can import:

- the least any exact accumulation does in a custom loop, `loop: bound`: the
  gradients, one fused add per micro-batch, the update every n-th step;
- gradaccum's `accumulate(model, n)` and its optimizer wrapper
  `AccumOptimizer(optimizer, n)` at micro-batch b, plain Keras at b, and a
  "floor" that computes the gradients (forward and backward) and reduces them
  to one number without applying them (through `fit`, and a custom loop's
  own: `loop: floor`), everywhere;
- Keras 3's optimizer option `gradient_accumulation_steps=n`, on Keras 3;
- gradient-accumulator 0.5.2's `GradientAccumulateModel` and
  `GradientAccumulateOptimizer`, where installed.

Each variant trains through `fit`'s own train function, and the optimizer
wrappers also in a custom training loop (`loop:` rows). TF runs on one thread
(see `threads`). The variants of a model and n take one micro-step each in a
new random order, step after step, after a trace and a warm-up, with the
garbage collector kept out of the timed rounds; each variant is several model
instances, each traced several times, whose windows and traces every round
holds alike (`INSTANCES`, `TRACES`). Each is
reported as the median of its rounds with its spread, and as ratios to plain
training and to the floor taken within each round: a lone absolute time on a
shared machine is not a result. Memory is the peak of training itself (the
data and model exist before it and are not counted), through `fit` and in
custom loops, one configuration per fresh process, the median of several,
with each step's share (what training holds between steps, and how far a
step rises above it). Convergence overlays the loss curves of accumulation
(b, n), the big batch n*b and plain b, and prints the max weight difference.
`results.md` ends with a summary per environment and each target stated as
met or missed, with its figures.

    python tools/benchmark.py --label keras3 --out tools/benchmark [--quick]
    python tools/benchmark.py --merge tools/benchmark   # results.md from every label
"""

import argparse
import gc
import glob
import json
import math
import os
import platform
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

def gradients(keras, model, x, y):
    """The gradients of the mean cross-entropy on (x, y): what every variant's step computes first."""
    tf = _tf()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, model(x, training=True), from_logits=True))
    return tape.gradient(loss, model.trainable_variables)


def reduced(grads):
    """The floor's use of the gradients: one number, so that nothing is applied and nothing pruned."""
    tf = _tf()
    return tf.add_n([tf.reduce_sum(g) for g in grads])


def floor_model(keras, model):
    """`model` whose training step computes the gradients and reduces them to one number."""
    class Floor(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, inputs, training=None):
            return self.inner(inputs, training=training)

        def train_step(self, batch):
            return {"g": reduced(gradients(keras, self.inner, batch[0], batch[1]))}

    return Floor(model)


def sgd(keras, **kwargs):
    """The optimizer every variant trains with: SGD with momentum."""
    return keras.optimizers.SGD(0.01, momentum=0.9, **kwargs)


def optimizers(keras):
    """name -> (make(n) -> optimizer): the optimizers that accumulate, where this environment has them.

    `fit` variants use plain SGD at n = 1 for all of them (so the wrapper at
    n = 1 is plain training: the benchmark's control); custom loops keep
    gradaccum's wrapper at n = 1.
    """
    from gradaccum import AccumOptimizer, _compat

    found = {"gradaccum-optimizer": lambda n: AccumOptimizer(sgd(keras), n)}
    if _compat.keras_major(keras) >= 3:
        found["keras3-option"] = lambda n: sgd(keras, gradient_accumulation_steps=n) if n > 1 else sgd(keras)
    try:
        from gradient_accumulator import GradientAccumulateOptimizer
    except ImportError:
        pass
    else:
        # It needs an OptimizerV2 (it calls _create_slots): on Keras >= 2.11
        # that is the legacy SGD, the same algorithm.
        legacy_sgd = getattr(keras.optimizers, "legacy", keras.optimizers).SGD
        found["gradient-accumulator-optimizer"] = lambda n: GradientAccumulateOptimizer(
            optimizer=legacy_sgd(0.01, momentum=0.9), accum_steps=n) if n > 1 else sgd(keras)
    return found


def variants(keras):
    """name -> (make(model, n) -> compiled model). What this environment can run."""
    from gradaccum import accumulate

    def compiled(model, opt):
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    found = {
        "plain": lambda model, n: compiled(model, sgd(keras)),
        "gradaccum": lambda model, n: compiled(accumulate(model, n), sgd(keras)),
        "floor": lambda model, n: compiled(floor_model(keras, model), sgd(keras)),
    }
    # The optimizer wrappers, as custom loops and models with their own
    # train_step use them (here through Keras' train_step).
    for name, make in optimizers(keras).items():
        found[name] = lambda model, n, make=make: compiled(model, make(n) if n > 1 else sgd(keras))
    try:
        from gradient_accumulator import GradientAccumulateModel
    except ImportError:
        pass
    else:
        found["gradient-accumulator"] = lambda model, n: compiled(
            GradientAccumulateModel(accum_steps=n, inputs=model.input, outputs=model.output), sgd(keras))
    return found


def loop_step(keras, model, optimizer, sized):
    """A custom loop's training step: the loss's gradients by a tape, handed to `optimizer`.

    A `tf.function`. `sized`: the optimizer is told the micro-batch's size
    (`batch_size`), as gradaccum's wrapper is.
    """
    tf = _tf()

    @tf.function
    def step(x, y):
        pairs = zip(gradients(keras, model, x, y), model.trainable_variables)
        if sized:
            optimizer.apply_gradients(pairs, batch_size=tf.shape(x)[0])
        else:
            optimizer.apply_gradients(pairs)
    step.optimizer = optimizer  # (for `memory_child`)
    step.retrace = lambda: loop_step(keras, model, optimizer, sized)
    return step


def loop_variants(keras):
    """name -> (make(model, n) -> a training step for a custom loop): the optimizer wrappers.

    Each step is a `tf.function` that computes the loss and its gradients with
    a GradientTape and hands them to the optimizer, as a custom training loop
    does; gradaccum's wrapper is also told the micro-batch's size.
    """
    tf = _tf()
    from gradaccum import AccumOptimizer
    from gradaccum._window import _add_scaled

    def step_for(model, opt):
        return loop_step(keras, model, opt, sized=isinstance(opt, AccumOptimizer))

    def floor_for(model):
        @tf.function
        def step(x, y):  # the loop's own floor: its gradients, reduced to one number, never applied
            return reduced(gradients(keras, model, x, y))
        step.retrace = lambda: floor_for(model)
        return step

    def bound_for(model, n):
        """A lean exact accumulation: the loop's gradients, one fused add, the update every n-th step.

        The first micro-step of a window writes its gradients, the others add
        them in one fused pass each, and the n-th hands their mean to the
        optimizer: which step is which is counted in Python (a trace for
        each kind), so no counter, condition or weight runs in the graph.
        """
        opt = sgd(keras)
        variables = model.trainable_variables
        sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in variables]
        opt.build(variables)  # (its slots, before the trace that applies)

        def traced():
            @tf.function
            def step(x, y, first, last):
                for total, grad in zip(sums, gradients(keras, model, x, y)):
                    if first:
                        total.assign(grad, read_value=False)
                    else:  # (gradaccum's own fused add, with a weight of 1)
                        _add_scaled(total, grad, tf.constant(1.0))
                if last:
                    opt.apply_gradients([(total * (1.0 / n), v) for total, v in zip(sums, variables)])

            def run(x, y):
                k = taken[0] % n
                taken[0] += 1
                step(x, y, k == 0, k == n - 1)
            run.retrace = traced  # (another trace, over the same sums and count)
            return run

        taken = [0]
        return traced()

    found = {"loop: plain": lambda model, n: step_for(model, sgd(keras)),
             "loop: floor": lambda model, n: floor_for(model),
             "loop: bound": bound_for}
    for name, make in optimizers(keras).items():
        found["loop: " + name] = lambda model, n, make=make: step_for(model, make(n))
    return found


# ---------------------------------------------------------------- throughput

def threads():
    """Pins TF to one intra-op and one inter-op thread, before its first op.

    On the 2-core machine this was written on, TF's default pools (two
    intra-op threads beside Python's own, and an inter-op pool) made the
    same training step's time drift by 20-30% between rounds, and one thread
    by about 6%, while the ratios between variants changed their order. The
    ratios are then per-core efficiency, the figure this tool is for.
    """
    tf = _tf()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def step_runner(name, made, batches, n=1, traces=1, phase=0):
    """A callable that runs one training step of `made`, on the next micro-batch of `batches`.

    A compiled model is stepped through its own train function (the one
    `fit` traced, and `traces` - 1 more made anew), a custom loop's step
    through its tf.function (and `traces` - 1 more made over the same model,
    optimizer and window); all read one repeating, cached tf.data iterator.
    Every trace of an instance steps the same model, so one window's steps
    can run on different traces: step k runs on trace
    (k + k // m + `phase`) mod `traces`, m the least common multiple of n
    and `traces`: each trace in turn, and the window's update on another
    trace after every m steps (k mod `traces` alone would put every update
    on one trace where n is a multiple of `traces`; `phase`, the instance's
    number, puts the instances' updates of one round on different traces
    too). Its `warm_up`: the steps after which every trace has taken every
    step of a window (`loop: bound` traces each kind of step anew), and at
    least two windows. Why: each traced function runs at an offset
    of its own for as long as it lives (INSTANCES), and a round then pools
    all of an instance's traces, not one of them.
    """
    iterator = iter(batches)
    if name.startswith("loop:"):
        steps = [made]
        while len(steps) < traces:
            steps.append(made.retrace())
        calls = [lambda step=step: step(*next(iterator)) for step in steps]
    else:
        functions = [made.make_train_function()]
        while len(functions) < traces:
            made.make_train_function(force=True)  # (Keras 3's returns None, and sets it)
            functions.append(made.train_function)
        calls = [lambda function=function: function(iterator) for function in functions]
    m = n * traces // math.gcd(n, traces)
    taken = [0]

    def run():
        k = taken[0]
        taken[0] += 1
        calls[(k + k // m + phase) % traces]()
    run.warm_up = max(2 * n, m * traces)
    return run


def in_turns(names, instances, order):
    """The order to build `instances` instances of each of `names` in: one of every name a turn.

    The names come in a new random order each turn (`order`, a RandomState).
    Where a model and its traced step land in memory sets its speed for as
    long as it lives, and with every instance of a variant built before the
    next variant's, tools/ab.py's control (the library against a copy of
    itself) put the side built first at 0.980-1.000 of the other, in six of
    seven runs below 1; built in turns, 0.993-1.003.
    """
    for _ in range(instances):
        for name in order.permutation(list(names)):
            yield name


def instance_of(step, n, rounds, instances):
    """Which of a variant's instances takes micro-step `step`: its window's, dealt in turn to each round.

    Window k (steps k*n to k*n + n - 1, one update) belongs to round
    k mod `rounds` and to instance (k // rounds) mod `instances`: every round
    holds every instance's windows, the same number of each when a round's
    windows are a multiple of `instances`.
    """
    return (step // n // rounds) % instances


def round_figures(step_times, n, rounds, trim=0.2):
    """Each round's time per step over its windows (n consecutive steps): their trimmed mean.

    Window k belongs to round k mod `rounds`: the rounds interleave, each
    spans the whole timed run, and a drift of the machine's speed reaches
    every round alike. Their spread is then the figure's own repeatability.
    A round's windows come from every instance of the variant (`instance_of`).
    The mean of the middle 60% of a round's windows, not their median: a
    machine that ran slow for part of the run gives each round the same mix
    of slow and fast windows, whose mean every round shares, while their
    median jumps between the two (measured: spreads up to 6.7% with the
    median, in a run where the rounds' windows came from the same stretch).
    """
    windows = np.asarray(step_times[:len(step_times) // n * n]).reshape(-1, n).mean(axis=1)
    figures = []
    for r in range(rounds):
        mine = np.sort(windows[r::rounds])
        cut = int(len(mine) * trim)
        figures.append(float(mine[cut:len(mine) - cut].mean()))
    return figures


def spread(values):
    """(largest - smallest) / smallest."""
    return (max(values) - min(values)) / min(values)


# Micro-steps per variant and round: about 0.6 s (MLP) and 2.3 s (CNN) on one
# core of a 2-core CPU; 24 and 9 windows of n = 8 a round, a multiple of
# INSTANCES at every n. (With 48 CNN steps, 5 of 136 variants' rounds spread
# 5.0-6.1%, all on the CNN.)
STEPS = {"mlp": 192, "cnn": 72}
# Model instances per variant (each built, traced and warmed up on its own).
# Each traced training function runs at its own speed for as long as it
# lives: six traces of one step function over one model and its variables,
# stepped in turn, ran at 1.044, 1.040 and 0.996-1.001 of their median on
# the CNN, and reassigning every variable to a new buffer left that as it
# was. It follows where the buffers of oneDNN's kernels land in the heap:
# with oneDNN off, or with every buffer over 128 KiB mapped on its own
# (page-aligned), the six ran within 1%; neither is used here (oneDNN is what
# users run, and mapping every buffer made the steps 6-26% slower). Six CNN
# instances with models of their own: one at 1.034-1.046, the rest within
# 0.6%. Each round pools all instances' windows, so the offsets are averaged
# into every round alike, over more instances where they are larger.
INSTANCES = {"mlp": 6, "cnn": 9}
# Traces per instance: its train function made anew (or its loop's step),
# over the same model, and its steps dealt to them in turn (`step_runner`).
# 9 CNN instances of one trace left the offsets to chance: the CNN's n = 1
# control (plain against the wrapper variant, the same computation)
# measured 0.983-1.030 over five fresh processes, the loop's pair
# 0.979-1.005; with 4 traces an instance, 0.995-1.001 and 0.995-1.002, in
# the same time. Each instance takes STEPS / INSTANCES steps a round (8 on
# the CNN), a multiple of TRACES: every round holds every trace alike.
TRACES = 4


def throughput(args):
    """Steady-state step time of every variant, stepped in turn, step by step.

    For each model and n, INSTANCES[model] models of every variant are built
    in turns (one of every variant a turn, in a random order), traced
    (TRACES times, `step_runner`) and warmed up (a `fit` epoch of 2n steps,
    then at least 2n steps, every trace at every step of a window), then the variants take
    one micro-step each in a random order, step after step: a drift of the
    machine's speed reaches every variant alike; which instance of a
    variant steps follows its windows (`instance_of`), and which of its
    traces, its own count of steps. STEPS steps settle the process and are not counted;
    then rounds x STEPS are timed. A variant's windows (each n consecutive
    steps, which hold exactly one update, so the update's cost is counted,
    shared by its n micro-batches; a median of single steps would skip it
    whenever n > 2) are dealt to the rounds in turn, and a round's figure
    is its trimmed mean time per micro-batch (`round_figures`). Ratios to
    plain and to the floor are taken within each round, over the same
    windows of time.
    """
    keras = _keras()
    tf = _tf()
    found, loops = variants(keras), loop_variants(keras)
    b = 32
    rounds = 3 if args.quick else args.rounds
    ns = [int(n) for n in args.ns.split(",")]  # (checked in `main`)
    results = []
    for model_name in args.models.split(","):
        steps = STEPS[model_name] // (4 if args.quick else 1)
        instances = INSTANCES[model_name]
        x, y = data(model_name, 64 * b)
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(b).cache().repeat()
        # No autotuning: its thread, one per iterator (one per instance), woke
        # beside the timed steps, and each iterator's end waited for it (12
        # instances' ends took 3.6 s, 0.35 s without; a run of 60, minutes).
        options = tf.data.Options()
        options.autotune.enabled = False
        batches = batches.with_options(options)
        for n in ns:
            makers = dict(list(found.items()) + list(loops.items()))
            names = list(makers)
            runs = {name: [] for name in names}
            shuffle = np.random.RandomState(0)
            for name in in_turns(names, instances, shuffle):
                made = makers[name](MODELS[model_name](keras), n)
                if name in loops:
                    for xb, yb in batches.take(n):  # trace
                        made(xb, yb)
                else:  # build, trace
                    made.fit(x[:2 * n * b], y[:2 * n * b], batch_size=b, epochs=1, shuffle=False, verbose=0)
                runs[name].append(step_runner(name, made, batches, n, TRACES, phase=len(runs[name])))
                for _ in range(runs[name][-1].warm_up):  # trace, warm up: caches, allocator, slots
                    runs[name][-1]()
            for part in ("settle", "timed"):  # (the first settles the process, and is not counted)
                times = {name: [] for name in runs}
                gc.collect()
                gc.disable()
                try:
                    for step in range(steps if part == "settle" else rounds * steps):
                        # A new order every step: each variant follows every
                        # other (whose memory traffic leaves the caches as it
                        # does), not always the same one.
                        instance = instance_of(step, n, rounds, instances)
                        for name in shuffle.permutation(names):
                            run_step = runs[name][instance]
                            start = time.perf_counter()
                            run_step()
                            times[name].append(time.perf_counter() - start)
                finally:
                    gc.enable()
            figures = {name: round_figures(measured, n, rounds) for name, measured in times.items()}
            for name, measured in figures.items():
                row = {"model": model_name, "n": n, "b": b, "variant": name, "rounds": rounds,
                       "instances": instances, "traces": TRACES, "built": "in turns",
                       "steps_per_round": steps,
                       "round_figures_s": measured,
                       "samples_per_s": b / float(np.median(measured)),
                       "spread": spread(measured)}
                for against, key in (("plain", "vs_plain"), ("floor", "vs_floor")):
                    # Within each round: the other's time over this one's.
                    ratios = [o / t for o, t in zip(figures[against], measured)]
                    row[key] = float(np.median(ratios))
                    row[key + "_spread"] = spread(ratios)
                results.append(row)
            print("throughput", model_name, "n={}".format(n),
                  {k: "{:.0f} ({:.1%})".format(b / np.median(v), spread(v))
                   for k, v in figures.items()}, flush=True)
    return results


# ---------------------------------------------------------------- memory

# Parameters that dominate, activations that do not: 40 MiB of float32
# weights, and at b = 16 activations of a few hundred KiB. One copy of the
# parameters is then plain to see in a process's peak memory.
MEMORY_MODEL = {"inputs": 1024, "width": 2048, "depth": 3}


# glibc's malloc is told to map every buffer over 128 KiB on its own, and to
# unmap it when freed, so that RSS follows the bytes alive. With its default
# (a threshold that grows with the buffers freed), freed tensors stay in its
# heap and the peak also records how the heap fragmented.
MEMORY_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
# The second measure: TensorFlow's own count of the bytes its tensors hold,
# which its BFC allocator keeps on the CPU when asked to. Exact and free of
# malloc and of tracing (graphs and Python objects are not tensors).
TENSOR_ENV = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")


def memory_mlp(keras):
    inputs = keras.Input((MEMORY_MODEL["inputs"],))
    hidden = inputs
    for _ in range(MEMORY_MODEL["depth"]):
        hidden = keras.layers.Dense(MEMORY_MODEL["width"], activation="relu")(hidden)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden), name="memory_mlp")


def _rss(field):
    """This process's VmRSS or VmHWM (its peak), in bytes, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no {} in /proc/self/status".format(field))


class StepMemory(object):
    """Each training step's tensor bytes: those held as it starts, and how far its own peak rises above them.

    A Keras callback's methods (made into one by `step_memory`). The
    allocator's peak is reset at each step's start and end, so a step's rise
    is its own, and the training's peak is the largest of the steps' and of
    what ran between them. Held bytes are what training keeps from step to
    step (optimizer slots, accumulators); a step's rise is its transient
    tensors (gradients, activations, an update's temporaries), whose overlap
    TF's executor decides as it runs.
    """

    def __init__(self, tf):
        self._tf = tf
        self.held, self.rises = [], []
        self.peak = 0

    def _read(self, reset=True):
        info = self._tf.config.experimental.get_memory_info("CPU:0")
        self.peak = max(self.peak, info["peak"])
        if reset:
            self._tf.config.experimental.reset_memory_stats("CPU:0")
        return info

    def on_train_batch_begin(self, batch, logs=None):
        self.held.append(self._read()["current"])

    def on_train_batch_end(self, batch, logs=None):
        self.rises.append(self._read()["peak"] - self.held[-1])

    def training_peak(self):
        """The peak since `fit` began (read after it returned)."""
        self._read(reset=False)
        return self.peak


def step_memory(keras, tf):
    """A StepMemory that is a callback of `keras`."""
    return type("StepMemoryCallback", (StepMemory, keras.callbacks.Callback), {})(tf)


def memory_child(variant, b, n, samples):
    """The peak memory of training `variant`, net of everything that existed before, in this fresh process.

    The data and the model are made first, in float32; then the peak is
    reset (Linux's clear_refs for RSS) and the current size read, and only
    then is the variant made (wrapped and compiled, or a custom loop's step
    made: "loop: ..." variants, stepped on the same micro-batches), so that
    the figure is what the variant and its training add: gradients,
    optimizer slots, accumulators (gradient-accumulator's model makes its
    own as it is made) and temporaries.
    """
    threads()
    keras = _keras()
    tf = _tf()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, MEMORY_MODEL["inputs"]), dtype=np.float32)
    y = np.zeros(len(x), "int64")
    loop = variant.startswith("loop:")
    if loop:  # (a custom loop's micro-batches, as tensors)
        batches = [(tf.constant(x[i:i + b]), tf.constant(y[i:i + b])) for i in range(0, len(x), b)]
    model = memory_mlp(keras)
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    gc.collect()
    tensors = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true"
    if tensors:
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        before = _rss("VmRSS")
    steps = step_memory(keras, tf) if tensors else None
    if loop:
        step = loop_variants(keras)[variant](model, n)
        for k, batch in enumerate(batches):
            if steps:
                steps.on_train_batch_begin(k)
            step(*batch)
            if steps:
                steps.on_train_batch_end(k)
        trained, optimizer = None, step.optimizer
    else:
        trained = variants(keras)[variant](model, n)
        trained.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0, callbacks=[steps] if steps else None)
        optimizer = trained.optimizer
    peak = steps.training_peak() if tensors else _rss("VmHWM")
    window = getattr(trained, "_accum_window", None) or getattr(optimizer, "_accum_window", None)
    state = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
                for v in (window.all_variables() if window is not None else []))
    measured = {"training_peak": peak - before, "before": before, "param_bytes": params * 4,
                "accumulator_bytes": state}
    if tensors:
        # Bytes kept between steps once the first update made the slots (the
        # last step's start), and each kind of step's largest rise over what
        # it started with: the steps that update (every n-th) and the
        # micro-steps, the first step left out (it makes the variables).
        later = range(1, len(steps.rises))
        measured.update({
            "held": steps.held[-1] - before,
            "update_rise": max(steps.rises[k] for k in later if k % n == n - 1),
            "micro_rise": max([steps.rises[k] for k in later if k % n != n - 1] or [0])})
    print(json.dumps(measured))


# Fresh processes per row for the tensor count. Its peak moves by whole
# kernels (8 or 16 MiB) from one process to the next, with the overlap of
# the update's temporaries (see StepMemory): 3 processes a row left the
# median on either side of a step.
TENSOR_PROCESSES = 9
STEP_PARTS = ("held", "update_rise", "micro_rise")


def memory(args):
    keras = _keras()
    b, n = 16, 8
    accumulating = [name for name in variants(keras) if name not in ("plain", "floor")]
    runs = [("plain", b, 1), ("plain", n * b, 1)] + [(name, b, n) for name in accumulating]
    # Custom loops: the optimizer wrappers against the plain loop (the
    # wrappers' own use; rows over plain compare with their own plain).
    runs += [("loop: plain", b, 1)] + [("loop: " + name, b, n) for name in optimizers(keras)]
    repeats = 3 if args.quick else 5
    results = []
    for variant, batch, steps in runs:
        row = {"variant": variant, "b": batch, "n": steps}
        for key, env in (("training_peak", MEMORY_ENV), ("tensor_peak", TENSOR_ENV)):
            peaks = []
            parts = {}  # tensor counts only: held, update_rise, micro_rise -> per process
            for _ in range(repeats if key == "training_peak" else TENSOR_PROCESSES):
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--memory-child", variant, str(batch), str(steps),
                     str(4 * n * b)],  # the same samples for every row: 4 updates of n*b
                    stdout=subprocess.PIPE, universal_newlines=True, check=True, env=env).stdout
                measured = json.loads(out.strip().splitlines()[-1])
                peaks.append(measured["training_peak"])
                for part in STEP_PARTS:
                    if part in measured:
                        parts.setdefault(part, []).append(measured[part])
            row.update({key: float(np.median(peaks)), key + "_runs": peaks, "param_bytes": measured["param_bytes"],
                        "accumulator_bytes": measured["accumulator_bytes"]})
            for part, values in parts.items():
                row.update({part: float(np.median(values)), part + "_runs": values})
            print("memory", key, variant, batch, steps, ["{:.1f}".format(p / 2 ** 20) for p in peaks],
                  {part: ["{:.1f}".format(v / 2 ** 20) for v in values] for part, values in parts.items()},
                  flush=True)
        results.append(row)
    plain = {row["variant"]: row for row in results if row["variant"] in ("plain", "loop: plain") and row["b"] == b}
    for key, over in (("training_peak", "over_plain_b"), ("tensor_peak", "tensor_over_plain_b"),
                      ("held", "held_over_plain_b")):
        for row in results:
            if key not in row:
                continue
            row[over] = row[key] - plain[_plain_of(row["variant"])][key]
            row[over + "_in_params"] = row[over] / float(row["param_bytes"])
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


# (ours, theirs): gradaccum against each alternative, the same way of training on both sides.
RIVALS = [("gradaccum", "gradient-accumulator"), ("gradaccum", "keras3-option"),
          ("gradaccum-optimizer", "gradient-accumulator-optimizer"), ("gradaccum-optimizer", "keras3-option"),
          ("loop: gradaccum-optimizer", "loop: gradient-accumulator-optimizer"),
          ("loop: gradaccum-optimizer", "loop: keras3-option")]
FLOOR_TARGET = {"mlp": 0.90, "cnn": 0.97}
SPREAD_TARGET = 0.05
MEMORY_TARGET = 1.1
TIE = 0.02  # the resolution the benchmark is built for


def _paired(ours, theirs):
    """ours' speed over theirs: the median over rounds of their step time over ours, in the same round."""
    return float(np.median([t / o for o, t in zip(ours["round_figures_s"], theirs["round_figures_s"])]))


def _verdict(met):
    return "**met**" if met else "**missed**"


def targets(runs):
    """Each target of the benchmark, stated as met or missed with its figures."""
    lines = ["## Targets", ""]
    for run in runs:
        rows = run.get("throughput", [])
        if not rows:
            continue
        label = run["label"]
        find = {(r["model"], r["n"], r["variant"]): r for r in rows}
        worst = max(rows, key=lambda r: r["spread"])
        over = [r for r in rows if r["spread"] > SPREAD_TARGET]
        lines.append("- {}: spread of every variant at most {:.0%}: {} ({} of {} over; the largest {:.1%}, "
                     "{} at {} n={}; median {:.1%}).".format(
                         label, SPREAD_TARGET, _verdict(not over), len(over), len(rows), worst["spread"],
                         worst["variant"], worst["model"], worst["n"],
                         float(np.median([r["spread"] for r in rows]))))
        ratio_spreads = [r["vs_plain_spread"] for r in rows if r["variant"] != "plain"]
        lines.append("- {}: spread of the ratios to plain, round by round (what each comparison rests on): "
                     "largest {:.1%}, median {:.1%}.".format(
                         label, max(ratio_spreads), float(np.median(ratio_spreads))))
        models = [m for m in MODELS if any(r["model"] == m for r in rows)]
        # The n > 1 this run has (all of NS, unless it ran with `--ns`), as the lines name them.
        ns = [n for n in NS if n > 1 and any(r["n"] == n for r in rows)]
        named = "n = " + ", ".join(map(str, ns))
        accumulating = models if ns else []  # (a run of n = 1 alone, `--ns 1`, states no n > 1 target)
        # At n = 1 the optimizer-wrapper variant is compiled with the plain
        # optimizer: the same training as plain, built beside it in turns.
        same = [(m, find[(m, 1, "gradaccum-optimizer")]["vs_plain"]) for m in models
                if (m, 1, "gradaccum-optimizer") in find]
        if same:  # (a run of some n only, `--ns`, may lack n = 1)
            lines.append("- {}: control, two identical trainings (plain, and the wrapper variant at n = 1, which "
                         "is plain Keras): {} (the method's systematic resolution).".format(
                             label, ", ".join("{} {:.3f}".format(m, v) for m, v in same)))
        # At n = 1 both should be plain training: `accumulate(model, 1)` is
        # Keras' own step, and the custom loop's AccumOptimizer(opt, 1) the
        # wrapped optimizer's apply_gradients.
        for ours, theirs in (("gradaccum", "plain"), ("loop: gradaccum-optimizer", "loop: plain")):
            n1 = [(m, _paired(find[(m, 1, ours)], find[(m, 1, theirs)])) for m in models if (m, 1, ours) in find]
            if n1:
                lines.append("- {}: n = 1 indistinguishable from plain (within {:.0%}): {} ({} / {}: {}).".format(
                    label, TIE, _verdict(all(abs(v - 1) <= TIE for _, v in n1)), ours, theirs,
                    ", ".join("{} {:.3f}".format(m, v) for m, v in n1)))
        for model in accumulating:
            target = FLOOR_TARGET[model]
            ratios = [find[(model, n, "gradaccum")]["vs_floor"] for n in ns]
            lines.append("- {}: gradaccum at least {:.2f} of the floor on the {} ({}): {} ({}; plain "
                         "Keras, which applies every step: {:.3f}).".format(
                             label, target, model, named, _verdict(min(ratios) >= target),
                             ", ".join("{:.3f}".format(v) for v in ratios),
                             find[(model, 1, "plain")]["vs_floor"] if (model, 1, "plain") in find else float("nan")))
            if (model, ns[0], "loop: floor") in find:
                # The same target, like for like: a custom loop's step against
                # that loop's gradients alone, without `fit`'s own step (its
                # loss tracking and logs), which the floor above leaves out.
                ratios = [_paired(find[(model, n, "loop: gradaccum-optimizer")], find[(model, n, "loop: floor")])
                          for n in ns]
                lines.append("- {}: loop: gradaccum-optimizer at least {:.2f} of loop: floor on the {} "
                             "({}): {} ({}; loop: plain {:.3f}).".format(
                                 label, target, model, named, _verdict(min(ratios) >= target),
                                 ", ".join("{:.3f}".format(v) for v in ratios),
                                 _paired(find[(model, 1, "loop: plain")], find[(model, 1, "loop: floor")])
                                 if (model, 1, "loop: plain") in find else float("nan")))
        if any(r["variant"] == "loop: bound" for r in rows):
            # What accumulation cannot avoid: the bound makes the gradients, adds
            # them in one fused pass and applies every n-th step, nothing more.
            for model in accumulating:
                lines.append("- {}: the {}'s bound (loop: bound / loop: floor, {}): {}; loop: "
                             "gradaccum-optimizer / loop: bound: {}.".format(
                                 label, model, named, ", ".join("{:.3f}".format(_paired(
                                     find[(model, n, "loop: bound")], find[(model, n, "loop: floor")]))
                                     for n in ns),
                                 ", ".join("{:.3f}".format(_paired(
                                     find[(model, n, "loop: gradaccum-optimizer")], find[(model, n, "loop: bound")]))
                                     for n in ns)))
        for ours, theirs in RIVALS:
            ratios = [(model, n, _paired(find[(model, n, ours)], find[(model, n, theirs)]))
                      for model in models for n in ns if (model, n, theirs) in find]
            if not ratios:
                continue
            low = min(v for _, _, v in ratios)
            verdict = _verdict(low >= 1.0) if low >= 1.0 or low < 1 - TIE else "**tie** (within {:.0%})".format(TIE)
            lines.append("- {}: {} at least as fast as {}: {} (ours / theirs, {}: {}).".format(
                label, ours, theirs, verdict, named,
                "; ".join("{} {}".format(model, ", ".join("{:.3f}".format(v) for m, _, v in ratios if m == model))
                          for model in models)))
    for run in runs:
        memory = run.get("memory", [])
        if memory:
            for row in memory:
                if row["n"] > 1 and _ours(row["variant"]):
                    for what, key in (("peak RSS", "over_plain_b_in_params"),
                                      ("peak tensor bytes", "tensor_over_plain_b_in_params"),
                                      ("tensor bytes held between steps", "held_over_plain_b_in_params")):
                        if key in row:
                            lines.append("- {}: {} adds at most {}x the parameter bytes over {} at b ({}): {} "
                                         "({:.2f}x).".format(run["label"], row["variant"], MEMORY_TARGET,
                                                             _plain_of(row["variant"]), what,
                                                             _verdict(row[key] <= MEMORY_TARGET), row[key]))
            others = ["{} {:.2f}x{}".format(row["variant"], row["over_plain_b_in_params"],
                                            " (tensors {:.2f}x)".format(row["tensor_over_plain_b_in_params"])
                                            if "tensor_peak" in row else "")
                      for row in memory if row["n"] > 1 and not _ours(row["variant"])]
            if others:
                lines.append("- {}: for comparison, the alternatives add {}.".format(run["label"], ", ".join(others)))
    return lines + [""]


def _ours(variant):
    """Whether a variant's name is gradaccum's, through `fit` or in a custom loop ("loop: ...")."""
    return variant.replace("loop: ", "").startswith("gradaccum")


def _plain_of(variant):
    """What a variant's memory is compared with: plain training, the plain loop for a loop's."""
    return "loop: plain" if variant.startswith("loop:") else "plain"


def summary(runs):
    """One table per environment: gradaccum's ratios, and ours over theirs, each within its own rounds."""
    lines = []
    for run in runs:
        rows = run.get("throughput", [])
        if not rows:
            continue
        find = {(r["model"], r["n"], r["variant"]): r for r in rows}
        rivals = [(ours, theirs) for ours, theirs in RIVALS if any(r["variant"] == theirs for r in rows)]
        lines += ["## Summary: {}".format(run["label"]), "",
                  "| model | n | gradaccum / plain | gradaccum / floor | " + " | ".join(
                      "{} / {}".format(ours, theirs) for ours, theirs in rivals) + " |",
                  "|---|---|---|---|" + "---|" * len(rivals)]
        for model in MODELS:
            for n in NS:
                if (model, n, "gradaccum") not in find:
                    continue
                ours = find[(model, n, "gradaccum")]
                cells = ["{:.3f}".format(ours["vs_plain"]), "{:.3f}".format(ours["vs_floor"])]
                cells += ["{:.3f}".format(_paired(find[(model, n, a)], find[(model, n, b)])) if n > 1 else "-"
                          for a, b in rivals]
                lines.append("| {} | {} | {} |".format(model, n, " | ".join(cells)))
        lines.append("")
    return lines


def _memory_table(memory, key, over, accumulators):
    """results.md's table of one memory measure (`key`: training_peak or tensor_peak), with a blank line after."""
    title = {"training_peak": "training peak", "tensor_peak": "tensor peak"}[key]
    lines = ["| variant | b | n | {} (MiB), runs | over plain at b (MiB) | in parameter bytes |{}".format(
                 title, " accumulator variables |" if accumulators else ""),
             "|---|---|---|---|---|---|" + ("---|" if accumulators else "")]
    steps = key == "tensor_peak" and "held" in memory[0]
    if steps:
        lines[0] += (" held between steps, over plain at b | an update step's rise (MiB), runs |"
                     " a micro-step's rise (MiB), runs |")
        lines[1] += "---|---|---|"
    for row in memory:
        state = ""
        if accumulators:
            state = " {} |".format("{:.2f} MiB = {:.3f}x".format(
                row["accumulator_bytes"] / 2 ** 20, row["accumulator_bytes"] / float(row["param_bytes"]))
                if row["accumulator_bytes"] else "-")
        if steps:
            state = " {:.2f}x | {} | {} |".format(row["held_over_plain_b_in_params"], *[
                "{:.1f} ({})".format(row[part] / 2 ** 20, _span(row[part + "_runs"])) if row[part] else "-"
                for part in ("update_rise", "micro_rise")])
        lines.append("| {} | {} | {} | {:.1f} ({}) | {:+.1f} | {:.2f}x |{}".format(
            row["variant"], row["b"], row["n"], row[key] / 2 ** 20,
            ", ".join("{:.1f}".format(p / 2 ** 20) for p in row[key + "_runs"]),
            row[over] / 2 ** 20, row[over + "_in_params"], state))
    return lines + [""]


def _span(values):
    """"40.0-64.0": the least and the most of byte counts, in MiB."""
    return "{:.1f}-{:.1f}".format(min(values) / 2 ** 20, max(values) / 2 ** 20)


_STEPS_TEXT = (
    " Each step measured too (the count's peak reset as a step starts and ends): the bytes held "
    "as the last step starts (optimizer slots, accumulators; over plain's, in parameter bytes), and the "
    "largest rise of a step above what it started with, among the steps that update (every n-th) and the "
    "micro-steps, the first step left out (it makes the variables); medians, and the least and most "
    "of the processes.")


def _per_model(rows, key):
    """"72 cnn, 192 mlp": each model's value of `key` in throughput rows (1 where a run lacks it)."""
    return ", ".join("{} {}".format(value, model) for model, value in sorted(set(
        (row["model"], row.get(key, 1)) for row in rows)))


def merge(out):
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "benchmark-*.json"))):
        with open(path) as handle:
            runs.append(json.load(handle))
    lines = ["# Benchmark results", ""]
    for run in runs:
        env = run["environment"]
        lines += ["## {} ({})".format(run["label"], "quick" if run["quick"] else "full"), "",
                  "{date}; Python {python}, TensorFlow {tensorflow}, {keras}; {machine}; GPU: {gpus}.{why}".format(
                      gpus=", ".join(env["gpu"]) or "none", **dict(env, why=" " + env["why"] if "why" in env else "")),
                  ""]
        if run.get("throughput"):
            first = run["throughput"][0]
            lines += ["Throughput, samples/s at micro-batch b={}: every variant of a model and n takes one "
                      "micro-step in turn, in a new random order each step, {} x ({}) steps after a trace, a "
                      "warm-up and as many steps again to settle. A variant's windows of n steps (each holds "
                      "one update) are dealt to the {} rounds in turn, so each round spans the whole run, and "
                      "to its model instances ({}{}) in turn within each round (identical instances differ in "
                      "speed by up to 5% for as long as they live){}; a "
                      "round's figure is its time per micro-batch, the mean of its middle 60% of windows; "
                      "samples/s is from the median round, "
                      "spread = (slowest - fastest) / fastest round. Ratios (speed over plain training, and "
                      "over the floor: gradients only, never applied) are taken within each round; the median "
                      "round's, with their spread. `loop:` rows are custom training loops (a tf.function step per "
                      "micro-batch); `loop: floor` is that loop's gradients alone, `loop: bound` a lean exact "
                      "accumulation there (the gradients, one fused add, the update every n-th step on the sums "
                      "times 1 / n).".format(first["b"], first["rounds"], _per_model(run["throughput"], "steps_per_round"),
                          first["rounds"], _per_model(run["throughput"], "instances"),
                          # (runs before 5cc46b8's lesson built each variant's instances after the last's)
                          ", built in turns: one of every variant a turn" if first.get("built") == "in turns"
                          else ", each variant's built after the last's",
                          # (runs before the traces: one trace an instance)
                          ", and an instance's steps to its traces in turn ({} traced functions an instance, each "
                          "with an offset of its own too)".format(_per_model(run["throughput"], "traces"))
                          if any(row.get("traces", 1) > 1 for row in run["throughput"]) else ""), "",
                      "| model | n | variant | samples/s | spread | vs plain (spread) | vs floor (spread) |",
                      "|---|---|---|---|---|---|---|"]
            for row in run["throughput"]:
                lines.append("| {model} | {n} | {variant} | {samples_per_s:.0f} | {spread:.1%} | {vs_plain:.3f} "
                             "({vs_plain_spread:.1%}) | {vs_floor:.3f} ({vs_floor_spread:.1%}) |".format(**row))
            lines.append("")
            spliced = run.get("throughput_spliced")  # (another run's rows of some models, spliced into this one)
            if spliced:
                lines += ["The {} rows are another run's: {}".format(", ".join(spliced["models"]).upper(),
                                                                    spliced["why"]), ""]
        if run.get("memory"):
            if run.get("memory_environment"):  # (another run's memory figures, spliced into this one)
                lines += ["Memory measured in a run of its own ({date}, TensorFlow "
                          "{tensorflow}): {why}".format(**dict(
                              {"why": "on the code after the throughput run."}, **run["memory_environment"])), ""]
            lines += ["Training's own peak memory: peak RSS during `fit` less the RSS before the variant was made "
                      "(the data and the model exist; the variant is wrapped and compiled after), the median of "
                      "{} fresh processes per row; an MLP of {:.1f} MiB of float32 parameters whose activations "
                      "are small. A custom loop's rows (`loop:`) are compared with the plain loop's.".format(
                          len(run["memory"][0]["training_peak_runs"]), run["memory"][0]["param_bytes"] / 2 ** 20), "",
                      ] + _memory_table(run["memory"], "training_peak", "over_plain_b", accumulators=True)
            if "tensor_peak" in run["memory"][0]:
                lines += ["The same, counted by TensorFlow: the peak of the bytes its tensors hold during `fit` "
                          "less those held before the variant was made (its BFC allocator's count on the CPU, "
                          "TF_CPU_ALLOCATOR_USE_BFC=true; no malloc, no graphs), the median of {} fresh "
                          "processes.{}".format(len(run["memory"][0]["tensor_peak_runs"]), _STEPS_TEXT
                                               if "held" in run["memory"][0] else ""), ""
                          ] + _memory_table(run["memory"], "tensor_peak", "tensor_over_plain_b", accumulators=False)
        if run.get("convergence"):
            conv = run["convergence"]
            lines += ["Convergence: max |w_acc - w_big| = {:.3g} ({:.3g} of the weight change); plot: {}.{}".format(
                conv["max_weight_diff"], conv["of_change"], conv["png"],
                # (another run's convergence, spliced into this one)
                " From another run ({date}): {why}".format(**run["convergence_environment"])
                if "convergence_environment" in run else ""), ""]
    lines += summary(runs) + targets(runs)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "benchmark"))
    parser.add_argument("--label", default="run")
    parser.add_argument("--models", default=",".join(MODELS), help="throughput of these models only")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--ns", default=",".join(map(str, NS)),
                        help="throughput at these n only (n = 1 is the control: plain against the same "
                             "computation through the wrapper)")
    parser.add_argument("--parts", default="throughput,memory,convergence")
    parser.add_argument("--merge", metavar="DIR", help="write DIR/results.md from DIR/benchmark-*.json")
    parser.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "B", "N", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, b, n, samples = args.memory_child
        return memory_child(variant, int(b), int(n), int(samples))
    if args.merge:
        return merge(args.merge)
    parts = set(args.parts.split(","))
    unknown = parts - {"throughput", "memory", "convergence"}
    if unknown:
        parser.error("--parts: unknown {}; allowed: throughput, memory, convergence".format(sorted(unknown)))
    if not set(args.models.split(",")) <= set(MODELS):
        parser.error("--models: received {!r}; allowed: a comma-separated list of {}".format(
            args.models, ", ".join(MODELS)))
    if not all(n.isdigit() and int(n) > 0 for n in args.ns.split(",")):
        parser.error("--ns: received {!r}; allowed: a comma-separated list of positive integers".format(args.ns))
    os.makedirs(args.out, exist_ok=True)
    threads()
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
