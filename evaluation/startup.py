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
* ``keep_freed_memory()``: the C allocator (glibc) keeps memory a command frees for its next
  allocations instead of returning it to the system. A fit allocates and frees multi-megabyte
  temporaries per batch (edge products, attention terms); by default glibc serves blocks above its
  mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings and trims the heap top, so
  each such temporary is page-faulted in anew: on the rib benchmark 83 000-217 000 minor page
  faults in a process's first fit (measured under load: the fit without the neuron-basis edges
  2.96 -> 2.58 s CPU with these settings alone). With blocks up to 64 MiB served from the heap and
  up to 256 MiB of free heap kept, 36 000-40 000 (peak RSS +20-50 MB). ``interp-eval lib`` calls it (a process
  setting, like the collector's); a C library without ``mallopt`` (not glibc) is left as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc

_exit_hook_registered = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 * 2 ** 20   # blocks below this come from the heap (reused once freed)
TRIM_THRESHOLD = 256 * 2 ** 20  # free heap kept before any is returned to the system


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


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to MMAP_THRESHOLD from the heap and keep up to TRIM_THRESHOLD of free
    heap (see the module docstring). True when set; False (nothing changed) without glibc's mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, since setting it fixes the trim threshold's default
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
