"""Atomic writes (interp_train.io.write_atomic): an interrupted write leaves the old file intact and no
temporary file behind; the new file appears in one rename of a complete file. A plain ``write_text``
fails every test here (it truncates the old file in place and never renames)."""

import json
import os

import pytest

import interp_train.io as io_module
from interp_train.io import write_atomic, write_json_atomic

OLD, NEW = "old contents\n" * 100, "new contents\n" * 1000


def test_new_file_appears_by_one_rename_of_a_complete_file_in_the_same_folder(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text(OLD)
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        # at the moment of the rename: readers still see the whole old file, the new one is complete
        seen.append((os.path.dirname(os.fspath(src)), os.fspath(dst), open(src).read(), target.read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomic(target, NEW)
    assert seen == [(str(tmp_path), str(target), NEW, OLD)]
    assert target.read_text() == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


class Killed(BaseException):
    """Stands in for an interrupt (KeyboardInterrupt, SystemExit) in the middle of a write."""


def test_interrupted_after_partial_data_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "m" / "metrics.json"
    target.parent.mkdir()
    target.write_text(OLD)
    real_fdopen, written = os.fdopen, []

    class HalfThenDie:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
            return False

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            written.append(len(data) // 2)
            raise Killed()

    monkeypatch.setattr(io_module.os, "fdopen", lambda fd, *a, **k: HalfThenDie(real_fdopen(fd, *a, **k)))
    with pytest.raises(Killed):
        write_atomic(target, NEW)
    assert written, "the write was interrupted after partial data"
    assert target.read_text() == OLD
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_interrupted_before_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1.0})

    def die(src, dst):
        raise Killed()

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(Killed):
        write_json_atomic(target, {"a": 2.0})
    assert json.loads(target.read_text()) == {"a": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
