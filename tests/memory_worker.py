"""test_memory's measurements, in a fresh process whose CPU tensors TF's BFC allocator counts.

    TF_CPU_ALLOCATOR_USE_BFC=true python memory_worker.py

Fills a window of three 4 MiB kernels and a bias with two micro-batches and
applies it, with an `apply_fn` that adds the mean to the variables as
gradient descent would, and checks it. Eagerly, it reads how many bytes TF's
tensors hold, while it holds the mean, beyond those held just before the
update; in a `tf.function`, the peak of the update over what was held before
it. Prints them as JSON with the variables' bytes.
"""

import json

import numpy as np
import tensorflow as tf

from gradaccum._window import Window


def memory(key):
    return tf.config.experimental.get_memory_info("CPU:0")[key]


def measure(eager):
    variables = [tf.Variable(tf.zeros([1024, 1024]), name="kernel_{}".format(i)) for i in range(3)]
    variables.append(tf.Variable(tf.zeros([1024]), name="bias"))
    window = Window(4)
    window.build(variables)
    for step, size in enumerate((8, 24)):  # mean: (8 * 1 + 24 * 3) / 32 = 2.5
        window.add([(tf.fill(var.shape, float(2 * step + 1)), var) for var in variables], size)
    seen = {}

    def apply_fn(pairs):
        if eager:
            seen["held"] = memory("current") - seen["before"]
        return tf.group(*[var.assign_add(grad, read_value=False) for grad, var in pairs])

    apply = (lambda: window.apply(apply_fn)) if eager else tf.function(lambda: window.apply(apply_fn))
    if not eager:
        apply.get_concrete_function()  # traced before the count starts
    seen["before"] = memory("current")
    tf.config.experimental.reset_memory_stats("CPU:0")
    apply()
    if not eager:
        seen["held"] = memory("peak") - seen["before"]
    right = all(np.array_equal(var.numpy(), np.full(var.shape, 2.5, "float32")) for var in variables)
    sizes = [int(np.prod(var.shape)) * 4 for var in variables]
    return {"held": seen["held"], "mean_right": right, "param_bytes": sum(sizes), "largest_bytes": max(sizes)}


if __name__ == "__main__":
    print(json.dumps({"eager": measure(eager=True), "function": measure(eager=False)}))
