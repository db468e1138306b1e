"""Image folders by WNID and the Tux Paint name -> WNID mapping."""
from __future__ import annotations

import pandas as pd
import pytest

from zsl_utils.data import wnids
from zsl_utils.data.images import image_folder_by_wnid
from zsl_utils.data.tuxpaint import (
    filter_stamps,
    load_stamps,
    load_tuxpaint_table,
    map_name_to_wnid,
    normalise_stamp_name,
    tuxpaint_by_wnid,
)
from zsl_utils.errors import DataLayoutError, ParameterError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_image_folder_by_wnid(tmp_path):
    for rel in ["n00000002/b.JPEG", "n00000002/a.jpg", "n00000002/notes.txt", "n00000001/z.png",
                "README/x.jpg", "n00000003/c.jpeg"]:
        _touch(tmp_path / rel)
    frame = image_folder_by_wnid(tmp_path)
    assert [p.split("/")[-2:] for p in frame["path"]] == [
        ["n00000001", "z.png"], ["n00000002", "a.jpg"], ["n00000002", "b.JPEG"], ["n00000003", "c.jpeg"]]
    assert frame["wnid"].tolist() == ["n00000001", "n00000002", "n00000002", "n00000003"]
    assert frame.attrs["ignored_folders"] == ["README"]
    limited = image_folder_by_wnid(tmp_path, wnids=["n00000002", "n00000009"], max_per_class=1)
    assert limited["path"].str.endswith("a.jpg").tolist() == [True]
    assert limited.attrs["missing_wnids"] == ["n00000009"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="does not exist"):
        image_folder_by_wnid(tmp_path / "absent")
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataLayoutError, match="no images found.*found folders \\['cats'\\]"):
        image_folder_by_wnid(tmp_path)


@pytest.mark.parametrize("raw, normal", [("rainbow-lorikeet", "rainbow_lorikeet"), ("lion-2", "lion"),
                                         ("Strawberry2", "strawberry"), ("towTruck", "towtruck"),
                                         ("Candy_cane_photo_1", "candy_cane_photo"), ("747", "747")])
def test_normalise_stamp_name(raw, normal):
    assert normalise_stamp_name(raw) == normal


class _FakeWordNet:
    index = {"bat": ["n1", "n2", "n3"], "fox": ["n4", "n5"], "cherry": ["n6"], "grape": ["n7"]}

    def lookup(self, word):
        return list(self.index.get(word, []))


TABLE = pd.DataFrame({"name": ["bat", "tooth", "moon"], "wnid": ["n2", "", "n99"],
                      "note": ["the animal", "sense not in ImageNet", "not in space"]})
SPACE = {"n1", "n2", "n4", "n5", "n6", "n7"}


@pytest.mark.parametrize("name, expected", [
    ("bat-2", ("n2", "table")),           # reviewed table wins
    ("tooth", (None, "excluded")),        # reviewed and excluded
    ("moon", (None, "excluded")),         # reviewed WNID outside the label space
    ("fox", (None, "ambiguous")),         # two senses in the label space, not reviewed
    ("cherries", ("n6", "lookup")),       # plural -> singular, one sense
    ("grapes", ("n7", "lookup")),
    ("unicorn", (None, "unmapped")),
])
def test_map_name_rules(name, expected):
    wnid, how, _ = map_name_to_wnid(name, _FakeWordNet(), SPACE, TABLE)
    assert (wnid, how) == expected


def test_reviewed_table_is_well_formed(wordnet):
    table = load_tuxpaint_table()
    space = set(wnids.imagenet_wnids("21k")) | set(wnids.imagenet_wnids("1k"))
    listed = table[table["wnid"] != ""]
    assert listed["wnid"].isin(space).all()
    assert all(w in wordnet for w in listed["wnid"])
    assert (table["note"].str.len() > 0).all()  # every decision carries its reason
    assert (table["name"] == table["name"].map(normalise_stamp_name)).all()  # keys are normalised


def test_tuxpaint_mapping_on_real_stamps(wordnet, tuxpaint_root):
    frame = tuxpaint_by_wnid(load_stamps(tuxpaint_root), wordnet)
    assert "ambiguous" not in set(frame["how"])  # the reviewed table covers every ambiguous name
    mapped = frame[frame["wnid"].notna()]
    assert len(mapped) > 300 and mapped["seen"].sum() > 50 and (~mapped["seen"]).sum() > 150
    row = frame.set_index("name").loc["pink_flamingo"]
    assert (row["wnid"], row["seen"], row["how"]) == ("n02007558", True, "table")
    assert frame.set_index("name").loc["badger", "how"] == "lookup"


class _FakeTree:
    """WordNet stand-in for filter_stamps: n1, n3 (and n0 itself) are under n0; n9 is not."""

    parents = {"n0": set(), "n1": {"n0"}, "n3": {"n0"}, "n8": set(), "n9": {"n8"}}

    def __contains__(self, wnid):
        return wnid in self.parents

    def ancestors(self, wnid):
        return self.parents[wnid]


STAMPS = pd.DataFrame({
    "path": ["s/animals/a/giraffe.png", "s/animals/a/teddy.png", "s/animals/a/cartoon/owl.png",
             "s/animals/a/zzz.png", "s/seasonal/b/owl.png", "s/animals/a/animal.png"],
    "name": ["giraffe", "teddy", "owl", "zzz", "owl", "animal"],
    "top_category": ["animals", "animals", "animals", "animals", "seasonal", "animals"],
    "wnid": ["n1", "n9", "n3", None, "n3", "n0"],
}, index=[10, 11, 12, 13, 14, 15])


def test_filter_stamps_photos_categories_and_subtree():
    assert filter_stamps(STAMPS).name.tolist() == ["giraffe", "teddy", "zzz", "owl", "animal"]  # no cartoon
    animals = filter_stamps(STAMPS, top_categories=("animals",))
    assert animals.name.tolist() == ["giraffe", "teddy", "zzz", "animal"]
    assert animals.index.tolist() == [0, 1, 2, 3]
    # teddy's n9 is outside n0, zzz has no WNID; n0 itself counts as under n0.
    under = filter_stamps(STAMPS, top_categories=["animals"], under="n0", wordnet=_FakeTree())
    assert under.name.tolist() == ["giraffe", "animal"]
    assert filter_stamps(STAMPS, photos_only=False, under="n0", wordnet=_FakeTree()).name.tolist() == [
        "giraffe", "owl", "owl", "animal"]
    assert len(filter_stamps(STAMPS, photos_only=False, top_categories=("animals",))) == 5


def test_filter_stamps_errors():
    with pytest.raises(ParameterError, match="needs wordnet"):
        filter_stamps(STAMPS, under="n0")
    with pytest.raises(ParameterError, match="not a WordNet"):
        filter_stamps(STAMPS, under="n7", wordnet=_FakeTree())
    with pytest.raises(ParameterError, match=r"\['animals'\]"):
        filter_stamps(STAMPS, top_categories="animals")


def test_animal_photos_on_real_stamps(wordnet, tuxpaint_root):
    """The reviewed mapping fixes first-sense errors that a plain WordNet lookup makes."""
    animal = "n00015388"
    photos = filter_stamps(tuxpaint_by_wnid(load_stamps(tuxpaint_root), wordnet), top_categories=("animals",),
                           under=animal, wordnet=wordnet)
    by_name = photos.set_index("name")["wnid"]
    # First senses: seahorse -> walrus, hedgehog -> porcupine, dolphin -> dolphinfish, ram -> RAM.
    assert wordnet.lookup("seahorse")[0] == "n02081571" and by_name["seahorse"] == "n01456756"
    assert wordnet.lookup("hedgehog")[0] == "n02346627" and by_name["hedgehog"] == "n01893825"
    assert by_name["dolphin"] == "n02068974" and by_name["ram"] == "n02412080"
    assert "edward_bear" not in by_name  # a teddy bear in the animals folder: not an animal
    assert not photos["path"].astype(str).str.contains("/cartoon/").any()
    assert all(animal in wordnet.ancestors(w) for w in photos["wnid"])
