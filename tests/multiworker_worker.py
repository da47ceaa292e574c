"""One worker process of test_multiworker.py (not a test module).

    python multiworker_worker.py WORKDIR

TF_CONFIG (set by the test) names this worker and its peer on 127.0.0.1.
Reads WORKDIR/job.json and WORKDIR/initial.npz, trains accumulate(model, n)
under MultiWorkerMirroredStrategy, and writes WORKDIR/worker<index>.npz with
the trained weights and the optimizer's step count.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

# The strategy must exist before TensorFlow runs anything else.
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

import helpers  # noqa: E402 - after the strategy, as TensorFlow requires
from gradaccum import accumulate  # noqa: E402


def main(workdir):
    with open(os.path.join(workdir, "job.json")) as handle:
        job = json.load(handle)
    initial = list(np.load(os.path.join(workdir, "initial.npz")).values())
    x, y = helpers.data()
    with STRATEGY.scope():
        model = helpers.fresh(helpers.functional_mlp, initial)
        if job["n"] is not None:  # None: plain training, to see what TensorFlow does alone
            model = accumulate(model, job["n"])
        model.compile(helpers.OPTIMIZERS[job["optimizer"]](), "mse", **({"jit_compile": True} if job["jit_compile"] else {}))
    model.fit(x, y, batch_size=job["global_batch_size"], epochs=job["epochs"], shuffle=False, verbose=0)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    weights = helpers.weights_of(model)
    np.savez(os.path.join(workdir, "worker{}.npz".format(index)),
             steps=np.array(helpers.steps_of(model)), **{"w{}".format(i): w for i, w in enumerate(weights)})


if __name__ == "__main__":
    main(sys.argv[1])
    # The strategy's collective threads are still alive, and interpreter
    # teardown can then abort ("terminate called without an active
    # exception", seen with TF 2.7). The results are on disk: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
