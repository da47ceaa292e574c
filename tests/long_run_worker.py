"""One side of test_long_runs' model loop, in a fresh process: prints its figures as JSON.

    python long_run_worker.py plain|accumulated WARMUP MODELS

Builds, (wraps,) compiles and fits WARMUP and then MODELS small models one
after another, clearing Keras' session after each, as a hyperparameter
search does, and reports how much the resident set grew over the warm-up
(after its first 3 models) and over the MODELS after it, and how many
gradaccum objects outlived their model.
"""

import json
import sys
import weakref

import helpers
from helpers import keras
from gradaccum import accumulate


def main(kind, warmup, models):
    x, y = helpers.data(64)
    alive = []

    def one():
        model = helpers.functional_mlp()
        if kind == "accumulated":
            model = accumulate(model, 4)
        model.compile(keras.optimizers.Adam(0.01), "mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
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
    print(json.dumps({"warmup_growth_mb": before - start, "growth_mb": growth, "kept": len(kept),
                      "objects": len(alive), "kept_types": sorted(set(type(obj).__name__ for obj in kept))}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
