"""evaluation.startup: the collector is off while a command imports and loads, what was built is then
kept out of later collections, and a process that calls ``main`` gets its collector back as it was."""

from __future__ import annotations

import gc

from evaluation import startup


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_collector_paused_then_frozen_and_released():
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    with startup.collector_paused():
        assert not gc.isenabled()
        kept = [Node() for _ in range(100)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + 100  # what the block built is out of the collections' walk
    startup.release()
    assert gc.get_freeze_count() == 0
    del kept


def test_collector_stays_off_when_it_was_off():
    gc.disable()
    try:
        with startup.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        startup.release()


def test_interp_eval_main_leaves_the_collector_as_it_found_it(capsys, tmp_path):
    from evaluation.cli import main

    argv = ["lib", "no-such-checkpoint.pt", "--out", str(tmp_path / "out"), "--data", "modular-addition:p=5"]
    assert main(argv) == 2  # fails inside collector_paused (loading)
    assert "no-such-checkpoint.pt" in capsys.readouterr().err
    assert gc.isenabled() and gc.get_freeze_count() == 0
    cycle = Node()
    del cycle
    assert gc.collect() >= 1  # cycles made after the command are still freed


def test_keep_freed_memory_sets_glibc_thresholds_or_changes_nothing():
    import ctypes

    try:
        glibc = hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        glibc = False
    assert startup.keep_freed_memory() is glibc  # True where glibc accepts both thresholds, else nothing changed
