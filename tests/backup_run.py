"""One training run with BackupAndRestore, shared by test_backup and its worker process."""

import helpers
from helpers import keras
from gradaccum import accumulate

N, B = 4, 8
SAMPLES = 88  # 11 micro-batches per epoch: windows of 4, 4, 3 (or, carried, across epochs)


def backup_class():
    """Keras' BackupAndRestore (under `experimental` in TF 2.7)."""
    callbacks = keras.callbacks
    return getattr(callbacks, "BackupAndRestore", None) or callbacks.experimental.BackupAndRestore


class Stop(keras.callbacks.Callback):
    """Calls `on_kill()` at the start of epoch `epoch`, or at the end of its batch `batch`."""

    def __init__(self, epoch, batch, on_kill):
        super(Stop, self).__init__()
        self.stop_epoch, self.stop_batch, self.on_kill = epoch, batch, on_kill
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if epoch == self.stop_epoch and self.stop_batch is None:
            self.on_kill()

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.stop_epoch and batch == self.stop_batch:
            self.on_kill()


class FirstCount(keras.callbacks.Callback):
    """The window's micro-batch count after the fit's first step (a resumed window counts on)."""

    def __init__(self):
        super(FirstCount, self).__init__()
        self.count = None

    def on_train_batch_end(self, batch, logs=None):
        if self.count is None:
            self.count = int(self.model._accum_window.count.numpy())


def train(initial, backup_dir, epoch_end, save_freq, epochs, stop=None, on_kill=None):
    """(weights, updates, window count after the first step) of a fit with BackupAndRestore.

    `stop` = [epoch, batch or None]: where `on_kill()` is called (it kills
    the process, or raises).
    """
    x, y = helpers.data(SAMPLES)
    model = accumulate(helpers.fresh(helpers.functional_mlp, initial), N, epoch_end=epoch_end)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    options = {} if save_freq == "epoch" else {"save_freq": save_freq}
    first = FirstCount()
    callbacks = [backup_class()(backup_dir, **options), first]
    if stop is not None:
        callbacks.append(Stop(stop[0], stop[1], on_kill))
    model.fit(x, y, batch_size=B, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return helpers.weights_of(model), helpers.steps_of(model), first.count
