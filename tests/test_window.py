"""`Window` on its own: the accumulation arithmetic in small closed-form cases.

No Keras models: plain variables, and an `apply_fn` that records the
(gradient, variable) pairs it is handed. Every expected number is computed
independently with numpy, as optax's `_accumulation_test.py` tests
`MultiSteps`; these pin down what a differential test can only report as
"off by 1e-2".
"""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from gradaccum._compat import variable_key
from gradaccum import _window
from gradaccum._window import SUM, Window

helpers.require_mode(eager=True)

pytestmark = [pytest.mark.core, pytest.mark.python]


class Recorder(object):
    """An apply_fn that keeps, per call, {variable name: numpy gradient or (indices, values, shape)}."""

    def __init__(self):
        self.calls = []

    def __call__(self, pairs):
        call = {}
        for grad, var in pairs:
            if isinstance(grad, tf.IndexedSlices):
                call[var.name] = ("sparse", grad.indices.numpy(), grad.values.numpy(),
                                  tf.convert_to_tensor(grad.dense_shape).numpy())
            else:
                call[var.name] = tf.convert_to_tensor(grad).numpy()
        self.calls.append(call)


def variable(name, shape, dtype=tf.float32):
    return tf.Variable(tf.zeros(shape, dtype), name=name)


def gradients(shape, count, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.normal(size=shape).astype("float32") for _ in range(count)]


def weighted_mean(grads, sizes):
    """sum_k b_k g_k / sum_k b_k, in float64."""
    total = sum(np.float64(b) * g.astype("float64") for g, b in zip(grads, sizes))
    return total / float(sum(sizes))


def test_weighted_mean_over_micro_batches_of_8_8_3_6_is_applied_once_on_the_4th_call():
    v = variable("v", (2, 3))
    sizes = [8, 8, 3, 6]
    grads = gradients((2, 3), 4)
    window, recorder = Window(4), Recorder()
    applied = [bool(window.accumulate([(tf.constant(g), v)], b, recorder).numpy())
               for g, b in zip(grads, sizes)]
    assert applied == [False, False, False, True]
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads, sizes), rtol=1e-6, atol=1e-7)
    # 25 samples, not 4 micro-batches and not 32 (4 * 8): the mean of the big batch.
    assert not np.allclose(recorder.calls[0]["v:0"], np.mean(grads, axis=0), rtol=1e-3)
    assert int(window.count.numpy()) == 0 and float(window.weight.numpy()) == 0.0
    # The next window starts from nothing (its first micro-batch writes the
    # sums, which an empty window leaves as they are).
    for g, b in zip(grads[:2], [1, 3]):
        window.accumulate([(tf.constant(g), v)], b, recorder)
    for g, b in zip(grads[2:], [1, 1]):
        window.accumulate([(tf.constant(g), v)], b, recorder)
    assert len(recorder.calls) == 2
    np.testing.assert_allclose(recorder.calls[1]["v:0"], weighted_mean(grads, [1, 3, 1, 1]), rtol=1e-6, atol=1e-7)


def test_prescaled_gradients_weighted_by_the_loss_factor_give_the_same_weighted_mean(monkeypatch):
    # The model route multiplies each micro-batch's loss by loss_factor(b)
    # and hands its gradients over prescaled; the window adds them as they
    # come. Here the "loss" is linear: its gradient times the factor.
    monkeypatch.setattr(_window, "IN_PLACE_ELEMENTS", 4)
    v, small = variable("v", (2, 3)), variable("small", (3,))
    assert Window(4).prescales([small, v]) and not Window(4).prescales([small])
    assert not Window(4, reduction=SUM).prescales([v])
    window, recorder = Window(4), Recorder()
    grads = gradients((2, 3), 8)
    factors, applied = [], []
    for g, b in zip(grads, [8, 8, 3, 6, 8, 8, 8, 8]):
        factor = float(window.loss_factor(b).numpy())
        factors.append(factor)
        applied.append(bool(window.accumulate(
            [(tf.constant(g * np.float32(factor)), v)], b, recorder, prescaled=True).numpy()))
    # b_k / planned, planned = 4 * 8 by the window's first micro-batch: 1/4 for
    # a full one (exact), 3/32 and 6/32 for the short ones.
    assert factors == [0.25, 0.25, np.float32(3) / np.float32(32), np.float32(6) / np.float32(32)] + [0.25] * 4
    assert applied == [False, False, False, True] * 2
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads[:4], [8, 8, 3, 6]),
                               rtol=1e-6, atol=1e-7)
    # A full window of equal micro-batches: its prescaled sum is its mean.
    np.testing.assert_allclose(recorder.calls[1]["v:0"], np.mean(grads[4:], axis=0), rtol=1e-6, atol=1e-7)
    assert not np.allclose(recorder.calls[0]["v:0"], np.mean(grads[:4], axis=0), rtol=1e-3)
    # A first micro-batch of no samples (a replica that got none) weighs 0.
    assert float(Window(4).loss_factor(0).numpy()) == 0.0


@pytest.mark.parametrize("in_place", [True, False])
def test_a_window_that_weighs_what_it_planned_hands_its_sums_over_and_others_are_scaled(monkeypatch, in_place):
    # The sums are divided by n times the first micro-batch's size. Windows
    # that weigh that hold their mean; the others are scaled by planned /
    # weight: a short one, one whose first micro-batch had no samples (it
    # plans 1, undivided sums), one whose n grew mid-window, and a sparse one.
    monkeypatch.setattr(_window, "IN_PLACE_ELEMENTS", 1 if in_place else 1000)
    v, embedding = variable("v", (2, 3)), variable("embedding", (5, 2))
    grads, rows = gradients((2, 3), 4), gradients((1, 2), 4, seed=3)
    window, recorder = Window(3), Recorder()

    def step(k, size):
        sparse = tf.IndexedSlices(tf.constant(rows[k]), tf.constant([k], tf.int64), tf.constant([5, 2], tf.int64))
        return bool(window.accumulate([(tf.constant(grads[k]), v), (sparse, embedding)], size, recorder).numpy())

    cases = [([4, 4, 4], None), ([4, 2], "flush"), ([0, 4, 2], None), ([4, 4], 4)]
    for sizes, then in cases:
        applied = [step(k, size) for k, size in enumerate(sizes)]
        if then == "flush":
            assert bool(window.flush(recorder).numpy())
        elif then is not None:  # n grows mid-window, and two more micro-batches complete it
            window.n_variable.assign(then)
            applied += [step(2, 1), step(3, 2)]
            sizes = sizes + [1, 2]
        assert applied == [False] * (len(applied) - 1) + [then != "flush"]
        mean = recorder.calls[-1]
        np.testing.assert_allclose(mean["v:0"], weighted_mean(grads, sizes), rtol=1e-6, atol=1e-7)
        _, indices, values, _ = mean["embedding:0"]
        np.testing.assert_array_equal(indices, [k for k, size in enumerate(sizes)])
        np.testing.assert_allclose(values, np.concatenate(rows[:len(sizes)]) * np.array(sizes)[:, None] / sum(sizes),
                                   rtol=1e-6, atol=1e-7)
        assert float(window.planned.numpy()) == 1.0  # (an empty window plans nothing yet)
        window.n_variable.assign(3)
    assert len(recorder.calls) == len(cases)


def test_sparse_gradients_give_a_sparse_mean_over_exactly_the_touched_rows():
    embedding = variable("embedding", (10, 3))
    first = np.arange(1, 7, dtype="float32").reshape(2, 3)  # rows 1, 3
    second = -np.arange(1, 7, dtype="float32").reshape(2, 3) / 4  # rows 3, 7
    window, recorder = Window(2), Recorder()
    window.accumulate([(tf.IndexedSlices(tf.constant(first), tf.constant([1, 3], tf.int64),
                                         tf.constant([10, 3], tf.int64)), embedding)], 4, recorder)
    window.accumulate([(tf.IndexedSlices(tf.constant(second), tf.constant([3, 7], tf.int64),
                                         tf.constant([10, 3], tf.int64)), embedding)], 2, recorder)
    assert len(recorder.calls) == 1
    kind, indices, values, shape = recorder.calls[0]["embedding:0"]
    assert kind == "sparse"
    np.testing.assert_array_equal(indices, [1, 3, 7])
    np.testing.assert_array_equal(shape, [10, 3])
    expected = np.stack([4 * first[0], 4 * first[1] + 2 * second[0], 2 * second[1]]) / 6.0
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    # The row markers are emptied with the sums: the next window names only its own rows.
    window.accumulate([(tf.IndexedSlices(tf.constant(first[:1]), tf.constant([5], tf.int64),
                                         tf.constant([10, 3], tf.int64)), embedding)], 1, recorder)
    window.accumulate([(tf.IndexedSlices(tf.constant(first[1:]), tf.constant([5], tf.int64),
                                         tf.constant([10, 3], tf.int64)), embedding)], 3, recorder)
    _, indices, values, _ = recorder.calls[1]["embedding:0"]
    np.testing.assert_array_equal(indices, [5])
    np.testing.assert_allclose(values, [(first[0] + 3 * first[1]) / 4.0], rtol=1e-6)


def test_float16_gradients_are_summed_in_float32():
    half = variable("half", (3,), tf.float16)
    # (n a power of two: the sums are divided by n exactly, see `planned`.)
    window, recorder = Window(2048), Recorder()
    window.build([half])
    total = window._sums[variable_key(half)]
    assert total.dtype == tf.float32
    big, small = np.float16(1.0), np.float16(1e-4)
    window.add([(tf.fill([3], tf.constant(big)), half)], 1)
    for _ in range(1000):
        window.add([(tf.fill([3], tf.constant(small)), half)], 1)
    # The same additions in float32 (numpy), and in float16, where each 1e-4
    # is below half a unit in the last place of 1.0 and rounds away.
    scale = np.float32(1.0 / 2048)
    expected, in_half = np.float32(big) * scale, big
    for _ in range(1000):
        expected = np.float32(expected + np.float32(small) * scale)
        in_half = np.float16(in_half + small)
    assert in_half == np.float16(1.0)
    np.testing.assert_array_equal(total.numpy(), np.full(3, expected, "float32"))
    assert abs(float(expected) * 2048 - 1.1) < 1e-3
    assert bool(window.flush(recorder).numpy())
    mean = recorder.calls[0]["half:0"]
    assert mean.dtype == np.float16  # handed over in the variable's dtype
    factor = np.float32(2048) / np.float32(1001)  # planned / weight: a window short of its n
    np.testing.assert_array_equal(mean, np.full(3, np.float16(expected * factor), "float16"))


def test_a_variable_whose_gradient_is_none_in_some_micro_batches_keeps_its_sum():
    # `a` has gradients in micro-batches 1-2 only, `b` in 3-4 only: `a`'s
    # gradient is None in the micro-batch that completes the window.
    a, b = variable("a", (2,)), variable("b", (3,))
    ga, gb = gradients((2,), 2, seed=1), gradients((3,), 2, seed=2)
    sizes = [2, 3, 4, 5]
    window, recorder = Window(4), Recorder()
    steps = [[(ga[0], a), (None, b)], [(ga[1], a), (None, b)],
             [(None, a), (gb[0], b)], [(None, a), (gb[1], b)]]
    for pairs, size in zip(steps, sizes):
        window.accumulate([(None if g is None else tf.constant(g), var) for g, var in pairs], size, recorder)
    assert len(recorder.calls) == 1
    call = recorder.calls[0]
    assert sorted(call) == ["a:0", "b:0"]
    # Both over the window's 14 samples: the big batch's mean, where a
    # sample that does not reach a variable contributes a zero gradient.
    np.testing.assert_allclose(call["a:0"], (2 * ga[0] + 3 * ga[1]) / 14.0, rtol=1e-6)
    np.testing.assert_allclose(call["b:0"], (4 * gb[0] + 5 * gb[1]) / 14.0, rtol=1e-6)
    assert not np.allclose(call["a:0"], 0.0)


def test_reduction_sum_applies_the_weighted_sum():
    v = variable("v", (2, 3))
    grads = gradients((2, 3), 2, seed=3)
    window, recorder = Window(2, reduction=SUM), Recorder()
    window.accumulate([(tf.constant(grads[0]), v)], 3, recorder)
    window.accumulate([(tf.constant(grads[1]), v)], 5, recorder)
    np.testing.assert_allclose(recorder.calls[0]["v:0"], 3.0 * grads[0] + 5.0 * grads[1], rtol=1e-6)


def test_flush_applies_a_partial_window_by_its_samples_and_then_nothing():
    v = variable("v", (4,))
    grads = gradients((4,), 2, seed=4)
    window, recorder = Window(4), Recorder()
    assert not bool(window.flush(recorder).numpy())  # not even built
    window.accumulate([(tf.constant(grads[0]), v)], 8, recorder)
    window.accumulate([(tf.constant(grads[1]), v)], 3, recorder)
    assert recorder.calls == []
    assert bool(window.flush(recorder).numpy())
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["v:0"], (8 * grads[0] + 3 * grads[1]) / 11.0, rtol=1e-6)
    assert int(window.count.numpy()) == 0
    assert not bool(window.flush(recorder).numpy())
    assert len(recorder.calls) == 1


def test_a_window_of_no_samples_has_a_zero_mean_not_nan():
    v = variable("v", (3,))
    window, recorder = Window(2), Recorder()
    for g in gradients((3,), 2, seed=5):
        window.accumulate([(tf.constant(g), v)], tf.constant(0), recorder)
    assert len(recorder.calls) == 1
    np.testing.assert_array_equal(recorder.calls[0]["v:0"], np.zeros(3, "float32"))


def test_a_window_whose_first_micro_batch_has_no_samples_weighs_the_others():
    # A replica that got no samples of the first micro-batch.
    v = variable("v", (3,))
    grads = gradients((3,), 4, seed=8)
    sizes = [0, 8, 8, 5]
    window, recorder = Window(4), Recorder()
    for g, b in zip(grads, sizes):
        window.accumulate([(tf.constant(g), v)], tf.constant(b), recorder)
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads, sizes), rtol=1e-6)


def test_the_state_checkpoints_by_stable_names_and_a_restored_window_continues_bitwise(tmp_path):
    dense, embedding = variable("dense", (2, 3)), variable("embedding", (10, 3))
    grads = gradients((2, 3), 4, seed=6)
    rows = gradients((2, 3), 4, seed=7)
    indices = [[1, 3], [3, 7], [0, 7], [3, 9]]
    sizes = [8, 8, 3, 6]

    def micro_batch(k):
        sparse = tf.IndexedSlices(tf.constant(rows[k]), tf.constant(indices[k], tf.int64),
                                  tf.constant([10, 3], tf.int64))
        return [(tf.constant(grads[k]), dense), (sparse, embedding)], sizes[k]

    original, original_calls = Window(4), Recorder()
    for k in range(2):
        original.accumulate(*micro_batch(k), apply_fn=original_calls)
    assert isinstance(original.state, tf.Module)
    # Every variable but n, a setting whose one source is the owner's n.
    assert {id(var) for var in original.state.variables} == {
        id(var) for var in original.all_variables() if var is not original.n_variable}
    assert sorted(original.state.by_name) == sorted([
        "count", "weight", "planned", "epoch_step", "epoch_steps", "skipped",
        "gradaccum/dense/sum", "gradaccum/embedding/sum", "gradaccum/embedding/rows"])
    path = tf.train.Checkpoint(w=original.state).save(str(tmp_path / "window"))
    saved = [name for name, _ in tf.train.list_variables(path)]
    for name in ("count", "weight", "planned", "epoch_step", "epoch_steps", "skipped", "gradaccum.Sdense.Ssum",
                 "gradaccum.Sembedding.Ssum", "gradaccum.Sembedding.Srows"):
        assert "w/by_name/{}/.ATTRIBUTES/VARIABLE_VALUE".format(name) in saved, saved

    # Restored before the fresh window has any variable: each is restored as it is created.
    restored, restored_calls = Window(4), Recorder()
    status = tf.train.Checkpoint(w=restored.state).restore(path)
    applied = []
    for k in range(2, 4):
        original.accumulate(*micro_batch(k), apply_fn=original_calls)
        applied.append(bool(restored.accumulate(*micro_batch(k), apply_fn=restored_calls).numpy()))
    status.assert_consumed()
    assert applied == [False, True]  # the window continued: 2 restored + 2 new micro-batches
    assert len(original_calls.calls) == len(restored_calls.calls) == 1
    theirs, ours = original_calls.calls[0], restored_calls.calls[0]
    np.testing.assert_array_equal(ours["dense:0"], theirs["dense:0"])
    for part in range(1, 4):
        np.testing.assert_array_equal(ours["embedding:0"][part], theirs["embedding:0"][part])
    np.testing.assert_allclose(ours["dense:0"], weighted_mean(grads, sizes), rtol=1e-6, atol=1e-7)
    dense_rows = np.zeros((10, 3))
    for k in range(4):
        for row, values in zip(indices[k], rows[k]):
            dense_rows[row] += sizes[k] * values.astype("float64")
    np.testing.assert_array_equal(ours["embedding:0"][1], [0, 1, 3, 7, 9])
    np.testing.assert_allclose(ours["embedding:0"][2], dense_rows[[0, 1, 3, 7, 9]] / 25.0, rtol=1e-6, atol=1e-7)
    assert int(restored.epoch_step.numpy()) == 4


def test_skip_nonfinite_skips_a_window_with_an_inf_or_nan_whole_and_counts_it():
    v, w = variable("v", (2, 3)), variable("w", (4,))
    grads = gradients((2, 3), 6)
    others = gradients((4,), 6, seed=1)
    others[1][2] = np.inf  # window 1's second micro-batch, in one variable only
    grads[5][0, 0] = np.nan  # window 3's last
    window, recorder = Window(2, skip_nonfinite=True), Recorder()
    applied = [bool(window.accumulate([(tf.constant(g), v), (tf.constant(o), w)], 4, recorder).numpy())
               for g, o in zip(grads, others)]
    assert applied == [False, False, False, True, False, False]
    assert int(window.skipped.numpy()) == 2
    assert len(recorder.calls) == 1  # window 2 only: neither variable of a skipped window moves
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads[2:4], [4, 4]), rtol=1e-6)
    assert int(window.count.numpy()) == 0 and float(window.weight.numpy()) == 0.0

    # Without the option the window is applied as it is: non-finite, as the big batch's gradient.
    plain, recorder = Window(2), Recorder()
    for g, o in zip(grads[:2], others[:2]):
        plain.accumulate([(tf.constant(g), v), (tf.constant(o), w)], 4, recorder)
    assert len(recorder.calls) == 1 and np.isinf(recorder.calls[0]["w:0"][2])
    assert int(plain.skipped.numpy()) == 0


def test_restore_without_the_open_window_keeps_the_counts_only():
    v, w = variable("v", (2, 3)), variable("w", (4,))
    saved = Window(4, skip_nonfinite=True)
    grads = gradients((2, 3), 2)
    for g in grads:
        saved.accumulate([(tf.constant(g), v), (tf.constant(np.ones(4, "float32")), w)], 8, Recorder())
    saved.skipped.assign(5)
    values = saved.values()
    assert set(values) >= {"count", "weight", "skipped", "gradaccum/v/sum", "gradaccum/w/sum"}

    restored = Window(4, skip_nonfinite=True)
    restored.restore(values, open_window=False)  # before its sums exist: none is kept pending
    restored.accumulate([(tf.constant(grads[0]), v), (tf.constant(np.ones(4, "float32")), w)], 8, Recorder())
    assert int(restored.skipped.numpy()) == 5 and int(restored.count.numpy()) == 1
    # (Its own first micro-batch, of 8 samples in a window of 4: divided by 32.)
    np.testing.assert_array_equal(restored._sums[variable_key(v)].numpy(), grads[0] / 4)
    whole = Window(4)
    whole.restore(values)
    whole.accumulate([(tf.constant(grads[0]), v), (tf.constant(np.ones(4, "float32")), w)], 8, Recorder())
    assert int(whole.count.numpy()) == 3


def test_an_open_window_saved_before_windows_planned_restores_as_it_was_meant():
    # Saved before the sums were divided by a planned weight: undivided sums,
    # no "planned". Restored into a window in the middle of its own.
    v = variable("v", (2, 3))
    grads, sizes = gradients((2, 3), 4), [8, 8, 3, 6]
    saved = {"count": 2, "weight": 16.0, "gradaccum/v/sum": (8 * grads[0] + 8 * grads[1]).astype("float32")}
    window, recorder = Window(4), Recorder()
    window.accumulate([(tf.constant(grads[3]), v)], 5, recorder)  # (it plans 20)
    window.restore(saved)
    for k in (2, 3):
        window.accumulate([(tf.constant(grads[k]), v)], sizes[k], recorder)
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads, sizes), rtol=1e-6, atol=1e-6)


def test_sums_saved_under_other_names_are_matched_by_position_or_refused():
    # A reloaded subclassed model names its layers anew: "dense_7/kernel"
    # was saved as "dense_3/kernel". Same order and shapes: restored.
    grads = gradients((2, 3), 2)
    old = [variable("dense_3/kernel", (2, 3)), variable("dense_3/bias", (3,))]
    saved = Window(4)
    for g in grads:
        saved.accumulate([(tf.constant(g), old[0]), (tf.constant(g[0]), old[1])], 8, Recorder())
    values = saved.values()
    new = [variable("dense_7/kernel", (2, 3)), variable("dense_7/bias", (3,))]
    restored, recorder = Window(4), Recorder()
    restored.restore(values)
    for g in grads:
        restored.accumulate([(tf.constant(g), new[0]), (tf.constant(g[0]), new[1])], 8, recorder)
    np.testing.assert_allclose(recorder.calls[0]["dense_7/kernel:0"], weighted_mean(grads + grads, [8] * 4),
                               rtol=1e-6)
    # Shapes that do not agree: the window cannot continue, and says so.
    other = Window(4)
    other.restore(values)
    wrong = [variable("x/kernel", (3, 2)), variable("x/bias", (3,))]
    with pytest.raises(ValueError, match=r"cannot continue.*dense_3/kernel/sum"):
        other.accumulate([(tf.constant(grads[0].T), wrong[0]), (tf.constant(grads[0][0]), wrong[1])], 8, Recorder())


def test_each_add_is_one_fused_pass_over_the_gradient():
    # `total.assign_add(grad * size)` makes the product first: a Mul of the
    # variable's shape in the traced step. The fused scaled add makes none.
    # The add is one branch of a tf.cond (a window's first micro-batch
    # writes its sums instead, product and all): the graph's function
    # library holds the branches.
    v = variable("v", (64, 32))
    window = Window(4)

    @tf.function
    def step(grad):
        return window.accumulate([(grad, v)], 8, lambda pairs: None)

    graph = step.get_concrete_function(tf.TensorSpec((64, 32), tf.float32)).graph
    sized = {op.type for op in graph.get_operations()
             if any(output.shape.as_list() == [64, 32] for output in op.outputs)}
    assert sized == {"Placeholder"}, sized
    branches = {function.signature.name: {node.op for node in function.node_def}
                for function in graph.as_graph_def().library.function}
    adding = [ops for ops in branches.values() if "ResourceApplyGradientDescent" in ops]
    assert len(adding) == 1 and "Mul" not in adding[0], branches


def test_a_window_starts_afresh_for_a_variable_without_a_gradient_in_its_first_micro_batch():
    # The first micro-batch writes every sum: w's, which got no gradient
    # then, is written zeros, so neither the last window's sum of w nor a
    # skipped window's nan reaches this window's mean.
    v, w = variable("v", (2, 3)), variable("w", (3,))
    grads_v, grads_w = gradients((2, 3), 4), gradients((3,), 4)
    window, recorder = Window(2, skip_nonfinite=True), Recorder()
    window.accumulate([(tf.constant(grads_v[0]), v), (tf.constant(grads_w[0]), w)], 4, recorder)
    window.accumulate([(tf.constant(grads_v[1]), v), (tf.constant(np.full(3, np.nan, "float32")), w)], 4, recorder)
    assert len(recorder.calls) == 0 and int(window.skipped.numpy()) == 1
    window.accumulate([(tf.constant(grads_v[2]), v), (None, w)], 4, recorder)
    window.accumulate([(tf.constant(grads_v[3]), v), (tf.constant(grads_w[3]), w)], 2, recorder)
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["v:0"], weighted_mean(grads_v[2:], [4, 2]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(recorder.calls[0]["w:0"], 2 * grads_w[3] / 6.0, rtol=1e-6, atol=1e-7)


def test_a_sum_of_in_place_elements_becomes_its_mean_in_place_and_a_smaller_one_out_of_place(monkeypatch):
    # (conftest scales every sum in place; here at a threshold between the two.)
    monkeypatch.setattr(_window, "IN_PLACE_ELEMENTS", 6)
    big, small = variable("big", (2, 3)), variable("small", (5,))
    grads_big, grads_small = gradients((2, 3), 2), gradients((5,), 2, seed=1)
    window, recorder = Window(2), Recorder()
    for g_big, g_small, b in zip(grads_big, grads_small, [8, 3]):
        window.accumulate([(tf.constant(g_big), big), (tf.constant(g_small), small)], b, recorder)
    assert len(recorder.calls) == 1
    np.testing.assert_allclose(recorder.calls[0]["big:0"], weighted_mean(grads_big, [8, 3]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(recorder.calls[0]["small:0"], weighted_mean(grads_small, [8, 3]), rtol=1e-6, atol=1e-7)
    # Where each mean was made: the large sum's memory now holds its mean,
    # the small sum is left as it was.
    np.testing.assert_array_equal(window._sums[variable_key(big)].numpy(), recorder.calls[0]["big:0"])
    # (Divided by the window's planned weight: 2 micro-batches of 8.)
    np.testing.assert_allclose(window._sums[variable_key(small)].numpy(),
                               (8 * grads_small[0] + 3 * grads_small[1]) / 16, rtol=1e-6, atol=1e-6)
    # The next window writes its sums afresh over the mean.
    for g_big, g_small, b in zip(grads_big[::-1], grads_small[::-1], [1, 1]):
        window.accumulate([(tf.constant(g_big), big), (tf.constant(g_small), small)], b, recorder)
    np.testing.assert_allclose(recorder.calls[1]["big:0"], np.mean(grads_big, axis=0), rtol=1e-6, atol=1e-7)


def test_a_window_made_without_epochs_does_not_count_them_and_refuses_one():
    v = variable("v", (2,))
    window, recorder = Window(2, epochs=False), Recorder()
    for g in gradients((2,), 2):
        window.accumulate([(tf.constant(g), v)], 1, recorder)
    assert len(recorder.calls) == 1 and int(window.epoch_step.numpy()) == 0
    with pytest.raises(ValueError, match=r"epochs=False.*Received: an epoch of 5 steps"):
        window.epoch_start_values(5)
