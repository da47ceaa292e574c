"""A training process for test_backup: BackupAndRestore, and perhaps kill -9 of itself.

    python backup_worker.py WORKDIR

WORKDIR/config.json says how to train (backup_run.train's arguments); the initial
weights are in WORKDIR/initial.npz. At the end the process writes its final
weights, update count and what it saw to WORKDIR/result.npz; killed, it
writes nothing.
"""

import json
import os
import signal
import sys

import numpy as np

import backup_run


def main(workdir):
    with open(os.path.join(workdir, "config.json")) as handle:
        config = json.load(handle)
    initial = np.load(os.path.join(workdir, "initial.npz"))
    initial = [initial["w{}".format(k)] for k in range(len(initial.files))]
    config["on_kill"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
    weights, steps, first_count = backup_run.train(initial, **config)
    np.savez(os.path.join(workdir, "result.npz"), steps=steps, first_count=first_count,
             **{"w{}".format(k): w for k, w in enumerate(weights)})


if __name__ == "__main__":
    main(sys.argv[1])
