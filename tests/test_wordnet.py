"""The WordNet reader: hand-written database lines, then invariants on real WordNet 3.0."""
from __future__ import annotations

import pytest

from zsl_utils import config
from zsl_utils.errors import AssetUnavailableError
from zsl_utils.data.wordnet import WordNet, parse_data_line, parse_index_line

# Real lines from WordNet 3.0's data.noun / index.noun (tabby cat; 'tabby').
TABBY_LINE = (
    "02123045 05 n 02 tabby 0 tabby_cat 0 002 @ 02121808 n 0000 + 00377685 a 0101 "
    "| a cat with a grey or tawny coat mottled with black  \n"
)
INDEX_LINE = "tabby n 3 2 @ ~ 3 0 02123045 09993809 03412058  \n"


def test_parse_data_line_reads_lemmas_gloss_and_only_noun_pointers():
    synset = parse_data_line(TABBY_LINE)
    assert synset.wnid == "n02123045"
    assert synset.lemmas == ("tabby", "tabby_cat")
    assert synset.gloss == "a cat with a grey or tawny coat mottled with black"
    assert synset.hypernyms == ("n02121808",)  # the '+' pointer to an adjective is ignored
    assert synset.hyponyms == ()


def test_parse_index_line_keeps_sense_order():
    assert parse_index_line(INDEX_LINE) == ("tabby", ["n02123045", "n09993809", "n03412058"])
    assert parse_data_line("  1 This software and database ...") is None


def _write_tiny_wordnet(directory):
    """entity <- animal <- {cat, dog}; cat has an instance hyponym (Garfield)."""
    lines = [
        "00000001 03 n 01 entity 0 001 ~ 00000002 n 0000 | that which exists",
        "00000002 05 n 01 animal 0 003 @ 00000001 n 0000 ~ 00000003 n 0000 ~ 00000004 n 0000 | a living organism",
        "00000003 05 n 02 cat 0 true_cat 0 002 @ 00000002 n 0000 ~i 00000005 n 0000 | a feline",
        "00000004 05 n 01 dog 0 001 @ 00000002 n 0000 | a canine",
        "00000005 18 n 01 Garfield 0 001 @i 00000003 n 0000 | a cartoon cat",
    ]
    (directory / "data.noun").write_text("  1 license header line\n" + "\n".join(lines) + "\n", encoding="latin-1")
    (directory / "index.noun").write_text("cat n 1 1 @ 1 0 00000003  \ndog n 1 1 @ 1 0 00000004  \n")


def test_graph_queries_on_a_tiny_hand_built_database(tmp_path, monkeypatch):
    _write_tiny_wordnet(tmp_path)
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    wn = WordNet.load(tmp_path)
    assert len(wn) == 5
    assert wn.ancestors("n00000005") == {"n00000003", "n00000002", "n00000001"}  # through the instance link
    assert wn.synset("n00000002").hyponyms == ("n00000003", "n00000004")
    assert wn.lookup("Cat") == ["n00000003"]
    assert wn.synset("n00000003").lemmas == ("cat", "true_cat")
    assert WordNet.load(tmp_path) is wn  # parsed once per process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.noun", "index.noun"]  # no disk cache: pickles run code


def test_missing_wordnet_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(AssetUnavailableError, match=r"data\.noun is missing.*zsl_utils\.data\.assets"):
        WordNet.load(tmp_path / "nowhere")


def test_unknown_wnid_is_a_clear_key_error(tmp_path):
    _write_tiny_wordnet(tmp_path)
    wn = WordNet.load(tmp_path)
    with pytest.raises(KeyError, match="not a WordNet 3.0 noun synset"):
        wn.synset("n99999999")


def test_real_wordnet_3_0_invariants(wordnet):
    assert len(wordnet) == 82115  # noun synsets in WordNet 3.0
    entity = "n00001740"
    assert wordnet.synset(entity).lemmas == ("entity",)
    assert wordnet.hypernyms(entity) == ()
    tabby = wordnet.synset("n02123045")
    assert "tabby_cat" in tabby.lemmas
    assert "n02121808" in tabby.hypernyms  # domestic cat
    assert entity in wordnet.ancestors("n02123045")
    assert "n02123045" in wordnet.synset("n02121808").hyponyms
    # Every synset except 'entity' reaches the root: the is-a graph is one tree-like DAG.
    sample = list(wordnet.wnids())[::997]
    assert all(w == entity or entity in wordnet.ancestors(w) for w in sample)
    # Hypernym and hyponym pointers are mirror images of each other.
    assert all(w in wordnet.synset(h).hyponyms for w in sample for h in wordnet.hypernyms(w))
    assert wordnet.lookup("tabby cat") == ["n02123045"]


def test_display_names_by_hand(tmp_path):
    # three synsets all named "king": two with different hypernyms, two under the same one
    (tmp_path / "data.noun").write_text(
        "00000001 03 n 01 ruler 0 001 ~ 00000003 n 0000 | a ruler\n"
        "00000002 03 n 01 chessman 0 001 ~ 00000004 n 0000 | a piece\n"
        "00000003 03 n 02 king 0 sovereign 0 001 @ 00000001 n 0000 | a male sovereign\n"
        "00000004 03 n 01 king 0 001 @ 00000002 n 0000 | the most important piece; the king\n"
        "00000005 03 n 01 king 0 001 @ 00000002 n 0000 | a checker that reached the last row\n")
    (tmp_path / "index.noun").write_text("king n 3 0 3 0 00000003 00000004 00000005\n")
    names = WordNet.load(tmp_path).display_names(["n00000003", "n00000004", "n00000005", "n00000001", "n09999999"])
    assert names == {"n00000003": "king (ruler)",  # hypernym lemma suffices
                     "n00000004": "king (the most important piece)",  # same hypernym: the gloss up to ";"
                     "n00000005": "king (a checker that reached ...)",  # first 4 words
                     "n00000001": "ruler", "n09999999": "n09999999"}  # outside WordNet: the WNID


def test_display_names_are_distinct_over_the_imagenet_label_space(wordnet):
    from zsl_utils.data.wnids import imagenet_wnids
    labels = list(dict.fromkeys(imagenet_wnids("1k") + imagenet_wnids("21k")))
    names = wordnet.display_names(labels)
    assert len(names) == len(labels) == 21_842 and len(set(names.values())) == len(labels)
    assert names["n03618101"] == "king (chessman)" and names["n02012849"] == "crane (wading bird)"
    assert names["n02123597"] == "Siamese cat"  # a lemma no other label has stays as it is
