"""The facade's routing: which modules `accumulate` and `AccumOptimizer` hand over to."""

import importlib
import os
import shutil
import sys

import pytest
import tensorflow as tf

import gradaccum
import helpers
from helpers import keras
from gradaccum import _compat

# Every Keras of the matrix, in each mode: each has routes of its own.
pytestmark = [pytest.mark.core, pytest.mark.python]


def test_a_renamed_copy_of_the_package_runs_its_own_routes(tmp_path):
    # tools/ab.py imports a past revision as a second package beside this
    # one. The facade must load that copy's routes (its Window), not this
    # package's: with route modules named absolutely, both sides of such a
    # comparison ran the same code.
    name = "gradaccum_renamed_copy"
    copy = tmp_path / name
    shutil.copytree(os.path.dirname(gradaccum.__file__), str(copy),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.glob("*.py"):  # (two packages cannot register one Keras name)
        path.write_text(path.read_text().replace('package="gradaccum"', 'package="{}"'.format(name)))
    sys.path.insert(0, str(tmp_path))
    try:
        renamed = importlib.import_module(name)
        if _compat.executing_eagerly():
            inner = keras.optimizers.SGD(0.1)
        else:
            inner = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        wrapped = renamed.AccumOptimizer(inner, 2)
        assert type(wrapped).__module__.startswith(name + "."), type(wrapped).__module__
        model = renamed.accumulate(helpers.functional_mlp(), 2)
        assert type(model).__module__.startswith(name + "."), type(model).__module__
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
