"""UPMC Food-101 readers on fixture trees, splits, the WordNet table and taxonomies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.data.food101 import (
    FOOD101_CLASSES,
    ClassTaxonomy,
    assign_splits,
    class_phrase,
    food101_taxonomy,
    load_food101_wordnet_table,
    load_huse_dataset,
    read_upmc_food101,
    stratified_holdout,
)
from zsl_utils.data.tuxpaint import category_tree, load_stamps, tuxpaint_items


def write_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, "JPEG")
    return path


@pytest.fixture
def mirror_root(tmp_path: Path) -> Path:
    """Mirror layout with one good row per problem kind."""
    images = tmp_path / "images" / "train"
    write_jpeg(images / "apple_pie" / "apple_pie_0.jpg")
    write_jpeg(images / "apple_pie" / "apple_pie_1.jpg")
    write_jpeg(images / "sushi" / "sushi_0.jpg")
    (images / "sushi" / "sushi_1.jpg").write_bytes(b"")  # zero bytes
    (images / "sushi" / "sushi_2.jpg").write_bytes(b"not a jpeg at all")  # corrupt, non-empty
    write_jpeg(images / "sushi" / "sushi_3.jpg")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "train_titles.csv").write_text(
        "apple_pie_0.jpg,\"Grandma's apple pie, the best\",apple_pie\n"
        "apple_pie_1.jpg,   ,apple_pie\n"  # empty text
        "sushi_0.jpg,Sushi   rolls\tat home,sushi\n"
        "sushi_1.jpg,Zero byte sushi,sushi\n"
        "sushi_2.jpg,Corrupt sushi,sushi\n"
        "sushi_9.jpg,Missing image,sushi\n"
        "sushi_3.jpg,Wrong class,sashimi_bowl\n"
        "sushi_3.jpg,too,many,fields,here\n"
        "sushi_3.jpg,two fields only\n"
    )
    return tmp_path


def test_mirror_layout_keeps_good_rows_and_lists_bad_ones(mirror_root):
    result = read_upmc_food101(mirror_root, "train")
    assert list(result.items.columns) == ["item_id", "image_path", "text", "label"]
    assert result.items["item_id"].tolist() == ["train/apple_pie/apple_pie_0", "train/sushi/sushi_0", "train/sushi/sushi_2"]
    assert result.items["text"].tolist() == ["Grandma's apple pie, the best", "Sushi rolls at home", "Corrupt sushi"]
    reasons = dict(zip(result.skipped["item_id"], result.skipped["reason"]))
    assert reasons["train/apple_pie/apple_pie_1"] == "empty text"
    assert reasons["train/sushi/sushi_1"] == "unreadable image"
    assert reasons["train/sushi/sushi_9"] == "missing image"
    assert reasons["train/sashimi_bowl/sushi_3"] == "unknown class 'sashimi_bowl'"
    assert (result.skipped["reason"] == "malformed CSV line").sum() == 2
    assert len(result.skipped) == 6


def test_verify_images_catches_corrupt_files(mirror_root):
    result = read_upmc_food101(mirror_root, "train", verify_images=True)
    reasons = dict(zip(result.skipped["item_id"], result.skipped["reason"]))
    assert reasons["train/sushi/sushi_2"] == "unreadable image"
    assert len(result.items) == 2


def test_original_layout_pairs_images_with_texts(tmp_path):
    images = tmp_path / "images" / "test"
    texts = tmp_path / "texts_txt"
    for stem, text in [("pho_0", "Beef pho\n\nwith herbs"), ("pho_1", "   \n"), ("pho_2", None)]:
        write_jpeg(images / "pho" / f"{stem}.jpg")
        if text is not None:
            (texts / "pho").mkdir(parents=True, exist_ok=True)
            (texts / "pho" / f"{stem}.txt").write_text(text)
    result = read_upmc_food101(tmp_path, "test")
    assert result.items[["item_id", "text", "label"]].values.tolist() == [["test/pho/pho_0", "Beef pho with herbs", "pho"]]
    assert dict(zip(result.skipped["item_id"], result.skipped["reason"])) == {
        "test/pho/pho_1": "empty text", "test/pho/pho_2": "missing text file"}


def test_wrong_layout_shows_expected_trees(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataLayoutError) as error:
        read_upmc_food101(tmp_path, "train")
    message = str(error.value)
    assert "texts/train_titles.csv" in message and "texts_txt/<class>/<class>_<n>.txt" in message
    with pytest.raises(DataLayoutError, match="does not exist"):
        read_upmc_food101(tmp_path / "nowhere", "train")
    with pytest.raises(ParameterError, match="splits"):
        read_upmc_food101(tmp_path, "validation")


def test_mirror_without_image_folder_says_what_is_missing(mirror_root):
    (mirror_root / "texts" / "test_titles.csv").write_text("a.jpg,text,pho\n")
    with pytest.raises(DataLayoutError, match="images/test"):
        read_upmc_food101(mirror_root, "test")


def test_stratified_holdout_per_class_and_seeded():
    labels = ["a"] * 10 + ["b"] * 3 + ["c"]
    kept, held = stratified_holdout(labels, 0.2, seed=0)
    held_labels = [labels[i] for i in held]
    assert held_labels.count("a") == 2 and held_labels.count("b") == 1 and "c" not in held_labels
    assert sorted(kept.tolist() + held.tolist()) == list(range(14))
    again = stratified_holdout(labels, 0.2, seed=0)[1]
    assert np.array_equal(held, again)
    assert not np.array_equal(held, stratified_holdout(labels, 0.2, seed=5)[1])
    with pytest.raises(ParameterError):
        stratified_holdout(labels, 1.0)


def test_assign_splits_three_ways_and_val_from_train_only():
    items = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 6})
    split = assign_splits(items, val_fraction=0.25, test_fraction=0.2, seed=0)["split"]
    counts = split.groupby(items["label"]).value_counts().to_dict()
    assert counts[("a", "test")] == 2 and counts[("a", "val")] == 2 and counts[("a", "train")] == 6
    assert counts[("b", "test")] == 1 and counts[("b", "val")] == 1 and counts[("b", "train")] == 4
    upmc = pd.DataFrame({"label": ["a"] * 8, "split": ["train"] * 6 + ["test"] * 2})
    out = assign_splits(upmc, val_fraction=0.5, seed=0)
    assert out["split"].tolist()[6:] == ["test", "test"] and (out["split"] == "val").sum() == 3


def test_class_phrases():
    assert class_phrase("apple_pie") == "apple pie"
    assert class_phrase("animals/mammals") == "mammals (animals)"
    assert class_phrase("clothes/misc") == "clothes"


def test_tuxpaint_taxonomy_distances():
    classes = ("animals/birds", "animals/fish", "food/fruit")
    taxonomy = ClassTaxonomy(classes, *category_tree(classes))
    sets = taxonomy.correct_sets([1, 2])
    assert sets[1] == [frozenset({0}), frozenset({1}), frozenset({2})]
    assert sets[2][0] == {0, 1} and sets[2][2] == {0, 1, 2}  # fruit's nearest others are 4 edges away
    assert taxonomy.superclass["animals/fish"] == "animals"


def test_wordnet_table_covers_all_classes_with_matching_lemmas(wordnet):
    table = load_food101_wordnet_table()
    assert table["class_name"].tolist() == list(FOOD101_CLASSES) and len(FOOD101_CLASSES) == 101
    assert set(table["match"]) <= {"exact", "broader", "related"}
    food = {"n00021265", "n07555863"}  # the two 'food' synsets
    for row in table.itertuples(index=False):
        assert row.lemma in wordnet.synset(row.wnid).lemmas, row
        assert wordnet.ancestors(row.wnid) & food, f"{row.class_name} -> {row.wnid} is not a food"
        if row.match != "exact":
            assert row.note or row.match == "broader", f"{row.class_name}: a related match needs a note"


def test_food101_taxonomy_invariants(wordnet):
    taxonomy = food101_taxonomy(wordnet)
    assert taxonomy.superclass["miso_soup"] == "soup" and taxonomy.superclass["tiramisu"] == "dessert"
    assert taxonomy.superclass["mussels"] == "seafood"
    assert set(taxonomy.superclass.values()) <= {"soup", "salad", "sandwich", "dessert", "pasta & dumplings",
                                                 "baked goods", "seafood", "meat", "vegetables", "other dishes",
                                                 "starters & spreads", "other food"}
    assert taxonomy.superclass["grilled_salmon"] == "seafood" and taxonomy.superclass["hummus"] == "starters & spreads"
    sets = taxonomy.correct_sets([1, 2, 5])
    index = {c: i for i, c in enumerate(taxonomy.classes)}
    for k, per_class in sets.items():
        assert all(len(s) >= k and i in s for i, s in enumerate(per_class))
    assert sets[1][index["pho"]] == {index["pho"]}
    soups = {index[c] for c in ("pho", "ramen", "miso_soup", "french_onion_soup", "hot_and_sour_soup")}
    assert sets[2][index["pho"]] == soups  # all mapped to the same soup synset: siblings at distance 2


def test_tuxpaint_items_drop_small_classes(tuxpaint_root):
    stamps = load_stamps(tuxpaint_root)
    items, skipped = tuxpaint_items(stamps, min_items_per_class=6)
    sizes = stamps["category"].value_counts()
    assert set(items["label"]) == set(sizes.index[sizes >= 6])  # every stamp has a description
    assert (items["text"].str.len() > 0).all()
    assert len(items) + len(skipped) == len(stamps)
    assert set(skipped["reason"]) == {"class has < 6 items"}


def test_load_huse_dataset_upmc_mirror_carves_validation_from_train(mirror_root, wordnet):
    test_images = mirror_root / "images" / "test"
    write_jpeg(test_images / "sushi" / "sushi_7.jpg")
    (mirror_root / "texts" / "test_titles.csv").write_text("sushi_7.jpg,Sushi platter,sushi\n")
    for i in range(4, 7):  # more sushi training rows so validation can take one
        write_jpeg(mirror_root / "images" / "train" / "sushi" / f"sushi_{i}.jpg")
    with open(mirror_root / "texts" / "train_titles.csv", "a") as handle:
        handle.write("".join(f"sushi_{i}.jpg,Sushi number {i},sushi\n" for i in range(4, 7)))
    data = load_huse_dataset("upmc_food101", mirror_root, seed=0, val_fraction=0.25)
    assert data.classes == ("apple_pie", "sushi")
    assert data.taxonomy.classes == data.classes
    counts = data.items.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "apple_pie"): 1, ("train", "sushi"): 4, ("val", "sushi"): 1, ("test", "sushi"): 1}
    assert len(data.skipped) == 6 and data.phrases == ("apple pie", "sushi")
    with pytest.raises(ParameterError, match="data_root"):
        load_huse_dataset("upmc_food101", "")
