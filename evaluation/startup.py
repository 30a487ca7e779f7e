"""The command lines' start-up and exit cost in Python's cyclic garbage collector.

Importing torch, TransformerLens (which imports transformers, datasets, pandas and scipy) and
matplotlib builds about half a million container objects. The cyclic collector walks all of them
in every full collection it runs while they are being built, and again in the collections the
interpreter runs at exit: on the rib benchmark (benchmarks/lib_rib_reference.py) about 1 s and
1.5-2 s of CPU time, a quarter of ``interp-eval lib``'s run, spent finding no garbage. So:

* ``collector_paused()``: the collector is off while a command imports its libraries and loads
  its model; what exists at the end is frozen (``gc.freeze``: moved to a generation no collection
  walks) and the collector is switched back on, so later collections walk only new objects.
  Cycles made inside the block are not freed until ``release()`` (measured: peak RSS unchanged).
* ``release()``: the frozen objects become collectable again (``interp-eval``'s ``main`` calls it
  when the command ends, so that a process calling ``main`` repeatedly, e.g. the tests, frees them).
* ``skip_exit_collection()``: ``gc.freeze`` runs first at exit, so the interpreter's own
  collections walk nothing; atexit handlers and file flushing still run.
"""

from __future__ import annotations

import atexit
import contextlib
import gc

_exit_hook_registered = False


@contextlib.contextmanager
def collector_paused():
    """Collector off inside the block; afterwards everything alive is frozen and the collector is on again
    (if it was on before)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def release() -> None:
    """Frozen objects go back to the oldest generation (so a long-lived process, e.g. a test session
    calling ``main``, can still free what a command left behind)."""
    gc.unfreeze()


def skip_exit_collection() -> None:
    """At interpreter exit, freeze every object first, so the exit-time collections walk nothing."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(gc.freeze)
        _exit_hook_registered = True
