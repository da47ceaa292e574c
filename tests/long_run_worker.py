"""One side of a test_long_runs test, in a fresh process: prints its figures as JSON.

    python long_run_worker.py fit plain|accumulated EPOCHS
    python long_run_worker.py loop plain|accumulated WARMUP MODELS

`fit`: one fit of EPOCHS epochs of a small model (88 samples, batches of 8:
a short last window every epoch), reporting how much the resident set grew
from the 5th epoch to the last (Keras' own warm-up is done by the 5th), how
many times the accumulating step was traced by each epoch's end, and the
optimizer's update count.

`loop`: builds, (wraps,) compiles and fits WARMUP and then MODELS small
models one after another, clearing Keras' session after each, as a
hyperparameter search does, and reports how much the resident set grew over
the warm-up (after its first 3 models) and over the MODELS after it, and how
many gradaccum objects outlived their model.

A fresh process, because the suite's own process has every earlier test's
objects: there a garbage collection (before each RSS reading) took about a
second on Keras 3, 60 of them in the fit, against 0.17 s here.
"""

import json
import sys
import weakref

import helpers
from helpers import keras
from gradaccum import accumulate

N, B = 4, 8


def compiled(kind):
    model = helpers.functional_mlp()
    if kind == "accumulated":
        model = accumulate(model, N)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def fit(kind, epochs):
    x, y = helpers.data(88)  # a short last window every epoch
    model = compiled(kind)
    traces, rss, traced = [], [], []
    if kind == "accumulated":
        window = model._accum_window
        add = window.accumulate
        window.accumulate = lambda *args, **kwargs: traces.append(1) or add(*args, **kwargs)

    def on_epoch_end(epoch, logs):
        rss.append(helpers.rss_mb())
        traced.append(len(traces))

    model.fit(x, y, batch_size=B, epochs=epochs, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)])
    return {"growth_mb": rss[-1] - rss[4], "traced": traced, "steps": helpers.steps_of(model)}


def loop(kind, warmup, models):
    x, y = helpers.data(64)
    alive = []

    def one():
        model = compiled(kind)
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)
        if kind == "accumulated":
            alive.extend([weakref.ref(model), weakref.ref(model._accum_window.state),
                          weakref.ref(model.optimizer)])
        del model
        keras.backend.clear_session()

    for _ in range(3):
        one()
    start = helpers.rss_mb()
    for _ in range(warmup - 3):
        one()
    before = helpers.rss_mb()
    for _ in range(models):
        one()
    growth = helpers.rss_mb() - before
    kept = [ref() for ref in alive if ref() is not None]
    return {"warmup_growth_mb": before - start, "growth_mb": growth, "kept": len(kept),
            "objects": len(alive), "kept_types": sorted(set(type(obj).__name__ for obj in kept))}


MODES = {"fit": fit, "loop": loop}


def main(argv):
    if len(argv) < 2 or argv[0] not in MODES or argv[1] not in ("plain", "accumulated"):
        raise SystemExit("usage: long_run_worker.py fit|loop plain|accumulated COUNTS... Received: {}".format(argv))
    print(json.dumps(MODES[argv[0]](argv[1], *map(int, argv[2:]))))


if __name__ == "__main__":
    main(sys.argv[1:])
