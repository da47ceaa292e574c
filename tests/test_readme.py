"""README's runnable examples run, and print what README says they print."""

import os
import re
import subprocess
import sys

import pytest

import helpers

helpers.require_mode(eager=True)
pytestmark = pytest.mark.heavy

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def example(section):
    """The first ```python block after README's `## <section>` heading."""
    with open(README) as handle:
        text = handle.read()
    start = text.index("\n## " + section)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def run_example(tmp_path, section):
    """Runs the section's example as a script; returns what it printed (it must succeed)."""
    script = tmp_path / "example.py"
    script.write_text(example(section))
    result = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_the_distributed_training_example_runs_and_updates_once_per_window(tmp_path):
    output = run_example(tmp_path, "Distributed training")
    assert "updates after each epoch: [2, 4]" in output, output[-3000:]


def test_the_custom_loop_example_runs_and_updates_once_per_window(tmp_path):
    output = run_example(tmp_path, "Custom training loops")
    assert "updates: 8" in output, output[-3000:]


def test_the_batch_size_schedule_example_runs_and_prints_its_schedule(tmp_path):
    output = run_example(tmp_path, "Batch-size schedules")
    assert "n per epoch: [1, 2, 4, 8, 8]" in output, output[-3000:]
    assert "updates after each epoch: [32, 48, 56, 60, 64]" in output, output[-3000:]
