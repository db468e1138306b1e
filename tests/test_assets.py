"""Asset fetching: atomic install, ordered routes, and the error when every route fails."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from zsl_utils.data import assets
from zsl_utils.data.images import imagenet_sample_photos
from zsl_utils.data.wnids import imagenet_wnids
from zsl_utils.errors import AssetUnavailableError, DataLayoutError

SHARED_SAMPLE = Path("/work/shared/data/imagenet-sample-256")


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


def sample_folder(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """Two tiny photos named like the real sample, a README.md and ``extra`` files."""
    folder.mkdir()
    for name in ("n01443537_goldfish.JPEG", "n01440764_tench.JPEG") + extra:
        Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / name, format="JPEG")
    (folder / "README.md").write_text("not a photo")
    return folder


def test_imagenet_sample_from_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSL_IMAGENET_SAMPLE", str(sample_folder(tmp_path / "photos")))
    target = assets.ensure_imagenet_sample(tmp_path / "imagenet_sample")
    assert sorted(p.name for p in target.iterdir()) == [".complete", "n01440764_tench.JPEG", "n01443537_goldfish.JPEG"]
    assert "copied from" in (target / ".complete").read_text()
    assert assets.ensure_imagenet_sample(target) == target  # complete: no route runs again


def test_imagenet_sample_variable_without_photos_falls_through(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("ZSL_IMAGENET_SAMPLE", str(tmp_path / "empty"))
    monkeypatch.setattr(assets.config, "PROJ_ROOT", tmp_path / "checkout")  # no development copy beside it

    def offline(staging):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(assets, "_sample_from_github", offline)
    with pytest.raises(AssetUnavailableError, match=r"(?s)ZSL_IMAGENET_SAMPLE: not available.*no route to host"):
        assets.ensure_imagenet_sample(tmp_path / "imagenet_sample")
    assert not (tmp_path / "imagenet_sample").exists()


def test_imagenet_sample_photos_table(tmp_path):
    folder = sample_folder(tmp_path / "photos", extra=("tench_no_wnid.JPEG", "n01491361_tiger_shark.jpg"))
    frame = imagenet_sample_photos(folder)
    assert list(frame.columns) == ["path", "wnid", "name"]
    assert list(frame["wnid"]) == ["n01440764", "n01443537", "n01491361"]
    assert list(frame["name"]) == ["tench", "goldfish", "tiger shark"]
    assert frame["path"].iloc[0] == str(folder / "n01440764_tench.JPEG")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match=r"(?s)no photos named <wnid>_<name>.JPEG.*empty"):
        imagenet_sample_photos(tmp_path / "empty")


def test_real_imagenet_sample_covers_the_1k_classes():
    if not (SHARED_SAMPLE / "n01440764_tench.JPEG").is_file():
        pytest.skip(f"no local copy of the ImageNet sample photos at {SHARED_SAMPLE}")
    frame = imagenet_sample_photos(SHARED_SAMPLE)
    assert len(frame) == 1000 and frame["wnid"].nunique() == 1000
    assert set(frame["wnid"]) == set(imagenet_wnids("1k"))
