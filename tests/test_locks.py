"""Folder locks (pipeline.artifacts.exclusive / shared): one writer or many readers, never both;
lock files are never followed through a symlink, and every failure is one line (issue 23, item 3)."""

from __future__ import annotations

import os

import pytest

from pipeline.artifacts import exclusive, shared
from pipeline.errors import UserError


def test_one_writer_or_many_readers(tmp_path):
    lock, what = tmp_path / ".locks" / "x.lock", tmp_path / "x"
    with shared(lock, what), shared(lock, what):  # readers together
        with pytest.raises(UserError, match="is being read by another process") as e:
            with exclusive(lock, what):
                pass
        assert "\n" not in str(e.value)
    with exclusive(lock, what):
        for take in (shared, exclusive):
            with pytest.raises(UserError, match=f"is being written by pid {os.getpid()} "):
                with take(lock, what):
                    pass
    with exclusive(lock, what):  # released: the next one goes ahead
        pass


@pytest.mark.parametrize("where", ["lock", "holder"])
@pytest.mark.parametrize("take", [exclusive, shared])
def test_a_symlink_at_a_lock_name_is_refused_and_its_target_untouched(tmp_path, where, take):
    precious = tmp_path / "thesis.tex"
    precious.write_text("precious")
    lock = tmp_path / ".locks" / "x.lock"
    lock.parent.mkdir()
    link = lock if where == "lock" else lock.with_name(lock.name + ".holder")  # the holder file of earlier versions
    link.symlink_to(precious)
    if where == "lock":
        with pytest.raises(UserError, match="is a symbolic link") as e:
            with take(lock, tmp_path / "x"):
                pass
        assert "\n" not in str(e.value)
    else:
        with take(lock, tmp_path / "x"):
            pass
    assert precious.read_text() == "precious" and link.is_symlink()


@pytest.mark.parametrize("case", ["locks folder is a file", "lock is a folder"])
def test_a_lock_that_cannot_be_made_is_one_line(tmp_path, case):
    lock = tmp_path / ".locks" / "x.lock"
    if case == "locks folder is a file":
        lock.parent.write_text("mine")
    else:
        lock.mkdir(parents=True)
    with pytest.raises(UserError, match=r"cannot use lock .*move away whatever is in its place") as e:
        with exclusive(lock, tmp_path / "x"):
            pass
    assert "\n" not in str(e.value)


def test_disk_full_writing_the_holder_is_one_line(tmp_path, monkeypatch):
    from collections import Counter

    import pipeline.faults

    monkeypatch.setattr(pipeline.faults, "_passed", Counter())
    monkeypatch.setenv("XMODEL_FAULT", "ioerror_after_locks:1")
    lock = tmp_path / ".locks" / "x.lock"
    with pytest.raises(UserError, match="No space left on device.*free disk space"):
        with exclusive(lock, tmp_path / "x"):
            pass
    monkeypatch.delenv("XMODEL_FAULT")
    with exclusive(lock, tmp_path / "x"):  # nothing was left held
        pass
