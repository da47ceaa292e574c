"""tf.distribute.MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Each worker trains accumulate(model, n) on the same data (the strategy gives
each its half of every global batch); both must end with the same weights,
equal to one process training plain with the n-times bigger global batch.
The ports are chosen free at test time, on the loopback interface only; the
workers are killed if they outlive the timeout, and always reaped.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers

helpers.require_mode(eager=True)
pytestmark = pytest.mark.heavy

N = 4
GLOBAL_B = 16  # 8 per worker
WORKERS = 2
TIMEOUT_S = 300
WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_worker.py")
OPTIMIZERS = {name: helpers.OPTIMIZERS[name] for name in ("momentum", "adam")}


def free_loopback_ports(count):
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_workers(workdir):
    """Runs the workers to completion; returns their outputs, or fails with their logs."""
    ports = free_loopback_ports(WORKERS)
    cluster = {"worker": ["127.0.0.1:{}".format(port) for port in ports]}
    tests_dir = os.path.dirname(WORKER_SCRIPT)
    processes, logs = [], []
    try:
        for index in range(WORKERS):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env["PYTHONPATH"] = os.pathsep.join([tests_dir] + [p for p in [env.get("PYTHONPATH")] if p])
            log = open(os.path.join(workdir, "worker{}.log".format(index)), "w+")
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, WORKER_SCRIPT, workdir], env=env, stdout=log, stderr=subprocess.STDOUT))
        for process in processes:
            process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the workers did not finish within {} s:\n{}".format(TIMEOUT_S, _tails(logs)))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    failed = [index for index, process in enumerate(processes) if process.returncode != 0]
    if failed:
        pytest.fail("workers {} failed:\n{}".format(failed, _tails(logs)))
    for log in logs:
        log.close()
    outputs = []
    for index in range(WORKERS):
        saved = np.load(os.path.join(workdir, "worker{}.npz".format(index)))
        weights = [saved["w{}".format(i)] for i in range(len(saved.files) - 1)]
        outputs.append((weights, int(saved["steps"])))
    return outputs


def _tails(logs, lines=15):
    text = []
    for index, log in enumerate(logs):
        log.seek(0)
        text.append("--- worker {} ---\n{}".format(index, "".join(log.readlines()[-lines:])))
        log.close()
    return "\n".join(text)


def prepare(workdir, initial, n, optimizer, loop=False):
    np.savez(os.path.join(workdir, "initial.npz"), **{"w{}".format(i): w for i, w in enumerate(initial)})
    with open(os.path.join(workdir, "job.json"), "w") as handle:
        json.dump({"n": n, "global_batch_size": GLOBAL_B, "epochs": 2, "optimizer": optimizer,
                   "jit_compile": False, "loop": loop}, handle)


@pytest.fixture(scope="module")
def plain_multiworker(tmp_path_factory):
    """None if plain Keras trains under MultiWorkerMirroredStrategy here, else why not."""
    workdir = str(tmp_path_factory.mktemp("plain"))
    prepare(workdir, helpers.weights_of(helpers.functional_mlp()), None, "momentum")
    try:
        run_workers(workdir)
    except pytest.fail.Exception as failure:
        lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line]
        return (errors[-1][:200] + " ... " + lines[-1][:200]) if errors else lines[-1][:300]
    return None


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_two_workers_match_one_process_training_the_big_batch(tmp_path, optimizer, plain_multiworker):
    if plain_multiworker is not None:
        pytest.skip("plain Keras training itself fails under MultiWorkerMirroredStrategy "
                    "here: {}".format(plain_multiworker))
    workdir = str(tmp_path)
    initial = helpers.weights_of(helpers.functional_mlp())
    prepare(workdir, initial, N, optimizer)
    x, y = helpers.data()

    def run(n, batch_size):
        if n is not None:
            return agreed(run_workers(workdir))
        model = helpers.fresh(helpers.functional_mlp, initial)
        model.compile(OPTIMIZERS[optimizer](), "mse")
        model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        return helpers.weights_of(model), helpers.steps_of(model)

    _, big, _ = helpers.differential("multiworker/" + optimizer, initial, run, N, GLOBAL_B)
    assert big[1] == 4


def test_a_custom_loop_on_two_workers_matches_one_process_looping_over_the_big_batch(tmp_path):
    # AccumOptimizer inside strategy.run on each worker; the reference is the
    # same loop in one process, plain, at the big global batch.
    workdir = str(tmp_path)
    initial = helpers.weights_of(helpers.functional_mlp())
    prepare(workdir, initial, N, "momentum", loop=True)
    x, y = helpers.data()

    def run(n, batch_size):
        if n is not None:
            return agreed(run_workers(workdir))
        return helpers.train_loop(helpers.functional_mlp, initial, OPTIMIZERS["momentum"], x, y, batch_size)

    _, big, _ = helpers.differential("multiworker-loop/momentum", initial, run, N, GLOBAL_B)
    assert big[1] == 4


def agreed(workers):
    """The two workers' (weights, steps), which must be equal."""
    (first, first_steps), (second, second_steps) = workers
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b, err_msg="the two workers' weights differ")
    assert first_steps == second_steps, "the workers' steps differ: {} and {}".format(first_steps, second_steps)
    return first, first_steps
