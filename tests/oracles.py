"""Oracles for the differential tests: accumulated training versus the big batch.

Free of Keras, so that the graph-mode optimizer tests use them on every runtime.
"""

import os

import numpy as np

# float32 tolerance on the total weight change: max |w_accum - w_big| must be
# below REL_TOL * max |w_big - w_initial|. Summing b-weighted micro-batch means
# instead of one big mean reorders float32 additions; nothing more.
REL_TOL = 1e-5
# Plain training at the small batch must differ from the big batch by far more
# than REL_TOL, or equality would prove nothing.
DISCRIMINATION = 1e-3


def change_error(initial, candidate, reference):
    """max |candidate - reference| relative to max |reference - initial|."""
    diff = max(np.max(np.abs(c - r)) for c, r in zip(candidate, reference))
    change = max(np.max(np.abs(r - i)) for r, i in zip(reference, initial))
    assert change > 0, "reference training did not move the weights"
    return diff / change


def assert_same_training(initial, candidate, reference, rel_tol=REL_TOL):
    error = change_error(initial, candidate, reference)
    assert error <= rel_tol, "weights differ from the big batch by {:.3g} of the change (allowed {:.1g})".format(error, rel_tol)
    return error


def assert_discriminates(initial, small, reference):
    error = change_error(initial, small, reference)
    assert error > DISCRIMINATION, (
        "plain small-batch training matches the big batch ({:.3g}): the test would pass "
        "without accumulation".format(error))
    return error


def differential(name, initial, run, n, b, rel_tol=REL_TOL):
    """The check behind every exactness claim: gradaccum at (b, n) against plain n*b and b.

    `run(n, batch_size)` trains from `initial` and returns (weights, optimizer
    steps, anything more): through gradaccum with n micro-batches per update
    when n is given, plainly when it is None. The accumulated run must take
    the big batch's steps and end within `rel_tol` of its weights, and plain
    training at b must not (or the test could pass without accumulation).
    Records the error under `name`.

    Returns:
        (accumulated, big, small): what `run` returned for each.
    """
    accumulated, big, small = run(n, b), run(None, n * b), run(None, b)
    assert accumulated[1] == big[1], "optimizer steps: accumulated {} vs big batch {}".format(
        accumulated[1], big[1])
    error = assert_same_training(initial, accumulated[0], big[0], rel_tol)
    assert_discriminates(initial, small[0], big[0])
    record(name, error)
    return accumulated, big, small


def record(name, value):
    """Appends a measured figure to $GRADACCUM_FIGURES, for closing notes."""
    path = os.environ.get("GRADACCUM_FIGURES")
    if path:
        with open(path, "a") as handle:
            handle.write("{}\t{:.3g}\n".format(name, value))
