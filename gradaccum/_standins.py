"""Stands in for an object's methods while a training step is traced, thread by thread.

Both Keras routes trace their training step once and take part of it from
Keras' own objects: Keras 3's route stands in for the optimizer's
`apply_gradients` (and `scale_loss`), and both routes stand in for each
BatchNormalization layer's `call`, to pool its statistics over the window
(`_batchnorm`). An instance attribute shadows the method; the traced
function keeps what it called. Under a `tf.distribute` strategy each replica
traces the step in its own thread, at the same time, so each attribute
dispatches to the calling thread's stand-in (to the method itself in threads
without one), and is removed when the last thread is done.
"""

import contextlib
import threading

from ._compat import not_converted


def method(obj, name):
    """`obj.name` as its class defines it, whatever stands in for it now."""
    return getattr(type(obj), name).__get__(obj)


class _StandIns(object):

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()
        self._tracing = {}  # (id(obj), name) -> threads tracing with a stand-in

    @contextlib.contextmanager
    def standing_in(self, obj, stand_ins):
        """While in this context, this thread's calls of `obj.<name>` go to `stand_ins[name]`."""
        mine = self._local.__dict__.setdefault("stand_ins", {})
        for name, stand_in in stand_ins.items():
            mine[(id(obj), name)] = stand_in
        with self._lock:
            for name in stand_ins:
                key = (id(obj), name)
                if not self._tracing.get(key):
                    setattr(obj, name, self._dispatcher(obj, name))
                self._tracing[key] = self._tracing.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for name in stand_ins:
                    key = (id(obj), name)
                    del mine[key]
                    self._tracing[key] -= 1
                    if not self._tracing[key]:
                        del self._tracing[key]
                        delattr(obj, name)

    def _dispatcher(self, obj, name):
        original = method(obj, name)
        key = (id(obj), name)

        @not_converted
        def dispatch(*args, **kwargs):
            stand_in = self._local.__dict__.get("stand_ins", {}).get(key)
            return (stand_in or original)(*args, **kwargs)

        return dispatch


STAND_INS = _StandIns()
standing_in = STAND_INS.standing_in
