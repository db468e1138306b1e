"""Asset fetching: atomic install, ordered routes, and the error when every route fails."""
from __future__ import annotations

import pytest

from zsl_utils.data import assets
from zsl_utils.errors import AssetUnavailableError


def test_first_working_route_wins_and_marks_the_folder_complete(tmp_path):
    calls = []

    def unavailable(staging):
        calls.append("unavailable")
        return None

    def works(staging):
        calls.append("works")
        (staging / "data.noun").write_text("x")
        return "test route"

    target = tmp_path / "asset"
    assert assets._fetch(target, [("a", unavailable), ("b", works)], "thing", "advice") == target
    assert calls == ["unavailable", "works"]
    assert (target / "data.noun").read_text() == "x"
    assert (target / ".complete").read_text().strip() == "test route"
    # A second call finds the marker and runs no route at all.
    assert assets._fetch(target, [("b", works)], "thing", "advice") == target
    assert calls == ["unavailable", "works"]


def test_interrupted_route_leaves_no_partial_folder(tmp_path):
    def dies_half_way(staging):
        (staging / "data.noun").write_text("partial")
        raise OSError("disk full")

    target = tmp_path / "asset"
    with pytest.raises(AssetUnavailableError) as info:
        assets._fetch(target, [("apt", dies_half_way)], "WordNet 3.0", "install wordnet-base")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is cleaned up too
    message = str(info.value)
    assert "Could not obtain WordNet 3.0" in message
    assert "apt: OSError: disk full" in message
    assert "What to do: install wordnet-base" in message


def test_wordnet_from_a_user_copy(tmp_path, monkeypatch):
    source = tmp_path / "dict"
    source.mkdir()
    for name in assets.WORDNET_FILES:
        (source / name).write_text(name)
    monkeypatch.setenv("ZSL_WORDNET_SOURCE", str(source))
    target = assets.ensure_wordnet(tmp_path / "wordnet")
    assert (target / "index.noun").read_text() == "index.noun"
    assert "copied from" in (target / ".complete").read_text()


def test_missing_wordnet_everywhere_gives_one_actionable_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ZSL_WORDNET_SOURCE", raising=False)
    monkeypatch.setattr(assets, "_from_dir", lambda source, **kwargs: (lambda staging: None))
    monkeypatch.setattr(assets, "_wordnet_from_apt", lambda staging: None)

    def offline(staging):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(assets, "_wordnet_from_nltk", offline)
    with pytest.raises(AssetUnavailableError, match=r"(?s)nltk.*no route to host.*ZSL_WORDNET_SOURCE"):
        assets.ensure_wordnet(tmp_path / "wordnet")


def test_fetched_assets_are_complete(wordnet_dir, tuxpaint_root):
    assert all((wordnet_dir / name).stat().st_size > 1_000_000 for name in assets.WORDNET_FILES)
    assert len(list(tuxpaint_root.rglob("*.png"))) > 700
