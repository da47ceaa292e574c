"""tf.distribute.MirroredStrategy: accumulate(model, n) versus the big batch under the same strategy.

Two replicas on the two logical CPUs that conftest makes. The per-replica
gradients are added to per-replica (sync-on-read) accumulators, and the
replicas all-reduce once per window, inside the update; the counting
cross-device ops below count the all-reduces that actually run.
"""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from gradaccum import accumulate

helpers.require_mode(eager=True)
pytestmark = pytest.mark.heavy

N = 4
GLOBAL_B = 16  # 8 samples per replica; 96 samples: windows of 4 and 2 micro-batches per epoch
DEVICES = ["/cpu:0", "/cpu:1"]

OPTIMIZERS = {name: helpers.OPTIMIZERS[name] for name in ("momentum", "adam")}


class CountingReduction(tf.distribute.ReductionToOneDevice):
    """MirroredStrategy's CPU all-reduce, counting the gradient all-reduces that run.

    Optimizers all-reduce the gradients as one batch (`batch_reduce`); that is
    what is counted. (Single-value reductions are not: some Keras versions
    reduce the step's logs with them every step, plain training alike.) The
    count is a variable assigned in the graph next to the reduction, so it
    counts reductions that run, not ones traced: one inside the update branch
    of an accumulating step runs only on the steps that update.
    """

    def __init__(self):
        super(CountingReduction, self).__init__()
        self.runs = tf.Variable(0, dtype=tf.int64, trainable=False)

    def batch_reduce_implementation(self, *args, **kwargs):
        if not tf.executing_eagerly():  # in the training function
            self.runs.assign_add(1)
        return super(CountingReduction, self).batch_reduce_implementation(*args, **kwargs)


def train(initial, n, batch_size, make_optimizer, jit_compile, unknown_length=False, samples=96,
          model_factory=helpers.functional_mlp, arrays=None, **options):
    """(weights, optimizer steps, all-reduces run) of 2 epochs under a fresh MirroredStrategy.

    `arrays`: (x, y) to train on instead of `samples` of helpers.data;
    `options`: accumulate's.
    """
    reduction = CountingReduction()
    strategy = tf.distribute.MirroredStrategy(DEVICES, cross_device_ops=reduction)
    with strategy.scope():
        model = helpers.fresh(model_factory, initial)
        if n is not None:
            model = accumulate(model, n, **options)
        model.compile(make_optimizer(), "mse", **({"jit_compile": True} if jit_compile else {}))
    x, y = arrays if arrays is not None else helpers.data(samples)
    if unknown_length:
        # A pipeline whose length fit cannot know: the last, partial window
        # of each epoch is applied after the epoch, outside the training step.
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).filter(lambda *_: True)
        model.fit(data, epochs=2, verbose=0)
    else:
        model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    return helpers.weights_of(model), helpers.steps_of(model), int(reduction.runs.numpy())


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("optimizer", helpers.core_params(sorted(OPTIMIZERS), ["adam"]))
def test_mirrored_matches_the_big_batch_and_all_reduces_once_per_update(optimizer, jit_compile):
    make_optimizer = OPTIMIZERS[optimizer]
    initial = helpers.weights_of(helpers.functional_mlp())
    if jit_compile:
        if not helpers.HAS_JIT_COMPILE:
            pytest.skip("this Keras has no compile(jit_compile=...)")
        try:
            train(initial, None, GLOBAL_B, make_optimizer, jit_compile)
        except Exception as err:  # what TF raises here varies; the message says why
            lines = [line for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if "device" in line), lines[0] if lines else "")
            pytest.skip("plain Keras training itself fails with jit_compile=True under "
                        "MirroredStrategy on this machine's logical CPUs: {}".format(reason.strip()[:300]))
    accumulated, big, small = helpers.differential(
        "mirrored/{}/{}".format(optimizer, "jit" if jit_compile else "eager"), initial,
        lambda n, batch_size: train(initial, n, batch_size, make_optimizer, jit_compile), N, GLOBAL_B)
    assert big[1] == 4, "big-batch steps: {}".format(big[1])

    # Communication: plain training at the same micro-batch all-reduces its
    # gradients every step; accumulation only in the steps that update.
    per_step, remainder = divmod(small[2], small[1])
    assert per_step >= 1 and remainder == 0, "plain training: {} all-reduces in {} steps".format(small[2], small[1])
    micro_steps = small[1]  # the same micro-batches
    assert accumulated[2] == per_step * accumulated[1], (
        "accumulated: {} all-reduces for {} updates of {} micro-steps; plain training does {} "
        "per step".format(accumulated[2], accumulated[1], micro_steps, per_step))
    helpers.record("mirrored/{}/all-reduces accumulated vs plain".format(optimizer),
                   accumulated[2] / float(small[2]))


def test_a_partial_window_after_an_epoch_of_unknown_length_is_applied_on_every_replica():
    make_optimizer = OPTIMIZERS["momentum"]
    initial = helpers.weights_of(helpers.functional_mlp())
    accumulated = train(initial, N, GLOBAL_B, make_optimizer, False, unknown_length=True)
    big = train(initial, None, N * GLOBAL_B, make_optimizer, False)
    assert accumulated[1] == big[1] == 4
    helpers.record("mirrored/unknown-length epochs", helpers.assert_same_training(initial, accumulated[0], big[0]))


def test_a_replica_with_no_samples_adds_nothing_and_nothing_becomes_nan():
    # 129 samples: each epoch ends with a window of one global micro-batch of
    # 1 sample, so the second replica's window holds no sample, and its mean
    # is 0/0 (gradaccum once turned every weight nan here). The big batch's
    # last batch also gives that replica nothing; plain Keras trains on.
    # Without regularizers: a replica with no sample in a whole window adds
    # no regularization gradient either, where Keras' big batch adds that
    # replica's share (README, "tf.distribute").
    def unregularized():
        return helpers.functional_mlp(l2=0)

    make_optimizer = OPTIMIZERS["adam"]
    initial = helpers.weights_of(unregularized())
    accumulated, big, _ = helpers.differential(
        "mirrored/zero-sample replica", initial,
        lambda n, batch_size: train(initial, n, batch_size, make_optimizer, False, samples=129,
                                    model_factory=unregularized), N, GLOBAL_B)
    assert all(np.all(np.isfinite(w)) for w in accumulated[0]), "non-finite weights"
    assert big[1] == 6


def test_skip_nonfinite_skips_a_window_non_finite_on_one_replica_only_on_both():
    # Sample 40 is in micro-batch 2 (samples 32-47), in the second replica's
    # half: only that replica's sums are non-finite, and both must skip
    # (apart, they would deadlock or drift). Windows: samples 0-63 and 64-95.
    x, y = helpers.data(96)
    y = y.copy()
    y[40, 0] = np.inf
    make_optimizer = OPTIMIZERS["adam"]
    initial = helpers.weights_of(helpers.functional_mlp())
    accumulated = train(initial, N, GLOBAL_B, make_optimizer, False, arrays=(x, y), skip_nonfinite=True)
    big = train(initial, None, N * GLOBAL_B, make_optimizer, False, arrays=(x[64:], y[64:]))
    assert accumulated[1] == big[1] == 2
    helpers.record("mirrored/skip_nonfinite", helpers.assert_same_training(initial, accumulated[0], big[0]))
