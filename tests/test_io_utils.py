"""Atomic outputs: all or nothing, never over a user's files unasked, with ordinary permissions."""

import os
import stat

import pytest

from concept_erase.errors import ConceptEraseError
from concept_erase.io_utils import atomic_dir, atomic_file


def test_atomic_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder

    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(ConceptEraseError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["b.txt"]


def test_atomic_file_is_all_or_nothing(tmp_path):
    out = tmp_path / "f.json"
    out.write_text("the user's")
    with pytest.raises(ConceptEraseError, match="already exists"):
        with atomic_file(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_outputs_get_the_modes_of_a_plain_mkdir_and_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("f")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone would leave 0700
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # mkstemp alone would leave 0600
