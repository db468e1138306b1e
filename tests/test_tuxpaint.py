"""The Tux Paint reader on a hand-built tree and on the real stamps."""
from __future__ import annotations

import pytest

from zsl_utils.errors import DataLayoutError
from zsl_utils.data.tuxpaint import load_stamps


def _stamp(root, relative, description=None):
    png = root / relative
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(b"\x89PNG fake")
    if description is not None:
        png.with_suffix(".txt").write_text(f"{description}\nfr.utf8=Traduction\n", encoding="utf-8")


def test_categories_descriptions_and_mirrors(tmp_path):
    _stamp(tmp_path, "animals/mammals/badger.png", "A badger.")
    _stamp(tmp_path, "animals/mammals/badger_mirror.png")
    _stamp(tmp_path, "clothes/bikini.png", "A bikini.")
    _stamp(tmp_path, "symbols/money/us/coins/penny.png", "A penny.")
    frame = load_stamps(tmp_path)
    assert list(frame["name"]) == ["badger", "bikini", "penny"]
    assert list(frame["category"]) == ["animals/mammals", "clothes/misc", "symbols/money"]
    assert list(frame["top_category"]) == ["animals", "clothes", "symbols"]
    assert list(frame["description"]) == ["A badger.", "A bikini.", "A penny."]


def test_empty_or_missing_folder_is_a_layout_error(tmp_path):
    with pytest.raises(DataLayoutError, match="No NAME.png stamps found"):
        load_stamps(tmp_path)
    with pytest.raises(DataLayoutError, match="does not exist"):
        load_stamps(tmp_path / "missing")


def test_real_stamps(tuxpaint_root):
    frame = load_stamps(tuxpaint_root)
    assert len(frame) > 700
    assert (frame["description"] != "").all()
    assert {"animals", "food", "vehicles"} <= set(frame["top_category"])
    assert frame["path"].map(lambda p: p.is_file()).all()
