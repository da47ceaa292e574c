import json
import os
import platform
import random
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from gradaccum import _compat, _window


def pytest_addoption(parser):
    parser.addoption(
        "--graph-mode", action="store_true",
        help="disable eager execution before any test is collected, to run the graph-mode "
             "tests on TF 2.x (TF 1.x is in graph mode anyway)")


# Which tests this environment's eager pass runs (tox.ini sets it): "full",
# the whole suite, on the floor and the newest release of each Keras flavour;
# "core", the tests marked core, on every TensorFlow minor in between; "python",
# the tests marked python, where the tests outside it would run code another
# environment runs (only Python's version differs, or the Keras code is another
# row's); "errors", the tests marked errors, where the installed Keras is one
# gradaccum refuses. A graph pass (--graph-mode, on the three environments that
# make one) runs every graph-mode test whatever the eager pass runs: each is the
# only graph pass of its Keras.
SUITES = ("full", "core", "python", "errors")
# GRADACCUM_HEAVY: "0" skips the heavy tests, "core" all but the core subset's.
HEAVY_SETTINGS = ("1", "0", "core")
# GRADACCUM_LONG: "0" skips the long tests (helpers.long_run).
LONG_SETTINGS = ("1", "0")


def _setting(variable, allowed, default):
    """$variable (`default` when unset), refused with a usage error unless it is one of `allowed`."""
    value = os.environ.get(variable, default)
    if value not in allowed:
        raise pytest.UsageError(
            "{} must be one of {}. Received: {}={!r}".format(variable, allowed, variable, value))
    return value


def suite(config=None):
    value = _setting("GRADACCUM_SUITE", SUITES, "full")
    if config is not None and config.getoption("--graph-mode"):
        return "full"
    return value


# CPUs the tf.distribute tests train on: the one physical CPU split into this
# many logical devices, before TensorFlow initializes its devices.
LOGICAL_CPUS = 2


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: multi-process, distributed or long tests; tox runs them in one "
        "environment per Keras flavour (GRADACCUM_HEAVY=0 skips them elsewhere, "
        "GRADACCUM_HEAVY=core all but the core subset's)")
    config.addinivalue_line(
        "markers", "core: the core subset (exactness over optimizers, the three model kinds, "
        "saving and reloading, MirroredStrategy, the updates log, the private attributes "
        "gradaccum reads), run alone on the TF minors between each flavour's floor and newest "
        "(GRADACCUM_SUITE=core)")
    config.addinivalue_line(
        "markers", "python: the Python subset (the installed wheel, the private attributes, the "
        "window's arithmetic, bad input, the three model kinds, a custom loop in a tf.function, "
        "saving and reloading: what a Python version can change), run alone where only Python's "
        "version differs from an environment that runs the core subset or the full suite, or "
        "where the Keras code is another such environment's (GRADACCUM_SUITE=python)")
    config.addinivalue_line(
        "markers", "errors: bad input and refused runtimes (test_errors), run alone where "
        "gradaccum refuses the installed Keras (GRADACCUM_SUITE=errors)")
    suite()  # a bad GRADACCUM_SUITE, GRADACCUM_HEAVY or GRADACCUM_LONG is an error before anything runs
    heavy_setting()
    _setting("GRADACCUM_LONG", LONG_SETTINGS, "1")  # (helpers.long_run reads it)
    # The suite's models are small: every sum would be scaled to its mean out
    # of place (below _window.IN_PLACE_ELEMENTS). Scale them all in place, so
    # that every exactness test covers the path large models take; test_window
    # covers both at the library's threshold, and test_long_runs' workers
    # (fresh processes) train as the library ships.
    _window.IN_PLACE_ELEMENTS = 0
    if config.getoption("--graph-mode") and not _compat.IS_TF1:
        tf.compat.v1.disable_eager_execution()
    if not _compat.IS_TF1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)


def pytest_collection_modifyitems(config, items):
    chosen = suite(config)
    if chosen != "full":
        # Deselected, not skipped: the matrix table names the suite, and the
        # skip counts stay the chosen tests' own.
        deselected = [item for item in items if chosen not in item.keywords]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if chosen in item.keywords]
    # Python 3.8 against 3.7, or 3.13 against 3.11, does not change what these
    # tests answer; the Keras flavour does (tox.ini says which env runs them).
    # "core": only the heavy tests of the core subset (MirroredStrategy's
    # exactness), where a flavour's other environment runs the rest.
    heavy = heavy_setting()
    if heavy == "1":
        return
    skip = pytest.mark.skip(reason="heavy: runs in one environment per Keras flavour "
                                   "(GRADACCUM_HEAVY={} here)".format(heavy))
    for item in items:
        if "heavy" in item.keywords and not (heavy == "core" and "core" in item.keywords):
            item.add_marker(skip)


def heavy_setting():
    return _setting("GRADACCUM_HEAVY", HEAVY_SETTINGS, "1")


@pytest.fixture(autouse=True)
def _seeded():
    # Keras 2's global state first: graph mode builds every test's models and
    # training ops into one default graph, and Keras 2 builds functional
    # models into a graph of its own, so each test ran slower than the one
    # before (TF 2.15, graph mode: a test taking 4 s alone took 22 s in the
    # suite, whose graph pass took 442 s; eager, test_keras_exact ran 15-20%
    # faster with it). Before the seed: the graph-level seed belongs to the
    # graph. Not Keras 3's, which keeps no such graph and whose clear_session
    # collects garbage (0.1-0.3 s a call; py311-tf221-keras3's eager pass
    # took 1031 s with it, 849 s in the CI run before).
    import helpers  # (not at the top: Keras is imported after eager is disabled)
    if not helpers.KERAS3:
        helpers.keras.backend.clear_session()
    # Every test starts from the same random initial weights, so a figure
    # measured once is the figure CI measures. Adam amplifies float32
    # rounding on near-zero gradient components: over 12 random seeds its
    # error reached 2e-6 of the weight change (tolerance 1e-5), so an
    # unseeded suite would be reproducible only most of the time.
    seed = 20261124
    random.seed(seed)
    np.random.seed(seed)
    tf.compat.v1.set_random_seed(seed)


def _keras_description():
    if _compat.IS_TF1:
        return "tf.keras {}".format(tf.keras.__version__)
    keras2 = _compat.keras2_module()
    if keras2 is not None:
        package = sys.modules.get(keras2.__name__.split(".", 1)[0])
        return "{} {}".format(package.__name__, getattr(package, "__version__", "?"))
    import keras
    return "keras {}".format(keras.__version__)


# Where CI's minutes go (tools/matrix_report.py prints them): this pass's wall
# time and each test's setup + call + teardown.
_STARTED = time.time()
_DURATIONS = {}


def pytest_runtest_logreport(report):
    _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Writes this environment's versions and counts to $GRADACCUM_REPORT (for the matrix table)."""
    path = os.environ.get("GRADACCUM_REPORT")
    if not path:
        return
    if terminalreporter.config.getoption("--graph-mode") and not _compat.IS_TF1:
        path = path[:-len(".json")] + "-graph.json"  # the second pass of a TF 2.x env
    stats = terminalreporter.stats
    report = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": _keras_description(),
        "mode": "eager" if _compat.executing_eagerly() else "graph",
        "suite": suite(terminalreporter.config),
        "passed": len(stats.get("passed", [])),
        "failed": len(stats.get("failed", [])) + len(stats.get("error", [])),
        "skipped": len(stats.get("skipped", [])),
        # Known differences held by strict xfail tests (an unexpected pass fails).
        "xfailed": len(stats.get("xfailed", [])),
        "seconds": round(time.time() - _STARTED),
        "slowest": [[nodeid, round(seconds, 1)] for nodeid, seconds in
                    sorted(_DURATIONS.items(), key=lambda item: -item[1])[:10]],
    }
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, "w") as handle:
        json.dump(report, handle)
