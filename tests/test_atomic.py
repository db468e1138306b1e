"""Atomic writes: the target is the old file or the whole new one, never a part."""
from __future__ import annotations

import pytest

from zsl_utils.atomic import TMP_MARKER, temporary_sibling, write_atomically, write_text_atomically


def test_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    write_atomically(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def dies_half_way(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, dies_half_way)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_text_helper_creates_parents_and_names_carry_the_writer(tmp_path):
    target = write_text_atomically(tmp_path / "sub" / "note.json", "{}")
    assert target.read_text() == "{}"
    sibling = temporary_sibling(target)
    assert sibling.parent == target.parent
    assert sibling.name.startswith(".note.json" + TMP_MARKER)
    assert len(sibling.name.split(TMP_MARKER, 1)[1].split("-")) >= 3  # host-pid-random
