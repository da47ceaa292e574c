"""One worker process of test_multiworker.py (not a test module).

    python multiworker_worker.py WORKDIR

TF_CONFIG (set by the test) names this worker and its peer on 127.0.0.1.
Reads WORKDIR/job.json and WORKDIR/initial.npz, trains accumulate(model, n)
(or, with "loop" in the job, a custom loop through AccumOptimizer) under
MultiWorkerMirroredStrategy, and writes WORKDIR/worker<index>.npz with
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
from gradaccum import AccumOptimizer, accumulate  # noqa: E402


def main(workdir):
    with open(os.path.join(workdir, "job.json")) as handle:
        job = json.load(handle)
    initial = list(np.load(os.path.join(workdir, "initial.npz")).values())
    x, y = helpers.data()
    if job.get("loop"):
        weights, steps = custom_loop(job, initial, x, y)
    else:
        with STRATEGY.scope():
            model = helpers.fresh(helpers.functional_mlp, initial)
            if job["n"] is not None:  # None: plain training, to see what TensorFlow does alone
                model = accumulate(model, job["n"])
            model.compile(helpers.OPTIMIZERS[job["optimizer"]](), "mse",
                          **({"jit_compile": True} if job["jit_compile"] else {}))
        model.fit(x, y, batch_size=job["global_batch_size"], epochs=job["epochs"], shuffle=False, verbose=0)
        weights, steps = helpers.weights_of(model), helpers.steps_of(model)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join(workdir, "worker{}.npz".format(index)),
             steps=np.array(steps), **{"w{}".format(i): w for i, w in enumerate(weights)})


def custom_loop(job, initial, x, y):
    """A tf.GradientTape loop through AccumOptimizer, as TensorFlow's custom-loop guide writes it."""
    global_batch = job["global_batch_size"]
    with STRATEGY.scope():
        model = helpers.fresh(helpers.functional_mlp, initial)
        optimizer = AccumOptimizer(helpers.OPTIMIZERS[job["optimizer"]](), job["n"])
    dataset = STRATEGY.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch))
    variables = model.trainable_variables

    def replica_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            per_sample = tf.reduce_mean(tf.square(model(x_batch, training=True) - y_batch), axis=1)
            loss = (tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
                    + tf.nn.scale_regularization_loss(tf.add_n(model.losses)))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables), batch_size=global_batch)

    step = tf.function(lambda inputs: STRATEGY.run(replica_step, args=inputs))
    for _ in range(job["epochs"]):
        for inputs in dataset:
            step(inputs)
        optimizer.flush()  # applied in the strategy's replicas
    return helpers.weights_of(model), int(optimizer.iterations.numpy())


if __name__ == "__main__":
    main(sys.argv[1])
    # The strategy's collective threads are still alive, and interpreter
    # teardown can then abort ("terminate called without an active
    # exception", seen with TF 2.7). The results are on disk: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
