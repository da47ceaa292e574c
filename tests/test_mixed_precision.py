"""Mixed precision: accumulate(model, n) under mixed_float16 versus the big batch under it.

Keras wraps the optimizer in a LossScaleOptimizer when it compiles under the
mixed_float16 policy. The window must scale each micro-batch's loss, add
unscaled float32 gradients, and let the LossScaleOptimizer check finiteness
once per window: a window with an overflow is skipped whole, and the scale
halves once, as the big batch's step is skipped and its scale halved.
"""

import numpy as np
import pytest

import helpers
from helpers import keras
from gradaccum import accumulate

helpers.require_mode(eager=True)

N, B = 4, 8
# float16 keeps 11 significant bits (a relative step of 2**-11, about 4.9e-4).
# Each micro-batch's weight gradients are rounded to float16 on their own,
# where the big batch rounds the sum of all its samples once, so the two
# differ by float16 roundings, not float32 ones: measured up to 5e-4 of the
# weight change eagerly and 1.2e-3 under XLA, which fuses differently. The
# tolerance is about ten float16 steps; a skipped or misscaled update would be
# off by far more (see the discrimination checks).
MIXED_TOL = 5e-3
# The first micro-batch of the second window (samples 32..39 of 96) overflows
# float16: 1e5 is beyond its largest finite value (65504).
OVERFLOW_SAMPLE = 34

# A LossScaleOptimizer's default initial (dynamic) loss scale, Keras 2 and 3.
INITIAL_SCALE = 2.0 ** 15

OPTIMIZERS = {name: helpers.OPTIMIZERS[name] for name in ("momentum", "adam")}


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def loss_scale(optimizer):
    scale = getattr(optimizer, "dynamic_scale", None)  # Keras 3
    if scale is None:
        scale = optimizer.loss_scale  # Keras 2
    return float(np.array(scale))


def train(model, x, y, batch_size, make_optimizer, jit_compile, epochs=2):
    kwargs = {"jit_compile": True} if jit_compile else {}
    model.compile(make_optimizer(), "mse", **kwargs)
    assert "LossScaleOptimizer" in type(model.optimizer).__name__, type(model.optimizer)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return helpers.weights_of(model), helpers.steps_of(model), loss_scale(model.optimizer)


def compare(x, y, make_optimizer, jit_compile, name, model_factory=helpers.functional_mlp):
    initial = helpers.weights_of(model_factory())

    def run(n, batch_size):
        model = helpers.fresh(model_factory, initial)
        return train(accumulate(model, n) if n is not None else model, x, y, batch_size, make_optimizer,
                     jit_compile)

    accumulated, big, small = helpers.differential(name, initial, run, N, B, rel_tol=MIXED_TOL)
    assert accumulated[2] == big[2], "loss scale: accumulated {} vs big batch {}".format(accumulated[2], big[2])
    return initial, accumulated, big, small


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("optimizer", helpers.core_params(sorted(OPTIMIZERS), ["adam"]))
def test_mixed_float16_matches_the_big_batch(mixed_float16, optimizer, jit_compile):
    if jit_compile and not helpers.HAS_JIT_COMPILE:
        pytest.skip("this Keras has no compile(jit_compile=...)")
    x, y = helpers.data()
    compare(x, y, OPTIMIZERS[optimizer], jit_compile, "mixed/{}/{}".format(optimizer, "jit" if jit_compile else "eager"))


def test_sparse_embedding_gradients_are_unscaled_and_match_the_big_batch(mixed_float16):
    # An embedding's gradient is an IndexedSlices, which has no `*`: the
    # unscaling must keep it sparse. (Distinct rows: Keras 3 treats repeated
    # sparse rows differently, see test_keras_exact. Momentum: Adam's first
    # step on a row is about lr * sign(g), so float16 rounding of a near-zero
    # component moves it by a whole step; measured 3.5e-3 to 5.6e-3 here,
    # against momentum's 5e-5 to 3.7e-4.)
    _, y = helpers.data()
    x = helpers.tokens(len(y), repeated=False)
    compare(x, y, OPTIMIZERS["momentum"], False, "mixed-sparse/momentum",
            model_factory=lambda: helpers.embedding_model(vocabulary=len(y) * 4))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_a_window_with_an_overflow_is_skipped_whole_as_the_big_batch_step(mixed_float16, optimizer):
    x, y = helpers.data()
    x[OVERFLOW_SAMPLE] = 1e5
    initial, accumulated, big, small = compare(x, y, OPTIMIZERS[optimizer], False, "mixed-overflow/" + optimizer)
    # One overflowing window per epoch: the scale halved once per epoch. Had
    # the window applied the micro-batches that did not overflow, or halved
    # the scale per micro-batch, this would differ (plain small-batch training
    # halves it for its one bad batch, but applies the others).
    assert accumulated[2] == INITIAL_SCALE / 4


def test_the_overflowing_window_leaves_the_weights_untouched(mixed_float16):
    x, y = helpers.data(n_samples=N * B)  # one window
    x[OVERFLOW_SAMPLE % (N * B)] = 1e5
    initial = helpers.weights_of(helpers.functional_mlp())
    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), N)
    weights, _, scale = train(model, x, y, B, OPTIMIZERS["momentum"], False, epochs=1)
    for before, after in zip(initial, weights):
        np.testing.assert_array_equal(before, after)
    assert scale == INITIAL_SCALE / 2
